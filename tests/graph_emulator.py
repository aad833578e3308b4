"""A CUDA graph on the CPU, for testing the captured training step where no GPU is lent.

:class:`HostGraphs` plays fmkt.capture.CudaGraphs' part. Its capture runs the step body once under a
TorchDispatchMode that records every aten op with its arguments (tensors by reference, Python numbers by value),
then undoes the body's writes (a CUDA capture runs nothing); a replay runs the recorded ops again and writes each
result into the tensor the capture produced. So it keeps what a CUDA graph does to a training step:

- every Python number the body read at capture time is frozen (an LR held as a float stays the captured one; an LR
  tensor is read at every replay);
- tensors created during the capture are static buffers, rewritten by each replay (losses, gradients);
- a read of a tensor on the host inside the capture (``.item()``, ``bool(t)``) fails, as
  ``cudaErrorStreamCaptureUnsupported`` does, and so does a random draw (a host generator is not replayed).

It does not model CUDA's own limits (memory pools, what a kernel may do during capture, other threads' calls):
scripts/gpu_check.sh runs the same tests on a GPU for those.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.item.default}


class CaptureError(RuntimeError):
    """What CUDA would refuse inside a capture."""


def _tensors(value) -> list:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []
        self.produced: set = set()  # ids of the tensors the recorded ops made (kept alive by self.ops)
        # id -> (tensor, its value before the capture): every tensor the body read that it did not make (weights,
        # buffers, optimiser state, inputs), since some ops write arguments their schema does not mark as written
        # (native_batch_norm's running statistics)
        self.before: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            raise CaptureError(f"{func} reads a tensor on the host inside the capture (a device sync)")
        if torch.Tag.nondeterministic_seeded in func.tags:
            raise CaptureError(f"{func} draws random numbers inside the capture")
        for t in _tensors((args, kwargs)):
            if id(t) not in self.produced:
                self.before.setdefault(id(t), (t, t.detach().clone()))
        out = func(*args, **kwargs)
        self.produced.update(id(t) for t in _tensors(out))
        self.ops.append((func, args, kwargs, out))
        return out


class EmulatedGraph:
    """The recorded ops of one capture; :meth:`replay` runs them again into the same output tensors."""

    def __init__(self, ops: list):
        self.ops = ops
        self.replays = 0

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                if func.is_view:  # its output aliases its input: nothing to recompute
                    continue
                result = func(*args, **kwargs)
                for o, r in zip(_tensors(out), _tensors(result)):
                    if o is not r and o.untyped_storage().data_ptr() != r.untyped_storage().data_ptr():
                        o.copy_(r)
        self.replays += 1


class HostGraphs:
    """fmkt.capture.CudaGraphs' interface on the CPU (see the module docstring)."""

    def __init__(self):
        self.captures = 0

    def side_stream(self):
        return nullcontext()

    def capture(self, body) -> EmulatedGraph:
        recorder = _Recorder()
        try:
            with recorder:
                body()
        finally:  # a capture runs nothing: undo what the recording wrote
            with torch.no_grad():
                for t, value in recorder.before.values():
                    t.copy_(value)
        self.captures += 1
        return EmulatedGraph(recorder.ops)

    def synchronize(self) -> None:
        pass
