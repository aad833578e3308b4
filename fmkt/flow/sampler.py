"""The one N-step Euler sampler of FM-KT, shared by training, evaluation, export and the kernels.

    x = Z1
    for each step (t, dt, p, q), t = 1, (N-1)/N, ..., 1/N:
        v = encoder(x + e(t))
        x = x - dt * v                      # Euler step of the ODE toward the teacher
        estimate = p * Z1 + q * v           # teacher estimate; Z1, not x (rectified flow: Z1 - v)
        pooled estimate = mean over H, W    # S = pool + linear, so pooling first is exact

Training uses every step's pooled estimate; inference needs only their mean (S is linear, so the head is
applied once to the mean). A model whose head S is not pool + linear (timm's ConvNeXt, MobileNetV3) asks for the
estimates as maps (``return_estimates``): S runs on each and the prediction is the mean of the steps' logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from fmkt.flow.schedules import StepConstants, fp32

# One inner update: (x, v, z1, e_next or None, dt, p, q) -> (x_next, u_next or None, pooled_estimate (B, C)).
StepFn = Callable[..., tuple]


def euler_step_reference(x, v, z1, e_next, dt: float, p: float, q: float):
    """The elementwise part of one step in plain torch (the reference twin of the fused kernel).

    x, v, z1: (B, C, H, W); e_next: (B or 1, C) time embedding of the next step, or None on the last step.
    Returns x_next = x - dt * v, u_next = x_next + e_next (the next encoder input, in z1's dtype; None on the
    last step), and the pooled teacher estimate mean_{H,W}(p * z1 + q * v) of shape (B, C), always formed and
    returned in fp32: VP/VE coefficients reach |p|, |q| ~ 10^2-10^3, and a 16-bit product would lose the
    estimate to rounding (autocast leaves elementwise ops in their inputs' dtype).
    """
    x_next = x - dt * v
    u_next = None if e_next is None else cast(x_next + e_next[:, :, None, None], z1.dtype)
    pooled = (p * fp32(z1) + q * fp32(v)).mean(dim=(2, 3))
    return x_next, u_next, pooled


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; a no-op (and no node in a traced graph) when it already is."""
    return t if t.dtype == dtype else t.to(dtype)



@dataclass
class SamplerOutput:
    pooled_estimates: list  # N tensors (B, C): pooled teacher estimate of each step
    velocities: list | None  # N tensors (B, C, H, W) when asked for (feature transfer regresses them)
    final_state: torch.Tensor  # (B, C, H, W): x after the last step
    estimates: list | None = None  # N tensors (B, C, H, W) fp32: each step's estimate p Z1 + q v, when asked for

    def mean_pooled(self) -> torch.Tensor:
        return torch.stack(self.pooled_estimates, 0).mean(0)


def apply_head(head: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """The linear head S on pooled features (B, C), fed in the head's own dtype (the estimates are fp32; a
    ``.half()`` model's head is fp16; under autocast the weight is fp32 and autocast casts both)."""
    weight = getattr(head, "weight", None)
    return head(pooled if weight is None else cast(pooled, weight.dtype))


def time_embeddings(time_embed: nn.Module, steps: Sequence[StepConstants], ref: torch.Tensor) -> torch.Tensor:
    """(N, C) embeddings e(t_i) of all steps in one call, in ref's dtype and device.

    A module with a ``precomputed`` (N, C) table (export's constant embedding) returns it as is: no host tensor is
    built per call, so the graph has no host-to-device copy (CUDA-graph capture refuses one)."""
    table = getattr(time_embed, "precomputed", None)
    if table is not None:
        return table.to(ref.dtype)
    return time_embed(step_times(time_embed, steps, ref.device)).to(ref.dtype)


def step_times(owner: nn.Module, steps: Sequence[StepConstants], device) -> torch.Tensor:
    """The (N,) times t_i on ``device``, made once per (steps, device) and kept on ``owner``: a host-to-device
    copy per call would break a captured CUDA graph (and costs a sync each step)."""
    key = (tuple(c.t for c in steps), str(device))
    cache = owner.__dict__.setdefault("_step_times", {})
    if key not in cache:
        cache[key] = torch.tensor(key[0], dtype=torch.float32, device=device)
    return cache[key]


def run_sampler(
    z1: torch.Tensor,
    encoder: nn.Module,
    time_embed: nn.Module,
    steps: Sequence[StepConstants],
    *,
    return_velocities: bool = False,
    step_fn: StepFn | None = None,
    return_estimates: bool = False,
) -> SamplerOutput:
    """Run the Euler loop from Z1 (B, C, H, W); see the module docstring. Nothing is detached.

    The Euler state x is kept in fp32 whatever Z1's dtype, so K steps do not accumulate 16-bit rounding, and the
    estimates are formed in fp32; the encoder's input u is cast to Z1's dtype (what autocast would feed it anyway).
    """
    step_fn = step_fn or euler_step_reference
    x = fp32(z1)
    emb = time_embeddings(time_embed, steps, x)  # (N, C)
    u = cast(x + emb[0][None, :, None, None], z1.dtype)  # the encoder runs in Z1's dtype (a .half() model: fp16)
    pooled, velocities = [], [] if return_velocities else None
    maps = [] if return_estimates else None
    for i, c in enumerate(steps):
        v = encoder(u)
        e_next = emb[i + 1][None, :] if i + 1 < len(steps) else None
        x, u, est = step_fn(x, v, z1, e_next, c.dt, c.p, c.q)
        pooled.append(est)
        if return_velocities:
            velocities.append(v)
        if return_estimates:
            maps.append(c.p * fp32(z1) + c.q * fp32(v))
    return SamplerOutput(pooled_estimates=pooled, velocities=velocities, final_state=x, estimates=maps)
