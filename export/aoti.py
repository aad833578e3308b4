"""AOTInductor: ``torch.export`` the static module (dynamic batch) and compile it into a ``.pt2`` package,
loadable with ``torch._inductor.aoti_load_package``. Compiled for the chosen device (CPU or CUDA).
FP16 casts the module to half inside and keeps float32 input and output; fp32 is IEEE fp32 (TF32 off while
compiling and validating).

Compiling and first loading a package run in a child process (:func:`run_in_child`): loading a CUDA package
segfaulted the whole process with torch 2.11 on an H100, so a crash there must end as one sentence, not as a dead
``fmkt-cli export`` or ``bench``. ``python -m fmkt.export.aoti TASK JSON`` is that child.
"""
from __future__ import annotations

import contextlib
import copy
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from fmkt.errors import FmktError
from fmkt.runtime import strict_fp32

# torch releases whose AOTInductor CUDA packages crash the loading process: on an H100 (CUDA 13.0) torch 2.11.0
# segfaults in aoti_load_package for a plain 6-layer torch CNN too (scripts/gpu_numerics.py; BENCHMARKS.md), so
# it is torch's, not our graph's. FMKT_AOTI_CUDA=1 tries anyway (the crash stays isolated in the child).
CRASHING_CUDA_TORCH = ("2.11.",)
PHASES = ("compiled", "loaded", "ran")  # what the child prints as it goes, so a crash can say where it happened


def cuda_refusal(device: torch.device) -> str | None:
    """Why AOTInductor on ``device`` is refused with this torch (None: go ahead)."""
    import os

    if device.type != "cuda" or os.environ.get("FMKT_AOTI_CUDA") == "1":
        return None
    if torch.__version__.startswith(CRASHING_CUDA_TORCH):
        return (f"AOTInductor CUDA packages crash the process that loads them with torch {torch.__version__} "
                "(a plain torch CNN segfaults the same way, so it is torch's bug); use --format onnx or trt, "
                "--device cpu for AOTI, another torch release, or set FMKT_AOTI_CUDA=1 to try anyway")
    return None


class HalfPrecision(nn.Module):
    """float32 images -> module in float16 -> float32 logits."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = copy.deepcopy(module).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.half()).float()


class ChildCrashed(RuntimeError):
    """The AOTInductor child process ended with a signal or a non-zero exit (the message says which and where)."""


def precision_context(precision: str):
    return strict_fp32() if precision == "fp32" else contextlib.nullcontext()


def export_aoti(module: nn.Module, example: torch.Tensor, package_path: Path, batch: tuple, precision: str,
                device: torch.device) -> dict:
    """Compile ``module`` for batches batch[0]..batch[2] of example's (C, H, W); write ``package_path``."""
    module = (HalfPrecision(module) if precision == "fp16" else module).to(device).eval()
    example = example.to(device)
    dim = torch.export.Dim("batch", min=max(1, batch[0]), max=max(batch[2], 2))
    with torch.no_grad(), precision_context(precision):
        program = torch.export.export(module, (example,), dynamic_shapes=({0: dim},))
        torch._inductor.aoti_compile_and_package(program, package_path=str(package_path))
    return {"torch": torch.__version__, "device": str(device), "tf32": precision != "fp32"}


def load_aoti(package_path: Path, device: torch.device, precision: str = "fp32"):
    runner = torch._inductor.aoti_load_package(str(package_path))

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), precision_context(precision):
            return runner(images.to(device).float()).float().cpu()

    return run


def graph_module(artifact: str, graph: str, device: torch.device) -> nn.Module:
    """The static module of ``artifact`` to compile: ``graph`` is "student" (the student alone) or K."""
    from fmkt.artifact import load_artifact
    from fmkt.export.graph import StudentAlone, static_module

    model, meta = load_artifact(artifact)
    model = model.to(device)
    if graph == "student":
        return StudentAlone(model).eval()
    return static_module(model, int(graph), meta.get("method"))


