"""What the CLI commands do, as plain functions: train, distill (with the cached default teacher), eval."""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from rich.console import Console

from fmkt.artifact import load_artifact, is_artifact
from fmkt.config import Config
from fmkt.data import dataset_info, load_dataset
from fmkt.distillers import check_method
from fmkt.engine import (CHECKPOINT, FitResult, build_student, check_output_dir, distributed, env_rank, eval_keys,
                         evaluate, fit, resolve_device)
from fmkt.errors import FmktError
from fmkt.imports import is_import_path
from fmkt.runtime import FP32
from fmkt.teacher import load_teacher


def cache_dir() -> Path:
    """Where distill keeps the teachers it trains itself: $FMKT_CACHE, else ~/.cache/fmkt."""
    root = os.environ.get("FMKT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "fmkt")
    return Path(root) / "teachers"


def teacher_config(cfg: Config) -> Config:
    """The config of the default teacher: plain CE training of teacher.arch on the same data and seed."""
    t = copy.deepcopy(cfg)
    t.student = cfg.teacher.arch
    t.student_options = dict(cfg.teacher.options)
    t.method.name = "none"
    t.method.label_smoothing = 0.0
    t.optim.lr = cfg.teacher.lr
    t.train.epochs = cfg.teacher.epochs
    t.optim.scheduler, t.optim.milestones, t.optim.warmup_epochs = "cosine", [], 0.0
    t.teacher.path = None
    return t


def teacher_cache_key(t: Config) -> str:
    relevant = {"student": t.student, "data": t.data.__dict__, "optim": t.optim.__dict__,
                **({"student_options": t.student_options} if t.student_options else {}),
                "epochs": t.train.epochs, "seed": t.train.seed}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def obtain_teacher(cfg: Config, console: Console):
    """Load cfg.teacher.path, or train the default teacher once and reuse it from the cache."""
    info = dataset_info(cfg.data.name, cfg.data.dir)
    device = resolve_device(cfg.train.device)
    if cfg.teacher.path:
        return load_teacher(cfg.teacher.path, arch=cfg.teacher.arch, num_classes=info.num_classes,
                            in_channels=info.in_channels, mean=info.mean, std=info.std, device=device,
                            input_size=info.image_size, options=cfg.teacher.options, key_map=cfg.teacher.key_map)
    t = teacher_config(cfg)
    folder = cache_dir() / f"{t.data.name}-{t.student}-{teacher_cache_key(t)}".replace(":", "-")
    artifact = folder / "artifact"
    if is_artifact(artifact):
        console.print(f"teacher: reusing {t.student} from {artifact}")
    else:
        console.print(f"teacher: no --teacher given; training {t.student} on {t.data.name} for "
                      f"{t.train.epochs} epochs (cached in {folder})")
        t.out = str(folder)
        fit(t, console=console)
    return load_teacher(artifact, arch=t.student, num_classes=info.num_classes, in_channels=info.in_channels,
                        mean=info.mean, std=info.std, device=device, input_size=info.image_size)


def teacher_accuracy(teacher, cfg: Config) -> float:
    _, test, _ = load_dataset(cfg.data.name, cfg.data.dir)
    if cfg.data.test_subset:
        test = test.subset(cfg.data.test_subset, seed=0)
    device = resolve_device(cfg.train.device)
    return evaluate(teacher, test, ["plain"], cfg.data.eval_batch_size, device)["plain"]


def _rank_console(console: Console | None) -> Console:
    """The given console on rank 0 (or a plain process); a silent one on the other torchrun ranks."""
    if env_rank()[0] != 0:
        return Console(stderr=True, quiet=True)
    return console or Console(stderr=True)


def run_train(cfg: Config, *, resume: bool = False, console: Console | None = None) -> FitResult:
    """Plain supervised training of cfg.student (a teacher, or a student alone); DDP under torchrun."""
    cfg.method.name = "none"
    with distributed(cfg.train.device):
        return fit(cfg, resume=resume, console=_rank_console(console))


def run_distill(cfg: Config, *, resume: bool = False, console: Console | None = None) -> FitResult:
    """Distill cfg.student from cfg.teacher (or the cached default teacher); DDP under torchrun.

    Under torchrun every rank trains the missing default teacher together (rank 0 writes it to the cache, the
    others wait at a barrier), then every rank loads the same frozen copy.
    """
    console = _rank_console(console)
    with distributed(cfg.train.device):
        return _distill(cfg, resume, console)


def _distill(cfg: Config, resume: bool, console: Console) -> FitResult:
    if env_rank()[0] == 0:
        check_output_dir(cfg.out)  # before a teacher is trained, not after
    if resume and not (Path(cfg.out) / CHECKPOINT).is_file():
        raise FmktError(f"--resume was given but {Path(cfg.out) / CHECKPOINT} does not exist; "
                        "run without --resume to start fresh.")
    if cfg.train.kernel == "triton":  # refuse before a teacher is trained, not after
        from fmkt.kernels import install_step_kernel

        install_step_kernel(None, "triton", resolve_device(cfg.train.device))
    needs_teacher, _, _ = check_method(cfg.method.name)
    if is_import_path(cfg.student):  # a student FM-KT cannot use is refused before a teacher is trained
        build_student(cfg, dataset_info(cfg.data.name, cfg.data.dir))
    teacher, tinfo = None, None
    if needs_teacher:
        teacher, tinfo = obtain_teacher(cfg, console)
        tinfo["accuracy"] = teacher_accuracy(teacher, cfg)
    elif cfg.teacher.path:
        console.print(f"note: method {cfg.method.name!r} uses no teacher; ignoring {cfg.teacher.path}")
    return fit(cfg, teacher=teacher, teacher_info=tinfo, resume=resume, console=console)


def run_eval(artifact: str, data: str | None, data_dir: str | None, steps: list[int], batch_size: int = 256,
             device: str = "auto") -> dict:
    """Top-1 % of an artifact at each K on the test split of ``data`` (default: the artifact's own dataset)."""
    model, meta = load_artifact(artifact)
    name = data or meta.get("dataset", {}).get("name")
    if not name:
        raise FmktError(f"artifact {artifact} does not record its dataset; pass --data.")
    _, test, info = load_dataset(name, data_dir)
    spec = meta["model"]
    if info.num_classes != spec["num_classes"] or info.in_channels != spec["input"]["channels"]:
        raise FmktError(f"dataset {name} has {info.num_classes} classes and {info.in_channels} channels, but the "
                        f"artifact expects {spec['num_classes']} and {spec['input']['channels']}.")
    dev = resolve_device(device)
    keys = eval_keys(model, steps)
    if model.is_flow and not keys:
        raise FmktError(f"none of the steps {steps} can run on this artifact (K=0 needs a theta head).")
    acc = evaluate(model.to(dev), test, keys, batch_size, dev)
    return {"artifact": str(artifact), "dataset": name, "images": len(test), "top1": acc,
            "skipped": skipped_steps(model, steps, meta.get("method")), "precision": FP32, "meta": meta}


def skipped_steps(model, steps, method: str | None) -> dict:
    """{K: why} for each requested K this model cannot be evaluated at (so no K is dropped without a word)."""
    if not model.is_flow:
        return {}  # one output whatever K: its row is "student"
    return {str(k): f"K=0 is the FM-KT^Theta head, and this artifact was trained with method {method or 'unknown'}, "
                    "not theta" for k in steps if k == 0 and model.theta_head is None}


def versions() -> dict:
    """Versions of the stack and the devices, for `fmkt-cli info` and benchmark files."""
    import platform

    from fmkt import __version__

    out = {"fmkt": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count()}
    for mod in ("triton", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:  # absent or broken: say why
            out[mod] = f"absent ({type(exc).__name__}: {str(exc)[:80]})"
    try:
        import onnxruntime

        out["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:
        pass
    try:
        import tensorrt

        out["tensorrt"] = tensorrt.__version__
    except Exception as exc:
        out["tensorrt"] = (f"absent ({type(exc).__name__}: {str(exc)[:80]}); install the NVIDIA TensorRT "
                           "Python package on a CUDA machine for --format trt")
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else "not available"
    out["devices"] = ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return out
