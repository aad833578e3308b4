"""The captured training step: the step body, the non-finite guard and the optimiser step as one CUDA graph.

FM-KT's step is launch-bound on a GPU (N meta-encoder steps of small kernels, forward and backward): replaying
one graph removes the host's launch cost. PyTorch's whole-network capture (``torch.cuda.graph``):

- the first ``WARMUP`` steps (from the epoch the method's step stops changing, :meth:`Method.steady_from`) are
  ordinary eager steps on a side stream (cuDNN and the allocator settle, the optimiser creates its buffers);
- then :func:`fmkt.step.forward_backward` (the one step body, the eager step's too) is captured once on static
  input buffers, gradients set to None first so the graph owns them, followed by the optimiser step;
- every later step copies its batch into the static buffers and replays the graph. The learning rate is a
  one-element tensor on the GPU that the LR schedule fills (fmkt.optim), so the schedule still moves every step.

What a graph freezes: every Python number the step reads at capture time. So the capture refuses an optimiser
whose LR is a Python number (fmkt.optim.graph_refusal, with its reason) and a method whose step is decided on the
host per iteration (each method says why: :meth:`fmkt.distillers.Method.capture_refusal`; this file names none).
A non-finite loss sets a sticky flag inside the graph that the fused optimiser reads (``found_inf``): from that step
on every replay leaves the weights as they were, and the engine raises when it next reads the losses.

The capture runs in ``thread_local`` mode: the image-folder loader's pin-memory thread allocates pinned memory
and queries events while the main thread captures, which the default ``global`` mode treats as an error that
invalidates the capture (pytorch/pytorch#174724).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fmkt.errors import first_line
from fmkt.optim import graph_refusal
from fmkt.step import forward_backward, train_step

WARMUP = 3  # eager steps before the capture (PyTorch's recipe uses a few on a side stream)
MODES = ("auto", "on", "off")
# What ``auto`` does on CUDA: capture the step where the refusals allow it (shown correct and faster on an
# H100: BENCHMARKS.md, "Fast training"), and keep in-memory datasets on the GPU.
AUTO_CAPTURE = True
CAPTURE_ERROR_MODE = "thread_local"  # other threads (the pin-memory thread) may call CUDA during the capture


@dataclass(frozen=True)
class FastPath:
    """What a run does on the GPU: keep its data there, capture its step (from ``steady_from``), and why."""

    on_gpu: bool
    capture: bool
    line: str
    steady_from: float = 0.0


def capture_refusal(cfg, device: torch.device, world: int, method) -> str | None:
    """Why the captured step cannot run this configuration (None: it can). ``method``: the METHODS entry."""
    if device.type != "cuda":
        return "the captured step needs CUDA"
    if world > 1:
        return "DDP runs the eager step (its gradient hooks are not captured here)"
    return method.capture_refusal(cfg.method)


def fast_path_plan(mode: str, cfg, device: torch.device, world: int, method) -> FastPath:
    """The run's fast path, decided before the models are built (the kernel and the data placement follow it)."""
    if mode == "off" or device.type != "cuda":
        why = "--set train.fast_path=off" if mode == "off" else "the fast path is for CUDA"
        return FastPath(False, False, f"fast path: off ({why})")
    refusal = capture_refusal(cfg, device, world, method)
    if refusal is None and (mode == "on" or AUTO_CAPTURE):
        start = method.steady_from(cfg.method)
        when = f" from epoch {start + 1:g} (the method's step changes until then)" if start > 0 else ""
        return FastPath(True, True, f"fast path: data on the GPU, training step captured as one CUDA graph{when}",
                        start)
    why = refusal or "not shown faster here"
    return FastPath(True, False, f"fast path: data on the GPU, eager training step ({why})")


def make_step(run, plan: FastPath):
    """The run's step, ``(images, labels, progress) -> losses``: the captured step where ``plan`` and the built
    optimiser allow it, else the eager one. The one place that decides."""
    clip = run.cfg.optim.clip_grad
    eager = EagerStep(run.model, run.optimizer, run.scheduler, run.amp, clip)
    if not plan.capture:
        return eager
    refusal = graph_refusal(run.optimizer)
    if refusal is not None:
        run.console.print(f"fast path: eager training step ({refusal})", highlight=False)
        return eager
    return CapturedStep(run.model, run.optimizer, run.scheduler, run.amp, clip, start=plan.steady_from,
                        say=lambda line: run.console.print(line, highlight=False))


