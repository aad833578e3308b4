"""The composition root: what `fmkt-cli train`, `distill` and `eval` do, as plain functions, and the checks that
span stages (names against the registries, datasets, your factories' dry runs) before any work starts.

The CLI parses options into a Config (fmkt.config: types and ranges only), calls these, and prints.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path

from rich.console import Console

from fmkt.artifact import is_artifact, load_artifact
from fmkt.capture import MODES as FAST_PATH_MODES
from fmkt.checkpoint import check_start
from fmkt.config import Config, DataConfig
from fmkt.models.timm_backbone import TIMM_OPTIONS, check_timm_name, is_timm
from fmkt.data import data_options, dataset_info, recorded_splits
from fmkt.data.deit_aug import check_augmentation
from fmkt.detection.artifact import is_detector_artifact
from fmkt.distillers import METHODS, check_method_names, check_name as _check_name
from fmkt.engine import FitResult, evaluation_split, fit, load_data, student_spec
from fmkt.errors import FmktError
from fmkt.evaluation import eval_keys, evaluate, evaluated_images
from fmkt.import_paths import is_import_path, resolve
from fmkt.logs import LOGGERS, check_logger
from fmkt.names import TASK_NAMES
from fmkt.optim import LR_SCHEDULES, OPTIMIZERS
from fmkt.runtime import FP32, distributed, env_rank, resolve_device
from fmkt.student import build_student
from fmkt.teacher import load_teacher


# --------------------------------------------------------------------------------------------- checks
def check_models(cfg: Config) -> None:
    """Student and teacher architectures (zoo names, timm:NAME, import paths) and their option keys."""
    from fmkt.models import list_models
    from fmkt.models.adapter import ADAPTER_OPTIONS

    models = list_models()
    for value, key in [(cfg.student, "student"), (cfg.teacher.arch, "teacher.arch")]:
        if is_import_path(value):
            resolve(value, f"model factory ({key})")
        elif is_timm(value):
            check_timm_name(value, key)
        elif value not in models:
            raise FmktError(f"unknown model {value!r} ({key}); choose one of {', '.join(models)}, timm:NAME (any "
                            "timm model) or an import path pkg.module:factory.")
    for arch, options, key in [(cfg.student, cfg.student_options, "student_options"),
                               (cfg.teacher.arch, cfg.teacher.options, "teacher.options")]:
        valid = TIMM_OPTIONS if is_timm(arch) else ADAPTER_OPTIONS
        bad = sorted(set(options) - set(valid))
        if bad:
            raise FmktError(f"unknown config key '{key}.{bad[0]}'; valid keys here: {', '.join(valid)}.")


def check_config(cfg: Config) -> Config:
    """Every name and cross-stage fact, up front: methods, losses, encoders, schedules, optimisers and kernels
    against their registries, models and datasets, and an import-path model's dry run. Returns ``cfg``, stamped
    with what it found (:func:`checked_info` reads it, so a config is checked once)."""
    from fmkt.kernels import KERNEL_MODES
    from fmkt.models.adapter import create_backbone

    _check_name(cfg.task, TASK_NAMES, "task")
    if cfg.task == "detection":  # its own checks, stamped with where its data is (fmkt.detection.checks)
        from fmkt.detection.checks import check_detection

        cfg._checked = (_fingerprint(cfg), check_detection(cfg))
        return cfg
    check_method_names(cfg.method)
    _check_name(cfg.optim.name, OPTIMIZERS, "optim.name")
    _check_name(cfg.optim.scheduler, LR_SCHEDULES, "optim.scheduler")
    _check_name(cfg.train.kernel, KERNEL_MODES, "train.kernel")
    _check_name(cfg.train.fast_path, FAST_PATH_MODES, "train.fast_path")
    _check_name(cfg.train.log, LOGGERS, "train.log")
    check_logger(cfg.train.log)
    check_models(cfg)
    check_augmentation(cfg.data)
    data = dataset_info(cfg.data.name, cfg.data.dir, **data_options(cfg.data))
    for arch, options, kwargs in [(cfg.student, cfg.student_options, cfg.student_kwargs),
                                  (cfg.teacher.arch, cfg.teacher.options, cfg.teacher.kwargs)]:
        if is_import_path(arch) or is_timm(arch):  # the model is built and takes one dry-run batch, before any work
            create_backbone(arch, num_classes=data.num_classes, in_channels=data.in_channels,
                            input_size=data.image_size, options=options, check_head=False,
                            **{k: v for k, v in kwargs.items() if k != "pretrained"})
    cfg._checked = (_fingerprint(cfg), data)
    return cfg


def checked_info(cfg: Config):
    """The DatasetInfo :func:`check_config` found for ``cfg``; the check runs first unless this very config was
    checked and is unchanged since (the CLI's ``configure`` checks it, ``run_distill`` then does not again)."""
    stamp = getattr(cfg, "_checked", None)
    if stamp is None or stamp[0] != _fingerprint(cfg):
        check_config(cfg)
    return cfg._checked[1]


def _fingerprint(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def configure(config_file: str | None, overrides: list[dict]) -> Config:
    """The CLI's config: file and overrides parsed (fmkt.config.build_config), then every name checked."""
    from fmkt.config import build_config

    return check_config(build_config(config_file, overrides))


def describe(cfg: Config, epochs: int) -> str:
    """The title of a run's result table."""
    if cfg.task == "detection":
        from fmkt.detection.checks import describe as detection_title

        return detection_title(cfg, epochs)
    what = f"{cfg.student} on {cfg.data.name}, {epochs} epochs"
    if METHODS[cfg.method.name].flow:
        m = cfg.method
        return f"{m.name} ({m.loss}, {m.encoder}, {m.schedule}): {what}"
    return f"{cfg.method.name}: {what}"


# --------------------------------------------------------------------------------------------- teachers
def cache_dir() -> Path:
    """Where distill keeps the teachers it trains itself: $FMKT_CACHE, else ~/.cache/fmkt."""
    root = os.environ.get("FMKT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "fmkt")
    return Path(root) / "teachers"


def teacher_config(cfg: Config) -> Config:
    """The config of the default teacher: plain CE training of teacher.arch on the same data and seed (a new
    Config; ``cfg`` is left as it was)."""
    t = copy.deepcopy(cfg)
    t.student = cfg.teacher.arch
    t.student_options = dict(cfg.teacher.options)
    t.student_kwargs = dict(cfg.teacher.kwargs)
    t.method.name = "none"
    t.method.label_smoothing = 0.0
    t.optim.lr = cfg.teacher.lr
    t.train.epochs = cfg.teacher.epochs
    t.optim.scheduler, t.optim.milestones, t.optim.warmup_epochs = "cosine", [], 0.0
    t.teacher.path = None
    return t


# data keys added after teachers were first cached: left out of the key at their defaults (so a cached teacher keeps
# its key), and data.workers always (it never changes what is trained)
_LATER_DATA_KEYS = {"holdout": None, "image_size": DataConfig.image_size, "mean": [], "std": [],
                    "decode": DataConfig.decode, "augment_policy": None, "reprob": 0.0, "repeated_aug": 0,
                    "mixup": 0.0, "cutmix": 0.0}
# the same for the optim keys added later (DeiT's solver)
_LATER_OPTIM_KEYS = {"warmup_start": 0.0, "min_lr": 0.0, "no_decay": False, "clip_grad": 0.0}


def teacher_cache_key(t: Config) -> str:
    data = {k: v for k, v in t.data.__dict__.items()
            if k != "workers" and not (k in _LATER_DATA_KEYS and v == _LATER_DATA_KEYS[k])}
    optim = {k: v for k, v in t.optim.__dict__.items() if not (k in _LATER_OPTIM_KEYS and v == _LATER_OPTIM_KEYS[k])}
    relevant = {"student": t.student, "data": data, "optim": optim,
                **({"student_options": t.student_options} if t.student_options else {}),
                **({"student_kwargs": t.student_kwargs} if t.student_kwargs else {}),
                "epochs": t.train.epochs, "seed": t.train.seed}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def obtain_teacher(cfg: Config, console: Console, *, info=None, device=None, splits=None):
    """Load cfg.teacher.path, or train the default teacher once and reuse it from the cache. ``info``, ``device``
    and ``splits`` (``load_data(cfg)``'s): what the caller found already (else found here)."""
    data = dataset_info(cfg.data.name, cfg.data.dir, **data_options(cfg.data)) if info is None else info
    device = resolve_device(cfg.train.device) if device is None else device
    common = dict(num_classes=data.num_classes, in_channels=data.in_channels, mean=data.mean, std=data.std,
                  device=device, input_size=data.image_size)
    if cfg.teacher.path:
        return load_teacher(cfg.teacher.path, arch=cfg.teacher.arch, options=cfg.teacher.options,
                            key_map=cfg.teacher.key_map, arch_kwargs=cfg.teacher.kwargs, **common)
    t = teacher_config(cfg)
    folder = cache_dir() / f"{t.data.name}-{t.student}-{teacher_cache_key(t)}".replace(":", "-")
    artifact = folder / "artifact"
    if is_artifact(artifact):
        console.print(f"teacher: reusing {t.student} from {artifact}")
    else:
        console.print(f"teacher: no --teacher given; training {t.student} on {t.data.name} for "
                      f"{t.train.epochs} epochs (cached in {folder})")
        same = t.data == cfg.data and t.train.seed == cfg.train.seed  # what load_data reads: the same splits
        fit(dataclasses.replace(t, out=str(folder)), console=console, device=device, splits=splits if same else None)
    return load_teacher(artifact, arch=t.student, **common)


def teacher_evaluation(teacher, cfg: Config, *, device=None, splits=None) -> dict:
    """fmkt.json's teacher accuracy keys: top-1 % on the images the student is evaluated on (``load_data``'s: the
    held-out training images under data.holdout), the split's description and the images scored."""
    _, test, _ = load_data(cfg) if splits is None else splits
    device = resolve_device(cfg.train.device) if device is None else device
    accuracy = evaluate(teacher, test, ["plain"], cfg.data.eval_batch_size, device)["plain"]
    return {"accuracy": accuracy, "split": evaluation_split(cfg), **evaluated_images(test)}


def teacher_accuracy(teacher, cfg: Config) -> float:
    return teacher_evaluation(teacher, cfg)["accuracy"]


# --------------------------------------------------------------------------------------------- commands
def _rank_console(console: Console | None) -> Console:
    """The given console on rank 0 (or a plain process); a silent one on the other torchrun ranks."""
    if env_rank()[0] != 0:
        return Console(stderr=True, quiet=True)
    return console or Console(stderr=True)


def run_train(cfg: Config, *, resume: bool = False, console: Console | None = None) -> FitResult:
    """Plain supervised training of cfg.student (a teacher, or a student alone); DDP under torchrun."""
    if cfg.method.name != "none":  # a changed config is checked again; the CLI's (method none) was checked already
        cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name="none"))
    info = checked_info(cfg)
    with distributed(cfg.train.device):
        if cfg.task == "detection":
            from fmkt.detection.command import run_detection

            return run_detection(cfg, info, resume=resume, console=_rank_console(console))
        return fit(cfg, resume=resume, console=_rank_console(console))


def run_distill(cfg: Config, *, resume: bool = False, console: Console | None = None) -> FitResult:
    """Distill cfg.student from cfg.teacher (or the cached default teacher); DDP under torchrun.

    Under torchrun every rank trains the missing default teacher together (rank 0 writes it to the cache, the
    others wait at a barrier), then every rank loads the same frozen copy.
    """
    info = checked_info(cfg)  # checked once: a config from ``configure`` is not checked again
    console = _rank_console(console)
    with distributed(cfg.train.device):
        if cfg.task == "detection":  # its run: fmkt.detection (the same loop, checkpoint, optimiser and logs)
            from fmkt.detection.command import run_detection

            return run_detection(cfg, info, resume=resume, console=console)
        return _distill(cfg, resume, console, info)


def _distill(cfg: Config, resume: bool, console: Console, info) -> FitResult:
    """The walk: the device resolved once and the data loaded once, for the teacher (trained, or loaded and
    scored) and the run alike."""
    check_start(cfg.out, resume)  # before a teacher is trained, not after
    device = resolve_device(cfg.train.device)
    if cfg.train.kernel == "triton":  # refuse before a teacher is trained, not after
        from fmkt.kernels import install_step_kernel

        install_step_kernel(None, "triton", device)
    if is_import_path(cfg.student):  # a student FM-KT cannot use is refused before a teacher is trained
        build_student(student_spec(cfg, info))
    teacher, record, splits = None, None, load_data(cfg)
    if METHODS[cfg.method.name].needs_teacher:
        teacher, record = obtain_teacher(cfg, console, info=info, device=device, splits=splits)
        record.update(teacher_evaluation(teacher, cfg, device=device, splits=splits))
    elif cfg.teacher.path:
        console.print(f"note: method {cfg.method.name!r} uses no teacher; ignoring {cfg.teacher.path}")
    return fit(cfg, teacher=teacher, teacher_info=record, resume=resume, console=console, device=device,
               splits=splits)


def run_eval(artifact: str, data: str | None, data_dir: str | None, steps: list[int], batch_size: int = 256,
             device: str = "auto") -> dict:
    """Top-1 % of an artifact at each K on the test split of ``data`` (default: the artifact's own dataset); a
    detection artifact's COCO mAP on its val split (fmkt.detection.command.evaluate_artifact)."""
    if is_detector_artifact(artifact):
        from fmkt.detection.command import evaluate_artifact

        return evaluate_artifact(artifact, data_dir, steps, batch_size, device)
    model, meta = load_artifact(artifact)
    name = data or meta.get("dataset", {}).get("name")
    if not name:
        raise FmktError(f"artifact {artifact} does not record its dataset; pass --data.")
    spec, recorded = meta["model"], meta.get("dataset") or {}
    _, test, found = eval_split(name, data_dir, spec, recorded if name == recorded.get("name") else {})
    if found.num_classes != spec["num_classes"] or found.in_channels != spec["input"]["channels"]:
        raise FmktError(f"dataset {name} has {found.num_classes} classes and {found.in_channels} channels, but the "
                        f"artifact expects {spec['num_classes']} and {spec['input']['channels']}.")
    dev = resolve_device(device)
    keys = eval_keys(model, steps)
    if model.is_flow and not keys:
        raise FmktError(f"none of the steps {steps} can run on this artifact (K=0 needs a theta head).")
    acc = evaluate(model.to(dev), test, keys, batch_size, dev)
    return {"artifact": str(artifact), "dataset": name, "images": len(test), "top1": acc,
            "skipped": skipped_steps(model, steps, meta.get("method")), "precision": FP32, "meta": meta}


def eval_split(name: str, data_dir: str | None, spec: dict, recorded: dict):
    """``load_dataset`` for ``eval`` as the artifact records its data (:func:`fmkt.data.recorded_splits`): at its
    input size (in-memory images resized as training resized them, ``data.image_size``; an image folder's crop), from
    ``--data-dir`` or the folder its fmkt.json records, with the classes (by name and order) it was trained on."""
    return recorded_splits(name, data_dir, spec["input"]["size"], recorded)


def skipped_steps(model, steps, method: str | None) -> dict:
    """{K: why} for each requested K this model cannot be evaluated at (so no K is dropped without a word)."""
    if not model.is_flow:
        return {}  # one output whatever K: its row is "student"
    return {str(k): f"K=0 is the FM-KT^Theta head, and this artifact was trained with method {method or 'unknown'}, "
                    "not theta" for k in steps if k == 0 and model.theta_head is None}
