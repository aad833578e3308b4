"""Optimisers and the LR schedule of a run: registered by name (``optim.name``, ``optim.scheduler``).

On CUDA the optimiser is the fused implementation (one kernel for all parameters) with the learning rate as a
one-element tensor on the GPU, which the LR schedule fills in place. That one optimiser serves the eager step and
the captured one (fmkt.capture): a graph reads the LR tensor at every replay, where a Python float would be
recorded once as a constant. :func:`graph_refusal` says when an optimiser is not fit for a capture, and
:func:`load_optimizer_state` keeps it fit across a resume.
"""
from __future__ import annotations

import math

import torch

from fmkt.config import Config
from fmkt.errors import FmktError


def lr_factor(cfg: Config, epoch_progress: float) -> float:
    """Multiplier of the base LR at a fractional epoch: linear warm-up from ``optim.warmup_start``, then cosine to
    ``optim.min_lr`` or step decay (with both at 0, exactly the plain warm-up-then-cosine-to-0 of before)."""
    o, epochs = cfg.optim, cfg.train.epochs
    if o.warmup_epochs > 0 and epoch_progress < o.warmup_epochs:
        return o.warmup_start + (1.0 - o.warmup_start) * ((epoch_progress + 1e-8) / o.warmup_epochs)
    if o.scheduler == "cosine":
        span, floor = max(epochs - o.warmup_epochs, 1e-8), o.min_lr / o.lr
        return floor + (1.0 - floor) * (0.5 * (1.0 + math.cos(math.pi * min((epoch_progress - o.warmup_epochs)
                                                                             / span, 1.0))))
    return o.gamma ** sum(1 for m in o.milestones if epoch_progress >= m)


def scheduled_lr(cfg: Config, step: int, iters_per_epoch: int) -> float:
    """The LR that global step ``step`` (0-based) trains with: what :func:`build_scheduler` sets before it. Read
    from the schedule, not from the optimiser, so logging it costs no device sync."""
    return float(cfg.optim.lr) * lr_factor(cfg, step / iters_per_epoch)


def epoch_lr(cfg: Config, epoch: int, iters_per_epoch: int) -> float:
    """The LR of epoch ``epoch``'s last step (metrics.jsonl's ``lr``): the one the epoch ended training with."""
    return scheduled_lr(cfg, (epoch + 1) * iters_per_epoch - 1, iters_per_epoch)


OPTIMIZERS = {
    "sgd": lambda params, o, **kw: torch.optim.SGD(params, momentum=o.momentum, weight_decay=o.weight_decay,
                                                   nesterov=o.nesterov and o.momentum > 0, **kw),
    "adamw": lambda params, o, **kw: torch.optim.AdamW(params, weight_decay=o.weight_decay, **kw),
}
# what each optimiser needs to run inside a CUDA graph besides fused=True (AdamW's step() refuses a capture
# unless capturable=True; SGD has no step counter and no such flag)
CAPTURE_OPTIONS = {"sgd": {}, "adamw": {"capturable": True}}
LR_SCHEDULES = ("cosine", "multistep")  # lr_factor's two shapes (both with optional linear warm-up)
# param-group fields that describe how the step runs on this device, not the training state: a resume keeps the
# freshly built optimiser's (a checkpoint from a CPU run, or from before the LR became a tensor, has others)
DEVICE_FIELDS = ("fused", "foreach", "capturable", "differentiable")


NO_DECAY_TOKENS = ("cls_token", "dist_token", "reg_token", "pos_embed", "pos_embedding")  # timm's no_weight_decay()


