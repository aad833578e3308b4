"""The checks of a detection run (``task: detection``), before any work: names against the registries, the
detectors, the sizes, the student's backbone weights (``detection.backbone_weights``: the file fits its backbone body,
key for key) and the dataset's files. fmkt.commands' ``check_config`` hands a detection config here and
stamps it with the :class:`DetectionInfo` returned, as it stamps a classification config with its DatasetInfo.

Without ``data.dir`` the dataset is the Fashion-MNIST canvases (fmkt.detection.canvas, the defaults of
``fmkt-cli make-detection-data``), built once into the cache beside the teachers (``$FMKT_CACHE/canvases``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

from fmkt.errors import FmktError
from fmkt.names import DETECTION_METHOD_NAMES

# classification-only keys a detection run would silently ignore: refused while set (their defaults here)
CLASSIFICATION_KEYS = {"data.name": "digits", "data.holdout": None, "data.train_subset": None,
                       "data.test_subset": None, "data.mixup": 0.0, "data.cutmix": 0.0, "data.augment_policy": None,
                       "data.reprob": 0.0, "data.repeated_aug": 0, "data.eval_batch_size": 256, "method.loss": "dist",
                       "method.eval_steps": [1, 2, 4, 8], "method.encoder_params": {}, "student_options": {},
                       "teacher.options": {}, "teacher.key_map": {}}
MIN_SIDE = 32  # the smallest input side: the deepest FPN level (stride 64 or 128) still has a map


@dataclass(frozen=True)
class DetectionInfo:
    """Where a detection run's data is: ``root`` with its two splits, ``name`` (fmkt.json's dataset name: the
    root's folder name, or ``canvases``); ``build``: the cached canvases, not made yet (the run makes them)."""

    root: Path
    train_split: str
    val_split: str
    name: str
    build: bool = False


def canvases_root() -> Path:
    """The default detection dataset's folder: ``canvases`` in fmkt's cache ($FMKT_CACHE, else ~/.cache/fmkt)."""
    from fmkt.commands import cache_dir

    return cache_dir().parent / "canvases"


def check_detection(cfg) -> DetectionInfo:
    """Every name, size and file a detection run needs, checked up front; returns where its data is."""
    from fmkt.distillers import check_name
    from fmkt.flow.encoders import ENCODERS
    from fmkt.flow.schedules import SCHEDULES
    from fmkt.logs import LOGGERS, check_logger
    from fmkt.optim import LR_SCHEDULES, OPTIMIZERS

    check_name(cfg.method.name, DETECTION_METHOD_NAMES, "method.name")
    for value, registry, key in [(cfg.optim.name, OPTIMIZERS, "optim.name"),
                                 (cfg.optim.scheduler, LR_SCHEDULES, "optim.scheduler"),
                                 (cfg.train.log, LOGGERS, "train.log"),
                                 (cfg.method.encoder, ENCODERS, "method.encoder"),
                                 (cfg.method.schedule, SCHEDULES, "method.schedule")]:
        check_name(value, registry, key)
    check_logger(cfg.train.log)
    _check_classification_keys(cfg)
    _check_detection_section(cfg.detection)
    check_detector(cfg.student, "student")
    _check_backbone_weights(cfg)
    if cfg.method.name != "none" and not (cfg.teacher.path and (Path(cfg.teacher.path) / "fmkt.json").is_file()):
        check_detector(cfg.teacher.arch, "teacher.arch")  # a teacher artifact names its own detector
    return _data_info(cfg)


def _check_classification_keys(cfg) -> None:
    for key, default in CLASSIFICATION_KEYS.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value != default:
            raise FmktError(f"{key} is a classification key that --task detection does not use; leave it unset "
                            "(the detection keys are the config's detection section: fmkt/detection/config.py).")


