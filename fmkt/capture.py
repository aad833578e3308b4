"""The captured training step: forward, losses, backward and the optimiser step as one CUDA graph.

FM-KT's step is launch-bound on a GPU (N meta-encoder steps of small kernels, forward and backward): replaying
one graph removes the host's launch cost. PyTorch's whole-network capture (``torch.cuda.graph``):

- the first ``WARMUP`` steps of a run are ordinary eager steps on a side stream (cuDNN and the allocator settle,
  the optimiser creates its momentum buffers), so they train exactly as the eager path does;
- then the step is captured once on static input buffers, gradients set to None first so the graph owns them;
- every later step copies its batch into the static buffers and replays the graph. The learning rate is a
  one-element tensor on the GPU (fused SGD/AdamW read it there), so the LR schedule still moves every step.

It steps aside, with the reason (:func:`capture_refusal`), where a step is not the same computation every time:
training steps drawn per iteration, the Dirac ratio (a fresh permutation per batch), DKD's warm-up (a factor that
changes with the epoch), DDP, and anything but CUDA. The engine prints the reason once.
"""
from __future__ import annotations

import torch

from fmkt.step import NonFiniteLoss, autocast, train_step

WARMUP = 3  # eager steps before the capture (PyTorch's recipe uses a few on a side stream)
MODES = ("auto", "on", "off")
# What ``auto`` does on CUDA: capture the step where capture_refusal allows it (shown correct and faster on an
# H100: BENCHMARKS.md, "Fast training"), and keep in-memory datasets on the GPU.
AUTO_CAPTURE = True


def fast_path_plan(mode: str, cfg, device: torch.device, world: int, method) -> tuple[bool, bool, str]:
    """(keep the data on the GPU, capture the step, one line saying what and why) for a run."""
    if mode == "off" or device.type != "cuda":
        why = "--set train.fast_path=off" if mode == "off" else "the fast path is for CUDA"
        return False, False, f"fast path: off ({why})"
    refusal = capture_refusal(cfg, device, world, method)
    if refusal is None and (mode == "on" or AUTO_CAPTURE):
        return True, True, "fast path: data on the GPU, training step captured as one CUDA graph"
    why = refusal or "not shown faster here"
    return True, False, f"fast path: data on the GPU, eager training step ({why})"


def capture_refusal(cfg, device: torch.device, world: int, method) -> str | None:
    """Why the captured step cannot run this configuration (None: it can). ``method``: the METHODS entry."""
    if device.type != "cuda":
        return "the captured step needs CUDA"
    if world > 1:
        return "DDP runs the eager step (its gradient hooks are not captured here)"
    if len(cfg.method.train_step_choices()) > 1:
        return "method.train_steps draws N per iteration, so every step is another graph"
    if method.flow and cfg.method.dirac_ratio < 1.0:
        return "the Dirac ratio draws a new permutation on the host every step"
    dkd = cfg.method.name == "dkd" or (method.flow and cfg.method.loss == "dkd")
    if dkd and cfg.method.dkd_warmup_epochs > 0:
        return "DKD's warm-up factor changes with the epoch (set method.dkd_warmup_epochs=0 to capture)"
    return None


class CapturedStep:
    """``step(images, labels) -> losses`` with the same contract as ``engine.train_step`` (the losses are the
    graph's static output tensors: read them before the next call). Build with the model, optimiser, LR scheduler
    (stepped eagerly, it fills the optimiser's LR tensor) and whether bf16 autocast is on."""

    def __init__(self, model, optimizer, scheduler, amp: bool):
        self.model, self.optimizer, self.scheduler, self.amp = model, optimizer, scheduler, amp
        self.graph = None
        self.steps = 0
        self.failed = None  # why the capture failed (then every step is eager); None while it works

    def _eager(self, images, labels, progress):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            losses = train_step(self.model, self.optimizer, self.scheduler, images, labels, progress, self.amp)
        torch.cuda.current_stream().wait_stream(stream)
        return losses

    def _capture(self, images, labels, progress):
        self.static_images, self.static_labels = images.clone(), labels.clone()
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            with autocast(self.amp, cache_enabled=False):
                _, losses = self.model(self.static_images, self.static_labels, progress)
            self.static_loss = sum(losses.values())
            self.static_loss.backward()
            self.optimizer.step()
        self.static_losses = losses

    def __call__(self, images, labels, progress: float = 0.0) -> dict:
        self.steps += 1
        if self.steps <= WARMUP or self.failed:
            return self._eager(images, labels, progress)
        if self.graph is None:
            try:
                self._capture(images, labels, progress)  # records the step; the replay below runs it
            except RuntimeError as exc:  # an op this torch cannot capture: the eager step, said once
                self.graph, self.failed = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                torch.cuda.synchronize()
                return self._eager(images, labels, progress)
        self.static_images.copy_(images, non_blocking=True)
        self.static_labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        if not bool(torch.isfinite(self.static_loss)):  # the graph already stepped; the run stops here
            raise NonFiniteLoss(self.static_loss.item())
        if self.scheduler is not None:
            self.scheduler.step()  # fills the LR tensor the graph reads
        return self.static_losses
