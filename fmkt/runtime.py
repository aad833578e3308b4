"""What every stage shares about the process it runs in: the device, torchrun DDP, seeds, numeric settings, and
the environment (versions and machine) that `fmkt-cli info`, bench and the benchmarks record.

The same code serves one process and ``torchrun`` (nanoGPT's way): under ``torchrun`` (``WORLD_SIZE`` > 1)
:func:`distributed` starts the process group (NCCL on CUDA, one GPU per ``LOCAL_RANK``; gloo on CPU).
"""
from __future__ import annotations

import os
import random
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from fmkt.errors import FmktError, first_line


def env_rank() -> tuple[int, int]:
    """(rank, world_size) as torchrun sets them in the environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def ddp_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if ddp_active() else (0, 1)


@contextmanager
def distributed(device_name: str = "auto"):
    """Under torchrun (WORLD_SIZE > 1) start the process group for the block and destroy it after; else nothing.

    NCCL with one GPU per LOCAL_RANK when training on CUDA, gloo on CPU. Nested uses (the default teacher is
    trained inside a distill run) share the outer group.
    """
    _, world = env_rank()
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    cuda = torch.cuda.is_available() and (device_name == "auto" or device_name.startswith("cuda"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a torch.device; under torchrun each process takes its LOCAL_RANK's GPU."""
    local = os.environ.get("LOCAL_RANK") if env_rank()[1] > 1 else None
    if name in ("auto", "cuda") and torch.cuda.is_available() and local is not None:
        return torch.device(f"cuda:{int(local)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FmktError(f"device {name!r} was asked for but CUDA is not available here; use --set train.device=cpu.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise FmktError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None


def sum_over_ranks(sums: dict, count: int, device) -> tuple[dict, int]:
    """({name: sum}, count) added up over every DDP rank (as they are without a process group)."""
    if not ddp_active():
        return sums, count
    names = sorted(sums)
    t = torch.tensor([sums[k] for k in names] + [count], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(names, t[:-1].tolist())), int(t[-1])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)

# What fmkt.json and export.json record for numbers measured under strict_fp32().
FP32 = "fp32 (IEEE; TF32 off)"


@contextmanager
def strict_fp32():
    """IEEE fp32 matmuls and convolutions for the block: TF32 off in cuBLAS and cuDNN (on by default for cuDNN
    convolutions on Ampere/Hopper, where it costs ~1e-3 of relative accuracy), restored afterwards. No effect on
    CPU math, nor on autocast regions (those run in 16 bits anyway)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# --------------------------------------------------------------------------------------------------- environment
# Packages whose version every result file records (None when absent; why in environment()["absent"]).
STACK = ("triton", "onnx", "onnxruntime", "onnxscript", "tensorrt")
_TRT_HINT = "install the NVIDIA TensorRT Python package on a CUDA machine for --format trt"


def environment(device: torch.device | str | None = None) -> dict:
    """The machine and the software stack, the one collector behind `fmkt-cli info`, bench JSON and benchmarks.

    ``device``: the device the numbers are measured on (None: CUDA when visible, else the CPU). Returns
    ``{"machine": {cpu, cores, torch_threads, platform, device[, gpu, cuda, driver]}, "versions": {fmkt, python,
    torch, cuda, triton, onnx, onnxruntime, onnxscript, tensorrt, onnxruntime_providers}, "absent": {package:
    why}, "devices": ["cpu", "cuda:0 NAME", ...]}``; a package that is absent or broken has version None."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    versions, absent = _stack_versions()
    gpus = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return {"machine": _machine(torch.device(device)), "versions": versions, "absent": absent,
            "devices": ["cpu"] + gpus}


def _machine(device: torch.device) -> dict:
    """CPU model, cores, torch threads, platform, the device; on CUDA also the GPU name, CUDA and driver version."""
    import os
    import platform

    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "device": device.type}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["driver"] = _nvidia_driver()
    return info


def _stack_versions() -> tuple[dict, dict]:
    """({package: version or None}, {absent package: why}) for fmkt, python, torch, CUDA and the STACK."""
    import platform

    from fmkt import __version__

    versions = {"fmkt": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda if torch.cuda.is_available() else None}
    absent = {}
    for name in STACK:
        try:
            versions[name] = __import__(name).__version__
        except Exception as exc:  # absent or broken: say why
            versions[name] = None
            absent[name] = first_line(exc, 80)
    if versions["onnxruntime"] is not None:
        versions["onnxruntime_providers"] = __import__("onnxruntime").get_available_providers()
    return versions, absent


def environment_rows(env: dict) -> dict:
    """The flat component -> version/state rows of `fmkt-cli info` (and benchmarks/accuracy.py's "versions")."""
    v, m = env["versions"], env["machine"]

    def state(name):
        if v.get(name) is not None:
            return v[name]
        why = f"absent ({env['absent'].get(name, 'not importable')})"
        return f"{why}; {_TRT_HINT}" if name == "tensorrt" else why

    rows = {"fmkt": v["fmkt"], "python": v["python"], "torch": v["torch"], "platform": m["platform"],
            "cpu": m["cpu"], "cpu_count": m["cores"]}
    rows.update({name: state(name) for name in ("triton", "onnx", "onnxruntime", "onnxscript")})
    if "onnxruntime_providers" in v:
        rows["onnxruntime_providers"] = v["onnxruntime_providers"]
    rows.update(tensorrt=state("tensorrt"), cuda=v["cuda"] or "not available", devices=env["devices"])
    return rows


def _cpu_model() -> str:
    import platform

    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