def _check_detection_section(d) -> None:
    from fmkt.detection.fpn_flow import feature_loss

    feature_loss(d.loss)
    if d.min_size < MIN_SIDE or d.max_size < d.min_size:
        raise FmktError(f"detection.min_size is {d.min_size} and detection.max_size {d.max_size}: expected "
                        f"min_size >= {MIN_SIDE} and max_size >= min_size (the loader resizes images to min_size).")
    if d.refine_steps < 1 or d.eval_batch_size < 1:
        raise FmktError(f"detection.refine_steps (the flow's Euler steps at inference) and detection.eval_batch_size "
                        f"must be >= 1, got {d.refine_steps} and {d.eval_batch_size}.")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
               for w in d.weights):
        raise FmktError(f"detection.weights must be numbers >= 0, one per FPN level (0 turns a level off), got "
                        f"{d.weights!r}.")
    for f in fields(d):
        if f.name.endswith("_split") and not str(getattr(d, f.name)).strip():
            raise FmktError(f"detection.{f.name} is empty; name the split (train / val, or train2017 / val2017).")


def _check_backbone_weights(cfg) -> None:
    """detection.backbone_weights: the file fits the student's backbone body, trainable_backbone_layers its stages."""
    from fmkt.detection.config import DetectionConfig

    d = cfg.detection
    if d.backbone_weights is None:
        if d.trainable_backbone_layers != DetectionConfig.trainable_backbone_layers:
            raise FmktError("detection.trainable_backbone_layers applies only with detection.backbone_weights (a "
                            "student from scratch trains every layer); set the file or leave the key unset.")
        return
    from fmkt.detection.backbone import check_backbone_weights

    check_backbone_weights(cfg.student, d.backbone_weights, d.trainable_backbone_layers, min_size=d.min_size,
                           max_size=d.max_size, **cfg.student_kwargs)


def check_detector(name: str, key: str) -> None:
    """``name`` is a registered detector or an importable ``pkg.module:factory``, else one sentence."""
    from fmkt.detection.models import DETECTORS
    from fmkt.import_paths import is_import_path, resolve

    if is_import_path(name):
        resolve(name, f"detector factory ({key})")
        return
    if name not in DETECTORS:
        flag = "--student" if key == "student" else "--teacher-model"
        raise FmktError(f"{key} {name!r} is not a detector, and --task detection trains detectors: pass {flag} "
                        f"with one of {', '.join(DETECTORS)} or pkg.module:factory.")


def _data_info(cfg) -> DetectionInfo:
    d = cfg.detection
    if cfg.data.dir is None:
        root = canvases_root()
        made = all((root / "annotations" / f"instances_{s}.json").is_file() for s in (d.train_split, d.val_split))
        if {d.train_split, d.val_split} != {"train", "val"}:
            raise FmktError(f"the default detection data (the canvases) has splits train and val, not "
                            f"{d.train_split} and {d.val_split}; pass --data-dir ROOT for other splits.")
        return DetectionInfo(root, d.train_split, d.val_split, "canvases", build=not made)
    root = Path(cfg.data.dir)
    for split in (d.train_split, d.val_split):
        annotations = root / "annotations" / f"instances_{split}.json"
        if not annotations.is_file() or not (root / split).is_dir():
            raise FmktError(f"--data-dir {root} has no COCO split {split!r} ({annotations} and the image folder "
                            f"{root / split}): write one with `fmkt-cli make-detection-data {root}`, or point "
                            "--data-dir at a COCO root and set detection.train_split / detection.val_split (COCO "
                            "2017: train2017 / val2017).")
    return DetectionInfo(root, d.train_split, d.val_split, root.resolve().name)


def describe(cfg, epochs: int) -> str:
    """The title of a detection run's result table."""
    what = f"{cfg.student} on {Path(cfg.data.dir).resolve().name if cfg.data.dir else 'canvases'}, {epochs} epochs"
    if cfg.method.name == "fmkt":
        m, d = cfg.method, cfg.detection
        return f"fmkt ({d.loss}, {m.encoder}, {m.schedule}, K={d.refine_steps}): {what}"
    return f"{cfg.method.name}: {what}"

