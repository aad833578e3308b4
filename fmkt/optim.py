"""Optimisers and the LR schedule of a run: registered by name (``optim.name``, ``optim.scheduler``)."""
from __future__ import annotations

import math

import torch

from fmkt.config import Config


def lr_factor(cfg: Config, epoch_progress: float) -> float:
    """Multiplier of the base LR at a fractional epoch: linear warm-up, then cosine to 0 or step decay."""
    o, epochs = cfg.optim, cfg.train.epochs
    if o.warmup_epochs > 0 and epoch_progress < o.warmup_epochs:
        return (epoch_progress + 1e-8) / o.warmup_epochs
    if o.scheduler == "cosine":
        span = max(epochs - o.warmup_epochs, 1e-8)
        return 0.5 * (1.0 + math.cos(math.pi * min((epoch_progress - o.warmup_epochs) / span, 1.0)))
    return o.gamma ** sum(1 for m in o.milestones if epoch_progress >= m)


OPTIMIZERS = {
    "sgd": lambda params, o, **kw: torch.optim.SGD(params, momentum=o.momentum, weight_decay=o.weight_decay,
                                                   nesterov=o.nesterov and o.momentum > 0, **kw),
    "adamw": lambda params, o, **kw: torch.optim.AdamW(params, weight_decay=o.weight_decay, **kw),
}
LR_SCHEDULES = ("cosine", "multistep")  # lr_factor's two shapes (both with optional linear warm-up)


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """The configured optimiser over the trainable ``params``. On CUDA the fused implementation (one kernel for
    all parameters) with the learning rate as a one-element GPU tensor, which the LR schedule fills in place: the
    same optimiser serves the eager step and the captured one (fmkt.capture), which reads the LR on the GPU."""
    params = [p for p in params if p.requires_grad]
    if params and params[0].is_cuda:
        lr = torch.tensor(float(cfg.optim.lr), device=params[0].device)
        return OPTIMIZERS[cfg.optim.name](params, cfg.optim, lr=lr, fused=True)
    return OPTIMIZERS[cfg.optim.name](params, cfg.optim, lr=cfg.optim.lr)


def lr_onto_device(optimizer: torch.optim.Optimizer) -> None:
    """After loading a checkpoint, put a tensor LR back on its parameters' GPU (the state was read onto the CPU)."""
    for group in optimizer.param_groups:
        lr, device = group["lr"], group["params"][0].device
        if isinstance(lr, torch.Tensor) and lr.device != device:
            group["lr"] = lr.to(device)


def build_scheduler(cfg: Config, optimizer, iters_per_epoch: int):
    """The LR schedule, stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it / iters_per_epoch))
