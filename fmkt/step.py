"""One training step, the unit of work of every loop (fmkt.engine's, the Python API's, the captured fast path):
one body (:func:`forward_backward`: forward under bf16 autocast when asked, the loss sum, backward) that the eager
step wraps with a finite check on every rank and the optimiser and LR step, and fmkt.capture records as a graph."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

from fmkt.errors import FmktError
from fmkt.runtime import ddp_active


def autocast(amp: bool, cache_enabled: bool = True):
    """bf16 autocast on CUDA when ``amp`` (the CUDA-graph capture wants ``cache_enabled=False``), else nothing."""
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache_enabled) if amp else nullcontext()


class NonFiniteLoss(Exception):
    """The loss of a step was NaN or Inf (on any rank); nothing was updated."""

    def __init__(self, value: float):
        super().__init__(value)
        self.value = value


def nonfinite_loss(value: float, epoch: int, step: int, *, updated: bool, last_good=None) -> FmktError:
    """The one sentence for a NaN/Inf loss. Before any weight update the learning rate cannot be the cause, so
    that case names what can be (the data, the method's settings); afterwards a lower LR is the usual cure."""
    where = f"the loss became {value} at epoch {epoch + 1}, step {step + 1}"
    if not updated:
        return FmktError(f"{where}, before any weight update, so the learning rate is not the cause: check the "
                         "data (NaN/Inf in the images?) and the method's settings (schedule, loss, transfer).")
    return FmktError(f"{where}; stopped. The last good checkpoint is {last_good or 'none'}; try a lower --lr.")


def forward_backward(model, images, labels, progress: float, guard, amp: bool = False, cache_enabled: bool = True,
                     clip: float = 0.0):
    """The one step body: the method's losses (bf16 autocast when ``amp``), their sum, ``guard(loss)``, backward,
    and with ``clip`` > 0 the gradients' global norm clipped to it (optim.clip_grad; no host sync, so the captured
    step records it too). Returns the loss parts. The eager step (:func:`train_step`) and the captured one (fmkt.capture) both run exactly
    this; they differ in the guard (raise on a non-finite loss, or flag it for the fused optimiser inside the
    graph) and in what surrounds it (the optimiser and LR step)."""
    with autocast(amp, cache_enabled=cache_enabled):
        _, losses = model(images, labels, progress)
    loss = sum(losses.values())
    guard(loss)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
    return losses


def raise_if_nonfinite(loss: torch.Tensor) -> None:
    """The eager step's guard: NonFiniteLoss unless ``loss`` is finite on every rank (under DDP every rank stops
    together). A host sync."""
    finite = torch.isfinite(loss.detach()).float()
    if ddp_active():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        raise NonFiniteLoss(loss.item())


def train_step(model, optimizer, scheduler, images, labels, progress: float, amp: bool = False,
               clip: float = 0.0) -> dict:
    """One eager iteration: :func:`forward_backward` guarded by a finite check (every rank together under DDP),
    then the optimiser and LR step. ``model`` is a distiller (or its DDP wrapper); ``progress`` the fractional epoch;
    ``clip``: optim.clip_grad.
    Returns the loss parts (tensors); raises NonFiniteLoss before backward, so no weight is touched."""
    optimizer.zero_grad(set_to_none=True)
    losses = forward_backward(model, images, labels, progress, raise_if_nonfinite, amp, clip=clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return losses
