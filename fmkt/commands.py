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
from fmkt.checkpoint import CHECKPOINT
from fmkt.config import Config, DataConfig, MethodConfig
from fmkt.models.timm_backbone import TIMM_OPTIONS, check_timm_name, is_timm
from fmkt.data import data_options, dataset_info, is_folder, load_dataset
from fmkt.data.deit_aug import check_augmentation
from fmkt.distillers import METHODS, check_method
from fmkt.engine import FitResult, evaluation_split, fit, load_data, student_spec
from fmkt.errors import FmktError
from fmkt.evaluation import eval_keys, evaluate, evaluated_images
from fmkt.files import check_output_dir
from fmkt.import_paths import is_import_path, resolve
from fmkt.logs import LOGGERS, check_logger
from fmkt.optim import LR_SCHEDULES, OPTIMIZERS
from fmkt.runtime import FP32, distributed, env_rank, resolve_device
from fmkt.student import TRANSFERS, build_student
from fmkt.teacher import load_teacher


# --------------------------------------------------------------------------------------------- checks
def _check_name(value, allowed, key: str) -> None:
    if value not in allowed:
        raise FmktError(f"unknown {key.split('.')[-1]} {value!r} ({key}); choose one of {', '.join(allowed)}.")


def check_method_names(m: MethodConfig) -> None:
    """The method section's names against their registries (the Python API checks its MethodConfig here too)."""
    from fmkt.flow.encoders import ENCODERS
    from fmkt.flow.schedules import SCHEDULES
    from fmkt.losses import LOGIT_LOSSES, LOSSES, build_metric_loss

    method = check_method(m.name)
    _check_name(m.encoder, ENCODERS, "method.encoder")
    _check_name(m.schedule, SCHEDULES, "method.schedule")
    _check_name(m.loss, LOSSES, "method.loss")
    _check_name(m.transfer, TRANSFERS, "method.transfer")
    if m.transfer == "features" and not method.features:
        allowed = ", ".join(n for n, x in METHODS.items() if x.features)
        raise FmktError(f"method.transfer=features works with method {allowed} only (method {m.name!r} distills "
                        "logits: theta's head and OFM-KT's ensemble target are logits); use method.transfer=logits "
                        "or --method fmkt.")
    loss = method.options.get("loss_name", m.loss if method.flow else None)  # the D the method builds, if any
    if m.logit_standardization and (m.transfer == "features" or (loss and loss not in LOGIT_LOSSES)):
        what = "method.transfer=features" if m.transfer == "features" else f"method.loss={loss}"
        raise FmktError(f"method.logit_standardization works with the softmax logit losses ({', '.join(LOGIT_LOSSES)}) "
                        f"only, not with {what}; turn it off or choose one of them (with method.transfer=logits).")
    if loss:  # the parameters of the D the method builds, up front (before any teacher is trained)
        if "standardize" in m.loss_params:
            raise FmktError("method.loss_params.standardize is not a loss parameter; logit standardization is "
                            "method.logit_standardization: true.")
        build_metric_loss(loss, standardize=m.logit_standardization, **m.loss_params)


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
    against their registries, models and datasets, and an import-path model's dry run. Returns ``cfg``."""
    from fmkt.kernels import KERNEL_MODES
    from fmkt.models.adapter import create_backbone

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
    return cfg


def configure(config_file: str | None, overrides: list[dict]) -> Config:
    """The CLI's config: file and overrides parsed (fmkt.config.build_config), then every name checked."""
    from fmkt.config import build_config

    return check_config(build_config(config_file, overrides))


def describe(cfg: Config, epochs: int) -> str:
    """The title of a run's result table."""
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


def teacher_cache_key(t: Config) -> str:
    data = {k: v for k, v in t.data.__dict__.items()
            if k != "workers" and not (k in _LATER_DATA_KEYS and v == _LATER_DATA_KEYS[k])}
    relevant = {"student": t.student, "data": data, "optim": t.optim.__dict__,
                **({"student_options": t.student_options} if t.student_options else {}),
                **({"student_kwargs": t.student_kwargs} if t.student_kwargs else {}),
                "epochs": t.train.epochs, "seed": t.train.seed}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def obtain_teacher(cfg: Config, console: Console):
    """Load cfg.teacher.path, or train the default teacher once and reuse it from the cache."""
    data = dataset_info(cfg.data.name, cfg.data.dir, **data_options(cfg.data))
    device = resolve_device(cfg.train.device)
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
        fit(dataclasses.replace(t, out=str(folder)), console=console)
    return load_teacher(artifact, arch=t.student, **common)


def teacher_evaluation(teacher, cfg: Config) -> dict:
    """fmkt.json's teacher accuracy keys: top-1 % on the images the student is evaluated on (``load_data``'s: the
    held-out training images under data.holdout), the split's description and the images scored."""
    _, test, _ = load_data(cfg)
    device = resolve_device(cfg.train.device)
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
    cfg = check_config(dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name="none")))
    with distributed(cfg.train.device):
        return fit(cfg, resume=resume, console=_rank_console(console))


def run_distill(cfg: Config, *, resume: bool = False, console: Console | None = None) -> FitResult:
    """Distill cfg.student from cfg.teacher (or the cached default teacher); DDP under torchrun.

    Under torchrun every rank trains the missing default teacher together (rank 0 writes it to the cache, the
    others wait at a barrier), then every rank loads the same frozen copy.
    """
    check_config(cfg)
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
    if is_import_path(cfg.student):  # a student FM-KT cannot use is refused before a teacher is trained
        build_student(student_spec(cfg, dataset_info(cfg.data.name, cfg.data.dir, **data_options(cfg.data))))
    teacher, record = None, None
    if METHODS[cfg.method.name].needs_teacher:
        teacher, record = obtain_teacher(cfg, console)
        record.update(teacher_evaluation(teacher, cfg))
    elif cfg.teacher.path:
        console.print(f"note: method {cfg.method.name!r} uses no teacher; ignoring {cfg.teacher.path}")
    return fit(cfg, teacher=teacher, teacher_info=record, resume=resume, console=console)


def run_eval(artifact: str, data: str | None, data_dir: str | None, steps: list[int], batch_size: int = 256,
             device: str = "auto") -> dict:
    """Top-1 % of an artifact at each K on the test split of ``data`` (default: the artifact's own dataset)."""
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
    """``load_dataset`` for ``eval``: an image folder at the artifact's input size, from ``--data-dir`` or the
    folder its fmkt.json records, with the same classes (by name) as the artifact was trained on."""
    if not is_folder(name):
        return load_dataset(name, data_dir)
    folder = data_dir or recorded.get("dir")
    if folder is None:
        raise FmktError("eval of an imagefolder artifact needs --data-dir ROOT (its fmkt.json records no folder).")
    train, test, found = load_dataset(name, folder, image_size=spec["input"]["size"][0])
    names = recorded.get("class_names")
    if names and list(found.class_names) != list(names):
        raise FmktError(f"the class folders of {folder}/val are not the {len(names)} classes the artifact was trained "
                        "on (by name and order); evaluate on a folder with the same classes.")
    return train, test, found


def skipped_steps(model, steps, method: str | None) -> dict:
    """{K: why} for each requested K this model cannot be evaluated at (so no K is dropped without a word)."""
    if not model.is_flow:
        return {}  # one output whatever K: its row is "student"
    return {str(k): f"K=0 is the FM-KT^Theta head, and this artifact was trained with method {method or 'unknown'}, "
                    "not theta" for k in steps if k == 0 and model.theta_head is None}
