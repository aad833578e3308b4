"""The uniform interface shared by every model of the zoo."""

from __future__ import annotations

import math

import torch
from torch import nn


class ZooModel(nn.Module):
    """Base class: ``forward(x) = forward_head(forward_features(x))``.

    A subclass sets ``num_features`` (channels of the last feature map), defines
    ``forward_features(x) -> (B, C, H, W)`` and ``get_classifier() -> nn.Linear``, and owns a
    global-average-pooling module named by ``pool_name`` (``avgpool`` unless the reference
    definition called it otherwise). ``forward_head`` is that pool, a flatten and the classifier.
    """

    num_features: int
    pool_name: str = "avgpool"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_classifier(self) -> nn.Linear:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        pooled = getattr(self, self.pool_name)(feat)
        return self.get_classifier()(torch.flatten(pooled, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def check_in_channels(in_channels: int) -> int:
    """Validate the number of input channels (1 for grey images, 3 for RGB)."""
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int (1 or 3), got {in_channels!r}")
    return in_channels


def init_weights_mdistiller(model: nn.Module) -> None:
    """The weight init of mdistiller's VGG and MobileNetV2: He-normal convs, unit BN, N(0, 0.01) Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.weight.data.normal_(0, 0.01)
            m.bias.data.zero_()


class ShuffleBlock(nn.Module):
    """Channel shuffle of the ShuffleNets: [N,C,H,W] -> [N,g,C/g,H,W] -> [N,C/g,g,H,W] -> [N,C,H,W]."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.reshape(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)
