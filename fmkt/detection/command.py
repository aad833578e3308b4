"""What `fmkt-cli distill`, `train` and `eval` do for detection (fmkt.commands dispatches on ``task`` and on a
detection artifact): the data (the cached canvases made first when no ``--data-dir`` is given), the teacher, the
run (fmkt.detection.run), and the evaluation of a detection artifact.

The teacher: ``--teacher PATH`` (a detection artifact folder, or a state-dict file of ``teacher.arch`` under
torchvision's key names, e.g. torchvision's COCO weights); without one, the default teacher is trained first like
the classification default teacher: ``teacher.arch`` alone (method none) for ``teacher.epochs`` at ``teacher.lr``
(cosine, no warm-up), same data and seed, cached in ``$FMKT_CACHE/teachers/detection-ARCH-KEY`` and reused; from
scratch always (``detection.backbone_weights`` is the student's, and leaves the teacher's key as it was).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch.distributed as dist

from fmkt.checkpoint import check_start
from fmkt.detection.artifact import is_detector_artifact, load_detector_artifact, refined_steps
from fmkt.detection.checks import DetectionInfo
from fmkt.detection.coco import open_coco
from fmkt.detection.run import detect, evaluate_map, fit
from fmkt.errors import FmktError
from fmkt.runtime import FP32, rank_and_world, resolve_device

EVAL_BATCH = 8  # the most images per batch `fmkt-cli eval` runs a detector on (up to 1000 proposals per image)


def ensure_data(info: DetectionInfo, console) -> None:
    """Make the default canvases (``make_detection_data``'s defaults) when the cache has none; rank 0 writes them,
    the other ranks wait."""
    if info.build:
        if rank_and_world()[0] == 0:
            from fmkt.detection.canvas import make_detection_data

            console.print(f"data: no --data-dir given; making the Fashion-MNIST canvases in {info.root} (once)")
            make_detection_data(info.root, overwrite=True)
        if rank_and_world()[1] > 1:
            dist.barrier()


def load_splits(info: DetectionInfo, console) -> tuple:
    """(train, val) CocoSplits, their bad annotations said in a line per kind; the same categories in both."""
    train, val = (open_coco(info.root, split) for split in (info.train_split, info.val_split))
    for line in train.report.lines() + val.report.lines():
        console.print(line, highlight=False, soft_wrap=True)
    if train.cat_ids != val.cat_ids:
        raise FmktError(f"{train.annotation_file} and {val.annotation_file} list different categories: expected "
                        "the same category ids in both splits.")
    return train, val


def dataset_record(info: DetectionInfo, train, val) -> dict:
    """fmkt.json's ``dataset`` of a detection run (``root`` + ``split``: the evaluated split, as export's parity
    images and `fmkt-cli eval` read them)."""
    return {"name": info.name, "root": str(info.root.resolve()), "split": info.val_split,
            "train_split": info.train_split, "val_split": info.val_split, "num_classes": train.num_classes,
            "class_names": list(train.names),
            "category_ids": list(train.cat_ids), "train_images": len(train.train_indices), "val_images": len(val),
            "annotations": {"train": train.report.as_dict(), "val": val.report.as_dict()}}


def run_detection(cfg, info: DetectionInfo, *, resume: bool = False, console=None):
    """`fmkt-cli distill` (and `train`: method none) of a detection config, inside fmkt.commands' torchrun group:
    the data, the teacher (loaded, or trained once and cached; scored on the val split), then the run."""
    check_start(cfg.out, resume)  # before a teacher is trained, not after
    device = resolve_device(cfg.train.device)
    ensure_data(info, console)
    splits = load_splits(info, console)
    teacher, record = None, None
    if cfg.method.name != "none":
        teacher, record = obtain_teacher(cfg, info, splits, console, device)
        record.update(teacher_evaluation(teacher, cfg, splits[1], device))
    elif cfg.teacher.path:
        console.print(f"note: method 'none' uses no teacher; ignoring {cfg.teacher.path}")
    return fit(cfg, splits, dataset_record(info, *splits), teacher=teacher, teacher_info=record, resume=resume,
               console=console, device=device)


def teacher_cache_folder(cfg) -> tuple:
    """(the default teacher's config, its cache folder): the classification default teacher's config and key, plus
    what a detection teacher also depends on (the task's splits and sizes). ``detection.backbone_weights`` is the
    student's alone: the teacher starts from scratch, so its key is the same with or without the file."""
    from fmkt.commands import cache_dir, teacher_cache_key, teacher_config
    from fmkt.detection.config import DetectionConfig

    t = teacher_config(cfg)
    d = t.detection
    d.backbone_weights, d.trainable_backbone_layers = None, DetectionConfig.trainable_backbone_layers
    more = {"task": "detection", "train_split": d.train_split, "min_size": d.min_size, "max_size": d.max_size}
    key = hashlib.sha256(json.dumps([teacher_cache_key(t), more], sort_keys=True).encode()).hexdigest()[:16]
    return t, cache_dir() / f"detection-{t.student}-{key}".replace(":", "-")


def obtain_teacher(cfg, info: DetectionInfo, splits, console, device) -> tuple:
    """(the teacher detector on ``device``, fmkt.json's teacher record {"sha256", "arch", "source"})."""
    from fmkt.detection.models import create_detector
    from fmkt.teacher import teacher_sha256

    num_classes, d = splits[0].num_classes + 1, cfg.detection
    if cfg.teacher.path:
        path = Path(cfg.teacher.path)
        if is_detector_artifact(path):
            model, meta = load_detector_artifact(path)
            arch = meta["model"]["detector"]
            if meta["model"]["num_classes"] != num_classes:
                raise FmktError(f"teacher {path} detects {meta['model']['num_classes'] - 1} classes but the data has "
                                f"{num_classes - 1}: distill from a teacher of the same classes.")
        else:
            arch = cfg.teacher.arch
            model = create_detector(arch, num_classes, min_size=d.min_size, max_size=d.max_size, weights=path,
                                    **cfg.teacher.kwargs)
        return model.to(device), {"sha256": teacher_sha256(path), "arch": arch, "source": str(path)}
    t, folder = teacher_cache_folder(cfg)
    artifact = folder / "artifact"
    if is_detector_artifact(artifact):
        console.print(f"teacher: reusing {t.student} from {artifact}")
    else:
        console.print(f"teacher: no --teacher given; training {t.student} on {info.name} for {t.train.epochs} "
                      f"epochs (cached in {folder})")
        fit(dataclasses.replace(t, out=str(folder)), splits, dataset_record(info, *splits), console=console,
            device=device)
    model, _ = load_detector_artifact(artifact)
    return model.to(device), {"sha256": teacher_sha256(artifact), "arch": t.student, "source": str(artifact)}


def teacher_evaluation(teacher, cfg, val, device) -> dict:
    """fmkt.json's teacher mAP keys: COCO mAP on the val split the student is scored on."""
    return {"map": evaluate_map(teacher, val, cfg, device), "split": cfg.detection.val_split,
            "images_evaluated": len(val)}


def evaluate_artifact(artifact, data_dir, steps: list[int], batch_size: int = EVAL_BATCH, device="auto") -> dict:
    """`fmkt-cli eval` of a detection artifact: COCO mAP on the val split its fmkt.json records (``data_dir``: that
    split under another root), at each K of ``steps`` for a student with an FPN flow (K = 0 is skipped: the flow
    has no theta head), once for a plain detector. At most :data:`EVAL_BATCH` images per batch."""
    model, meta = load_detector_artifact(artifact)
    recorded, spec = meta.get("dataset") or {}, meta["model"]
    root = data_dir or recorded.get("root")
    if root is None:
        raise FmktError(f"artifact {artifact} records no dataset folder; pass --data-dir ROOT (a COCO-format root).")
    val = open_coco(root, recorded.get("split", "val"))
    if val.num_classes + 1 != spec["num_classes"] or list(val.cat_ids) != recorded.get("category_ids", val.cat_ids):
        raise FmktError(f"{val.annotation_file} has {val.num_classes} categories (ids {list(val.cat_ids)[:5]}...) but "
                        f"the artifact detects {spec['num_classes'] - 1}; evaluate on data with the same categories.")
    dev = resolve_device(device)
    model.to(dev)
    flow = refined_steps(model) > 0
    keys = [str(k) for k in steps if k >= 1] if flow else ["plain"]
    if not keys:
        raise FmktError(f"none of the steps {steps} can run on this artifact (its FPN flow needs K >= 1).")
    results = {}
    for key in keys:
        if flow:
            model.backbone.steps = int(key)
        results[key] = coco_map_of(model, val, spec["min_size"], min(batch_size, EVAL_BATCH), dev)
    skipped = {str(k): "K=0 is the FM-KT^Theta head, and a detection student's FPN flow has none"
               for k in steps if flow and k == 0}
    return {"artifact": str(artifact), "dataset": recorded.get("name", Path(root).name), "images": len(val),
            "map": results, "skipped": skipped, "precision": FP32, "meta": meta}


def coco_map_of(model, split, size: int, batch_size: int, device) -> dict:
    from fmkt.detection.coco_eval import coco_map

    return coco_map(split, detect(model, split, size, batch_size, device))
