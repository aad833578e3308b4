"""fmkt.kernels: Triton fast paths of the flow step, each with its pure-torch reference twin.

- ``euler_step.py``: the fused per-step update x_next, u_next, pooled estimate (forward + backward), for every
  encoder and schedule; twin: ``fmkt.flow.sampler.euler_step_reference``.
- ``mlp_sampler.py``: all K steps of the per-pixel ``mlp`` encoder in one launch (inference); twin: the torch
  loop of ``run_sampler``.

Triton is optional: nothing here imports it until a kernel is asked for. ``install_step_kernel(model, mode)``
is the one switch: ``auto`` uses what was shown correct and faster on CUDA (the whole-sampler inference kernel;
the fused training step inside a captured step, see ``AUTO_STEP_KERNEL``) and the torch reference elsewhere, ``triton``
insists (on CPU only with ``TRITON_INTERPRET=1``, which runs the kernels in Triton's interpreter, slowly),
``torch`` never uses them. Kernels are never traced: under torch.compile, torch.export, ONNX export or
jit tracing the dispatchers take the torch path.
"""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch

from fmkt.errors import FmktError, first_line
from fmkt.flow.sampler import euler_step_reference

KERNEL_MODES = ("auto", "triton", "torch")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["KERNEL_MODES", "install_step_kernel", "kernel_summary", "kernel_unavailable_reason", "fused_euler_step",
           "fused_mlp_sampler", "interpret_requested", "triton_import_error"]