def child_main(task: str, args: dict) -> None:
    """The child process: compile ``args["graph"]`` of the artifact into the package and/or load it and run it."""
    dev = torch.device(args["device"])
    shape = tuple(args["shape"])
    package = Path(args["package"])
    if task in ("compile", "validate"):
        example = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))
        export_aoti(graph_module(args["artifact"], args["graph"], dev), example, package, tuple(args["batch"]),
                    args["precision"], dev)
        print("fmkt-aoti: compiled", flush=True)
    if task == "compile":
        return
    run = load_aoti(package, dev, args["precision"])
    print("fmkt-aoti: loaded", flush=True)
    if task == "load":
        out = run(torch.rand((2, *shape), generator=torch.Generator().manual_seed(0)))
        if not torch.isfinite(out).all():
            raise SystemExit("the compiled package returned non-finite logits")
    else:
        images = torch.load(args["images"], weights_only=True)
        torch.save({b: run(images[:b]) for b in args["batches"]}, args["outputs"])
    print("fmkt-aoti: ran", flush=True)


def run_in_child(task: str, *, artifact: str | Path, graph: str, package: Path, batch: tuple, precision: str,
                 device: torch.device, shape: tuple, images: torch.Tensor | None = None,
                 batches: list[int] | None = None, timeout: float = 1800) -> dict | None:
    """Run ``task`` (compile | load | validate) in a child process; ``validate`` returns {batch: logits (B, K)}
    of the package on images[:batch]. A crash raises :class:`ChildCrashed` naming the signal."""
    args = {"artifact": str(artifact), "graph": str(graph), "package": str(package), "batch": list(batch),
            "precision": precision, "device": str(device), "shape": list(shape)}
    with tempfile.TemporaryDirectory(prefix="fmkt-aoti-") as tmp:
        if task == "validate":
            args.update(images=str(Path(tmp) / "images.pt"), outputs=str(Path(tmp) / "outputs.pt"),
                        batches=sorted(set(batches or [])))
            torch.save(images.contiguous(), args["images"])
        cmd = [sys.executable, "-X", "faulthandler", "-m", "fmkt.export.aoti", task, json.dumps(args)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ChildCrashed(f"AOTInductor {task} took over {timeout / 60:.0f} minutes in a child process") from None
        if proc.returncode != 0:
            raise ChildCrashed(f"AOTInductor {task} for {device.type} in a child process ended with "
                               f"{describe_exit(proc.returncode)} {_phase(task, proc.stdout or '')}"
                               + _cause(proc))
        if task == "validate":
            return torch.load(args["outputs"], weights_only=True)
    return None


def describe_exit(code: int) -> str:
    """'signal 11 (SIGSEGV)' for a child killed by a signal, else 'exit code N'."""
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _phase(task: str, stdout: str) -> str:
    """Where the child was when it died, from the phase markers it printed."""
    done = [p for p in PHASES if f"fmkt-aoti: {p}" in stdout]
    if task != "load" and "compiled" not in done:
        return "while compiling"
    if "loaded" not in done:
        return "while loading the compiled package"
    return "while running the loaded package"


def _cause(proc) -> str:
    """The child's own error line (Python's 'Fatal Python error: ...', or the last '...Error: ...'), never a
    warning; '' when it printed none."""
    lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.startswith("Fatal Python error")]
    errors = [ln for ln in lines if "Error" in ln.split(":")[0] and "Warning" not in ln]
    found = (fatal or errors)[-1:] if (fatal or errors) else []
    return f" ({found[0][:200]})" if found else ""


def write_export(job) -> list:
    """The aoti format (formats.EXPORT_FORMATS): model.pt2 compiled for ``job.device`` and its parity, all in a child
    process, whose logits are replayed here. A child that crashes is one sentence (FmktError), nothing written."""
    sizes = sorted(set(min(b, len(job.images)) for b in job.batches))
    try:
        outputs = run_in_child("validate", artifact=job.artifact, graph=str(job.steps), package=job.tmp / "model.pt2",
                               batch=job.bounds, precision=job.precision, device=job.device,
                               shape=tuple(job.images.shape[1:]), images=job.images, batches=sizes)
    except ChildCrashed as exc:
        raise FmktError(f"{exc}; nothing was written: torch {torch.__version__} cannot compile or run this AOTI "
                        f"package on {job.device.type} here, so use --format onnx or trt (or --device cpu for AOTI)."
                        ) from None
    job.meta["aoti"] = {"torch": torch.__version__, "device": str(job.device), "tf32": job.precision != "fp32",
                        "compiled_in": "a child process (a crash there cannot take this process down)"}
    job.files["aoti"] = "model.pt2"
    return [job.parity(lambda x: outputs[len(x)], f"AOTInductor ({job.device.type})")]


if __name__ == "__main__":
    child_main(sys.argv[1], json.loads(sys.argv[2]))
