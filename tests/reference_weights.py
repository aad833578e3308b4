"""Random weights under a reference's parameter names and shapes (a fixture of them, never our own models).

Shared by tests/test_teacher_compat.py (mdistiller's CIFAR models) and tests/test_imagenet_models.py
(torchvision's ResNets, mdistiller's MobileNetV1).
"""
import math

import torch


def random_state_dict(shapes: dict, seed: int = 0, bn_weight: float = 1.0) -> dict:
    """He-scaled convs and linears, BN near identity (weights ``bn_weight`` + noise), a few running statistics."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            sd[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("running_mean") or key.endswith("bias"):
            sd[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # BN weight
            sd[key] = bn_weight + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = torch.randn(shape, generator=g) * math.sqrt(1.0 / math.prod(shape[1:]))
    return sd
