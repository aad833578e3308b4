"""One training step, the unit of work of every loop (fmkt.engine's, the Python API's, the captured fast path):
forward under bf16 autocast when asked, a finite check on every rank, backward, optimiser and LR step."""
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


def train_step(model, optimizer, scheduler, images, labels, progress: float, amp: bool = False) -> dict:
    """One iteration: the method's losses, a finite check (every rank together under DDP), backward, optimiser
    and LR step. ``model`` is a distiller (or its DDP wrapper); ``progress`` the fractional epoch. Returns the
    loss parts (tensors); raises NonFiniteLoss before touching any weight."""
    with autocast(amp):
        _, losses = model(images, labels, progress)
    loss = sum(losses.values())
    finite = torch.isfinite(loss.detach()).float()
    if ddp_active():  # every rank stops together
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        raise NonFiniteLoss(loss.item())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return losses