class EagerStep:
    """The eager step (fmkt.step.train_step) with the run's model, optimiser, scheduler, precision and gradient
    clipping (optim.clip_grad, 0: none)."""

    def __init__(self, model, optimizer, scheduler, amp: bool, clip: float = 0.0):
        self.model, self.optimizer, self.scheduler, self.amp, self.clip = model, optimizer, scheduler, amp, clip

    def __call__(self, images, labels, progress: float = 0.0) -> dict:
        return train_step(self.model, self.optimizer, self.scheduler, images, labels, progress, self.amp, self.clip)


class CudaGraphs:
    """What the captured step needs from CUDA (tests/graph_emulator.py plays this part on the CPU)."""

    @contextmanager
    def side_stream(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, body):
        """Record ``body()`` as a graph (nothing runs now); ``graph.replay()`` runs it."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode=CAPTURE_ERROR_MODE):
            body()
        return graph

    def synchronize(self) -> None:
        torch.cuda.synchronize()


class CaptureRefused(RuntimeError):
    """The optimiser is not fit for a graph (fmkt.optim.graph_refusal's reason)."""


class CapturedStep(EagerStep):
    """``step(images, labels, progress) -> losses`` with the eager step's contract (the losses are the graph's
    static output tensors: read them before the next call). ``start``: the fractional epoch from which the step is
    captured (eager before); ``say``: where the one line goes if the capture fails (then every step is eager)."""

    def __init__(self, model, optimizer, scheduler, amp: bool, clip: float = 0.0, *, start: float = 0.0, say=print,
                 graphs=None):
        super().__init__(model, optimizer, scheduler, amp, clip)
        self.start, self.say, self.graphs = start, say, graphs or CudaGraphs()
        self.graph = None
        self.warm = 0  # eager steps taken since ``start`` (WARMUP of them before the capture)
        self.failed = None  # why the capture failed (then every step is eager); None while it works

    def __call__(self, images, labels, progress: float = 0.0) -> dict:
        if self.failed or progress < self.start:
            return super().__call__(images, labels, progress)
        if self.graph is None:
            if self.warm < WARMUP:
                self.warm += 1
                with self.graphs.side_stream():
                    return super().__call__(images, labels, progress)
            try:
                self._record(images, labels, progress)  # records the step; the replay below runs it
            except RuntimeError as exc:  # an op this torch cannot capture, or the optimiser's refusal
                self.graph, self.failed = None, first_line(exc)
                self.graphs.synchronize()
                self.say(f"fast path: the step could not be captured ({self.failed}); training eagerly")
                return super().__call__(images, labels, progress)
        self.static_images.copy_(images, non_blocking=True)
        self.static_labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        if self.scheduler is not None:
            self.scheduler.step()  # fills the LR tensor the graph reads
        return self.static_losses

    def _record(self, images, labels, progress: float) -> None:
        refusal = graph_refusal(self.optimizer)
        if refusal is not None:
            raise CaptureRefused(refusal)
        self.static_images, self.static_labels = images.clone(), labels.clone()
        self.found_inf = torch.zeros((), device=images.device)  # 1 from the first non-finite loss on: sticky
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.found_inf = self.found_inf  # the fused step reads it: a no-op while it is 1
        try:
            self.graph = self.graphs.capture(lambda: self._body(progress))
        finally:
            del self.optimizer.found_inf  # recorded into the graph; eager steps must not see it

    def _body(self, progress: float) -> None:
        self.static_losses = forward_backward(self.model, self.static_images, self.static_labels, progress,
                                              self._flag_nonfinite, self.amp, cache_enabled=False, clip=self.clip)
        self.optimizer.step()

    def _flag_nonfinite(self, loss: torch.Tensor) -> None:
        """The captured step's guard, on the device: found_inf becomes 1 at the first non-finite loss and stays."""
        nonfinite = torch.logical_not(torch.isfinite(loss.detach())).to(self.found_inf.dtype)
        self.found_inf.copy_(torch.maximum(self.found_inf, nonfinite))