def decay_groups(named, weight_decay: float) -> list:
    """timm's ``param_groups_weight_decay``: ``named`` ((name, parameter) pairs) as two param groups, the biases,
    norms (every parameter of one dimension) and ViT tokens without weight decay, the rest with ``weight_decay``."""
    decay, keep = [], []
    for name, p in named:
        (keep if p.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_TOKENS else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_optimizer(cfg: Config, params, *, device_lr: bool | None = None, capturable: bool = False):
    """The configured optimiser over the trainable ``params`` (parameters, or (name, parameter) pairs, which
    ``optim.no_decay`` needs: :func:`decay_groups`). ``device_lr`` (default: the parameters are on CUDA): the fused
    implementation with the LR as a one-element tensor on the parameters' device (one per param group);
    ``capturable``: also what a CUDA-graph capture needs (AdamW's ``capturable=True``; asked only when a capture is
    planned, since torch warns when a capturable optimiser steps outside a graph)."""
    o, named = cfg.optim, [(n, p) for n, p in _named(params) if p.requires_grad]
    if o.no_decay and any(n is None for n, _ in named):
        raise FmktError("optim.no_decay needs the parameters' names: pass model.named_parameters().")
    groups = decay_groups(named, o.weight_decay) if o.no_decay else [{"params": [p for _, p in named]}]
    groups = [g for g in groups if g["params"]]  # none at all: the optimiser's own "empty parameter list" error
    first = groups[0]["params"][0] if groups else None
    if device_lr is None:
        device_lr = first is not None and first.is_cuda
    if device_lr and first is not None:
        extra = CAPTURE_OPTIONS[o.name] if capturable else {}
        if len(groups) > 1:  # each group its own LR tensor, which the schedule fills in place
            groups = [dict(g, lr=torch.tensor(float(o.lr), device=first.device)) for g in groups]
        return OPTIMIZERS[o.name](groups, o, lr=torch.tensor(float(o.lr), device=first.device), fused=True, **extra)
    return OPTIMIZERS[o.name](groups, o, lr=o.lr)


def _named(params) -> list:
    """``params`` as (name, parameter) pairs: plain parameters get the name None."""
    return [item if isinstance(item, tuple) else (None, item) for item in params]


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimiser state, keeping what the freshly built optimiser says about this device.

    ``Optimizer.load_state_dict`` replaces each param group with the saved one: a checkpoint written on the CPU
    (or before the LR was a tensor) brings a Python-float LR and ``fused=None``, and a captured step would then
    record that LR as a constant (the schedule would stop moving it). So the saved LR value goes into the built
    optimiser's LR (its tensor on the parameters' device, or a float), the device fields stay the built ones, and
    step counters live where the fused/capturable step reads them."""
    built = [{k: g[k] for k in ("lr", *DEVICE_FIELDS) if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, fresh in zip(optimizer.param_groups, built):
        saved_lr = float(group["lr"])
        group.update({k: v for k, v in fresh.items() if k != "lr"})
        if isinstance(fresh["lr"], torch.Tensor):
            group["lr"] = fresh["lr"].fill_(saved_lr)
        else:
            group["lr"] = saved_lr
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32) if on_device else st["step"].cpu()


def graph_refusal(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer.step()`` cannot be recorded in a CUDA graph as the schedule needs (None: it can)."""
    name = type(optimizer).__name__
    for i, group in enumerate(optimizer.param_groups):
        lr, device = group["lr"], group["params"][0].device
        if not (isinstance(lr, torch.Tensor) and lr.device == device):
            where = f"a tensor on {lr.device}" if isinstance(lr, torch.Tensor) else f"the Python number {lr:g}"
            return (f"param group {i}'s learning rate is {where}, not a tensor on {device}: a graph would record "
                    "it once and the LR schedule would stop moving it")
        if not group.get("fused"):
            return f"{name} is not the fused implementation (its non-finite-step guard, found_inf, needs it)"
        if "capturable" in group and not group["capturable"]:
            return f"{name} was built with capturable=False, so its step() refuses to run inside a capture"
    return None


def build_scheduler(cfg: Config, optimizer, iters_per_epoch: int):
    """The LR schedule, stepped once per iteration (step ``s`` trains at :func:`scheduled_lr`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it / iters_per_epoch))