def on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU: Triton launches on the *current* device, which in a single process training on
    cuda:1 is still cuda:0 ("Pointer argument cannot be accessed from Triton"). A no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def interpret_requested() -> bool:
    """True when TRITON_INTERPRET asks Triton to run kernels on the CPU (read when the kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_import_error() -> str | None:
    """None when Triton and our kernel modules import; else why not, in a few words."""
    try:
        from fmkt.kernels import euler_step, mlp_sampler  # noqa: F401  (decorates the kernels)
    except Exception as exc:  # ImportError, or a broken install: either way the kernels are unusable
        return first_line(exc, None)
    return None


MIN_CAPABILITY = (8, 0)  # Triton's supported NVIDIA GPUs (its README: compute capability 8.0+), bf16 included


def kernel_unavailable_reason(device: torch.device | str) -> str | None:
    """None when the kernels can run on tensors of ``device``; else a short reason."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            return f"there is no {device} (CUDA sees {torch.cuda.device_count()} GPU(s))"
        cap = tuple(torch.cuda.get_device_capability(index))
        if cap < MIN_CAPABILITY:
            return (f"{device} has compute capability {cap[0]}.{cap[1]} and Triton needs "
                    f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer")
    elif device.type != "cpu" or not interpret_requested():
        return f"this run is on the {device.type.upper() if device.type == 'cpu' else device.type}"
    err = triton_import_error()
    if err:
        return f"Triton cannot be imported ({err})"
    if device.type == "cpu":
        from fmkt.kernels import euler_step

        if not euler_step.INTERPRETED:
            return "the kernels were imported before TRITON_INTERPRET=1 was set"
    return None


def _tracing() -> bool:
    compiler = getattr(torch, "compiler", None)
    for name in ("is_compiling", "is_exporting"):
        fn = getattr(compiler, name, None)
        if fn is not None and fn():
            return True
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def _kernel_runs_on(*tensors) -> bool:
    """The kernels take these tensors: one CUDA device (or CPU interpreted), float dtypes, not being traced."""
    first = tensors[0]
    if first.is_cuda:
        ok_device = all(t.device == first.device for t in tensors)
    elif first.device.type == "cpu":
        ok_device = interpret_requested() and all(t.device.type == "cpu" for t in tensors)
        if ok_device:
            from fmkt.kernels import euler_step

            ok_device = euler_step.INTERPRETED
    else:
        return False
    return ok_device and all(t.dtype in _DTYPES for t in tensors) and not _tracing()


def fused_euler_step(x, v, z1, e_next, dt: float, p: float, q: float):
    """A ``StepFn`` for run_sampler: the fused Triton step where it can run, else ``euler_step_reference``."""
    tensors = (x, v, z1) if e_next is None else (x, v, z1, e_next)
    if _kernel_runs_on(*tensors):
        from fmkt.kernels.euler_step import FusedEulerStep

        return FusedEulerStep.apply(x, v, z1, e_next, dt, p, q)
    return euler_step_reference(x, v, z1, e_next, dt, p, q)


def fused_mlp_sampler(z1: torch.Tensor, encoder, time_embed, steps: Sequence, transfer: str = "logits"):
    """Whole-sampler inference for the ``mlp`` encoder: the pooled features S needs (B, C), or None.

    None (the caller runs the torch loop) when gradients are on, the encoder is not the built-in MLPEncoder,
    or the kernel cannot run on z1. transfer: ``logits`` -> mean of the pooled step estimates; ``features``
    -> pooled final state.
    """
    if torch.is_grad_enabled() or not _kernel_runs_on(z1):
        return None
    from fmkt.kernels.mlp_sampler import mlp_sampler_forward, mlp_sampler_supported

    if not mlp_sampler_supported(encoder, z1.shape[1]):
        return None
    est, fin = mlp_sampler_forward(z1, encoder, time_embed, steps)
    return fin if transfer == "features" else est


# What ``auto`` turns on where the kernels can run (CUDA), from H100 measurements (BENCHMARKS.md): the fused
# training step inside a captured step (fmkt.capture), where it is 7-10 % faster end to end (11,476 vs 10,456
# img/s at batch 128); not in an eager step, where it was +15 % at batch 128 and -15 % at 512 (launch-bound: no
# reliable gain). The whole-sampler inference kernel (mlp encoder): 3.7x the eager loop at K = 8.
AUTO_STEP_KERNEL = "captured"  # "captured" | True | False
AUTO_SAMPLER_KERNEL = True


def install_step_kernel(model, mode: str = "auto", device: torch.device | str | None = None,
                        captured: bool = False) -> str:
    """Point ``model.step_fn`` / ``model.sampler_fn`` at the kernels (or at nothing: the torch reference).

    model: a DeployableModel (a plain model without a meta-encoder gets nothing; None only checks the mode). device:
    where it will run (default: its parameters' device); ``captured``: the training step will be a CUDA graph
    (fmkt.capture), where ``auto`` takes the fused step. Returns the training step's path, "triton" or "torch"
    (:func:`kernel_summary` says what was installed, and why). ``mode="triton"`` where the kernels cannot run
    raises FmktError; ``auto`` never does: it falls back to torch (CPU, old GPUs, no Triton) and says why in
    :func:`kernel_summary`.
    """
    if mode not in KERNEL_MODES:
        raise FmktError(f"unknown kernel {mode!r}; choose one of {', '.join(KERNEL_MODES)}.")
    if device is None and model is not None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device if device is not None else "cpu")
    step = sampler = False
    if mode == "triton":
        reason = kernel_unavailable_reason(device)
        if reason:
            raise FmktError(f"--kernel triton needs a CUDA GPU with Triton installed, but {reason}; use "
                            "--kernel auto (or torch), or set TRITON_INTERPRET=1 to run the kernels "
                            "interpreted on CPU (slow).")
        step = sampler = True
    elif mode == "auto" and device.type == "cuda":
        # CUDA only (the interpreter is for tests and --kernel triton): a CPU run never even imports Triton.
        ok = kernel_unavailable_reason(device) is None
        wanted = captured if AUTO_STEP_KERNEL == "captured" else bool(AUTO_STEP_KERNEL)
        step, sampler = ok and wanted, ok and AUTO_SAMPLER_KERNEL
    if getattr(model, "encoder", None) is not None:
        model.step_fn = fused_euler_step if step else None
        model.sampler_fn = fused_mlp_sampler if sampler else None
    return "triton" if step else "torch"


def kernel_summary(mode: str, device: torch.device | str, captured: bool = False) -> str:
    """One line for the run log: which flow-step implementation a run on ``device`` with ``mode`` uses, and why."""
    device = torch.device(device)
    if mode == "torch":
        return "kernels: torch (--kernel torch)"
    if mode == "triton":
        return "kernels: Triton fused step and whole-sampler inference (--kernel triton)"
    if device.type != "cuda":
        return "kernels: torch (the Triton kernels are for CUDA)"
    reason = kernel_unavailable_reason(device)
    if reason:
        return f"kernels: torch, because {reason}"
    if captured:
        return ("kernels: Triton fused step inside the captured training step (faster there), Triton whole-sampler "
                "inference for the mlp encoder")
    return ("kernels: torch training step (the fused Triton step is not reliably faster in an eager step; --kernel "
            "triton uses it), Triton whole-sampler inference for the mlp encoder")
