"""The detection run (``task: detection``): fmkt.engine's pieces for a torchvision detector, on the shared epoch
loop (fmkt.loop via the engine's ``train_epoch``), checkpoint (``save_run`` / ``resume_run``), optimiser and LR
schedule (fmkt.optim, ``optim.clip_grad`` included), logs and output folder (the engine's ``open_outputs``):
prepare -> train_epoch -> :func:`end_epoch` (COCO mAP) -> :func:`finish` (the detection artifact).

:func:`fit` trains one config, a distillation or the default teacher's plain training, and writes OUT/config.yaml,
OUT/metrics.jsonl (a line per epoch; ``map``: AP, AP50, AP75, APs, APm, APl in percent, fmkt.detection.coco_eval),
OUT/checkpoint.pt and OUT/artifact (fmkt.detection.artifact: the deployable student, with its FPN flow at K =
``detection.refine_steps`` for fmkt; with ``detection.backbone_weights`` fmkt.json's ``backbone_weights`` names the
file and its sha256). The optimiser sees only the trainable parameters, so the stages a backbone file froze keep its
weights. What differs from the classification engine, and why:

* a batch is images ``(B, 3, S, S)`` and a list of per-image targets (:class:`Targets` moves as labels move);
* the step is always the eager one (fmkt.capture.EagerStep) in fp32: a CUDA graph needs static shapes and a
  detection step's vary (boxes per image, proposals kept), and bf16 autocast would decode the boxes in bf16;
* the evaluation is COCO mAP of the deployable student on ``detection.val_split``: each rank detects its share
  (DetectionLoader's rank r: images r, r + W, ...), every rank scores the gathered detections.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from rich.console import Console
from torch import nn

from fmkt.capture import EagerStep
from fmkt.checkpoint import resume_run, save_run
from fmkt.detection.artifact import detector_spec, save_detector_artifact
from fmkt.detection.backbone import weights_record, with_backbone_weights
from fmkt.detection.coco_eval import KEYS, coco_map, to_coco_results
from fmkt.detection.distiller import DetectionDistiller
from fmkt.detection.fpn_flow import FPNFlow, default_level_weights
from fmkt.detection.loader import DetectionLoader
from fmkt.detection.models import create_detector, detector_backbone, fpn_channels
from fmkt.engine import METRICS, FitResult, Run, make_progress, open_outputs, run_start, train_epoch
from fmkt.errors import FmktError
from fmkt.meter import epoch_record
from fmkt.optim import build_optimizer, build_scheduler, epoch_lr
from fmkt.runtime import FP32, distributed, rank_and_world, resolve_device, seed_everything, strict_fp32


class Trainable(nn.Module):
    """A :class:`DetectionDistiller` as the shared step and checkpoint call a distiller: ``forward(images, targets,
    progress) -> (loss, losses)``, and its learnable state dict (never the teacher's) out and back in."""

    def __init__(self, distiller: DetectionDistiller):
        super().__init__()
        self.distiller = distiller

    def forward(self, images, targets, progress: float = 0.0):
        return self.distiller.forward_train(list(images), list(targets))

    def learnable_state_dict(self) -> dict:
        return self.distiller.learnable_state_dict()

    def load_learnable_state_dict(self, state: dict) -> None:
        missing, unexpected = self.distiller.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise RuntimeError(f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")


class Targets(list):
    """A batch's per-image target dicts, moved to a device as fmkt.loop moves a batch's labels."""

    def to(self, device, non_blocking: bool = False) -> "Targets":
        return Targets({k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in self)


class Batches:
    """A training :class:`DetectionLoader` as the engine's epoch reads batches: ``(images, Targets)``."""

    def __init__(self, loader: DetectionLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def skip(self, batches: int) -> None:
        self.loader.skip(batches)

    def __iter__(self):
        for images, targets in self.loader:
            yield images, Targets(targets)


@dataclass
class DetectionResult(FitResult):
    """fmkt.engine's FitResult with ``last`` (the last epoch's COCO mAP) and ``best`` (the epoch of the best AP:
    its mAP and ``epoch``); :meth:`table` is the CLI's result table."""

    def table(self, title: str):
        from fmkt.detection.report import result_table

        return result_table(self, title)


def fpn_levels(detector: nn.Module, side: int = 64) -> list[str]:
    """The names of ``detector``'s FPN levels in order: one dry run of its backbone on a blank image in eval mode
    (no BatchNorm statistic moves, no random number is drawn)."""
    backbone = detector_backbone(detector)
    mode = backbone.training
    backbone.eval()
    with torch.no_grad():
        feats = backbone(torch.zeros(1, 3, side, side, device=next(backbone.parameters()).device))
    backbone.train(mode)
    return list(feats) if isinstance(feats, dict) else ["0"]


def build_models(cfg, num_classes: int, teacher: nn.Module | None, device) -> tuple[Trainable, dict]:
    """(the distiller as the step trains it, the artifact's spec) on ``device``: the student detector seeded with
    train.seed (``num_classes`` object classes plus the background), for fmkt its FPN flow (a module per weighted
    level), for pkd its per-level weights; ``detection.weights`` or the authors' for the student's family. With
    ``detection.backbone_weights`` the student's backbone body then takes that file's weights, its BatchNorm frozen
    and its first stages not trained (fmkt.detection.backbone; loaded over the same seeded initialisation)."""
    d, m = cfg.detection, cfg.method
    seed_everything(cfg.train.seed)
    student = create_detector(cfg.student, num_classes + 1, min_size=d.min_size, max_size=d.max_size,
                              **cfg.student_kwargs)
    if d.backbone_weights is not None:
        with_backbone_weights(student, d.backbone_weights, d.trainable_backbone_layers)
    levels = fpn_levels(student)
    if d.weights and len(d.weights) != len(levels):
        raise FmktError(f"detection.weights has {len(d.weights)} values but {cfg.student} has {len(levels)} FPN "
                        f"levels ({', '.join(levels)}): give one weight per level (0 turns a level off).")
    weights = tuple(float(w) for w in d.weights) or default_level_weights(student, levels)
    flow = None
    if m.name == "fmkt":
        flow = FPNFlow(levels, fpn_channels(student), weights, teacher_channels=fpn_channels(teacher),
                       encoder=m.encoder, schedule=m.schedule, train_steps=m.train_step_choices(),
                       eval_steps=d.refine_steps, dirac_ratio=m.dirac_ratio, loss=d.loss,
                       project_teacher=d.project_teacher, detach_target=d.detach_target)
    distiller = DetectionDistiller(student, teacher, flow, method=m.name, refine=d.refine,
                                   pkd_weights=dict(zip(levels, weights)) if m.name == "pkd" else None)
    spec = detector_spec(cfg.student, num_classes + 1, min_size=d.min_size, max_size=d.max_size,
                         flow=flow if flow is not None and d.refine else None, options=dict(cfg.student_kwargs),
                         trainable_backbone_layers=None if d.backbone_weights is None else d.trainable_backbone_layers)
    return Trainable(distiller).to(device), spec


def prepare(cfg, splits, teacher, teacher_record, resume: bool, console, device, dataset: dict) -> Run:
    """Everything a detection run needs, checked before any file is written (fmkt.engine's Run: ``train_set`` /
    ``test_set`` are the CocoSplits, ``data`` the artifact's spec, ``extra["dataset"]`` fmkt.json's dataset and
    ``extra["backbone_weights"]`` its record of the student's backbone file, hashed before it is read, or None)."""
    rank, world, console, out = run_start(cfg, console)
    if device.type == "cuda":
        console.print("fast path: off (a detection step has no static shapes: eager fp32 step)", highlight=False)
    train, val = splits
    d = cfg.detection
    backbone = None if d.backbone_weights is None else weights_record(d.backbone_weights, d.trainable_backbone_layers)
    model, spec = build_models(cfg, train.num_classes, teacher, device)
    loader = Batches(DetectionLoader(train, cfg.detection.min_size, cfg.data.batch_size // world, train=True,
                                     seed=cfg.train.seed, rank=rank, world_size=world, device=device,
                                     workers=cfg.data.workers))
    optimizer = build_optimizer(cfg, model.named_parameters())
    run = Run(cfg=cfg, console=console, device=device, amp=False, rank=rank, world=world, out=out, train_set=train,
              test_set=val, data=spec, student=model.distiller.student, distiller=model, model=model,
              optimizer=optimizer, scheduler=build_scheduler(cfg, optimizer, len(loader)), loader=loader,
              keys=list(KEYS), teacher=teacher_record, extra={"dataset": dataset, "backbone_weights": backbone},
              best={})
    if resume:
        resume_run(run)
    open_outputs(run)
    run.step = EagerStep(run.model, run.optimizer, run.scheduler, False, cfg.optim.clip_grad)
    return run


def deployable(run: Run) -> nn.Module:
    """The student as the artifact holds it: with its flow at K = detection.refine_steps (fmkt, refine)."""
    return run.distiller.distiller.deployable(run.cfg.detection.refine_steps)


def detect(model: nn.Module, split, size: int, batch_size: int, device, workers=None) -> list[dict]:
    """COCO detection dicts of ``model`` (eval mode, IEEE fp32) on this rank's share of ``split``'s images, every
    rank's gathered under DDP."""
    rank, world = rank_and_world()
    loader = DetectionLoader(split, size, batch_size, rank=rank, world_size=world, device=device, workers=workers)
    model.eval()
    results: list = []
    with torch.no_grad(), strict_fp32():
        for images, targets in loader:
            results += to_coco_results(model(list(images)), targets, split.cat_ids, size)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    return results


def evaluate_map(model: nn.Module, split, cfg, device) -> dict:
    """COCO mAP (percent) of ``model`` on ``split`` at the run's input size."""
    d = cfg.detection
    return coco_map(split, detect(model, split, d.min_size, d.eval_batch_size, device, cfg.data.workers))


def map_line(values: dict | None) -> str:
    return "  ".join(f"{k} {'-' if values[k] is None else f'{values[k]:.2f}'}" for k in KEYS) if values else ""


def end_epoch(run: Run, epoch: int, sums: dict, seen: int, seconds: float, trained: int | None = None) -> None:
    """The epoch's record (+ COCO mAP when evaluated), appended to metrics.jsonl; the end-of-epoch checkpoint."""
    cfg = run.cfg
    record = epoch_record(epoch, epoch_lr(cfg, epoch, len(run.loader)), sums, seen, seconds, trained)
    if run.world > 1:  # BatchNorm running statistics are per rank: evaluate (and save) rank 0's everywhere
        for buf in run.distiller.buffers():
            dist.broadcast(buf, 0)
    if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
        record["map"] = evaluate_map(deployable(run), run.test_set, cfg, run.device)
        if not run.best or (record["map"]["AP"] or 0.0) > (run.best["AP"] or 0.0):
            run.best = {**record["map"], "epoch": epoch + 1}
    run.history.append(record)
    if run.master:
        with open(run.out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        run.logger.epoch(record)
    run.console.print(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {record['train_loss']:.4f}  "
                      f"{record['images_per_s']:.1f} img/s  {map_line(record.get('map'))}", highlight=False)
    save_run(run, epoch + 1, 0)


def run_record(run: Run) -> dict:
    """fmkt.json's keys besides the spec: task, method, loss, train steps, level weights, dataset, metrics, teacher."""
    cfg, m, d = run.cfg, run.cfg.method, run.cfg.detection
    distiller = run.distiller.distiller
    weights = distiller.flow.weights if distiller.flow is not None else distiller.pkd_weights
    record = {"task": "detection", "method": m.name, "loss": d.loss if m.name != "none" else "none",
              "train_steps": m.train_step_choices() if m.name == "fmkt" else [], "level_weights": weights,
              "refine": d.refine if m.name == "fmkt" else None,
              "detach_target": d.detach_target if m.name == "fmkt" else None, "dataset": run.extra["dataset"],
              "metrics": {"last": run.history[-1]["map"], "best": run.best, "epochs": cfg.train.epochs,
                          "precision": FP32, "split": d.val_split, "images_evaluated": len(run.test_set),
                          "evaluator": "pycocotools COCOeval, iouType bbox"},
              "teacher": run.teacher}
    if run.extra.get("backbone_weights"):  # the student's ImageNet start: the file's name and sha256
        record["backbone_weights"] = run.extra["backbone_weights"]
    if run.world > 1:
        record["distributed"] = {"world_size": run.world, "backend": dist.get_backend()}
    return record


def finish(run: Run) -> DetectionResult:
    """The detection artifact (rank 0), once every rank is done."""
    artifact = run.out / "artifact"
    if run.master:
        save_detector_artifact(artifact, deployable(run).cpu(), run.data, run_record(run))
    run.logger.close()
    if run.world > 1:  # the others wait until rank 0's files are in place (a cached teacher is read next)
        dist.barrier()
    return DetectionResult(out=run.out, artifact=artifact, last=run.history[-1]["map"], best=run.best,
                           epochs=run.cfg.train.epochs, seconds=time.perf_counter() - run.t_start,
                           teacher=run.teacher, history=run.history, rank=run.rank, world_size=run.world)


def fit(cfg, splits, dataset: dict, *, teacher: nn.Module | None = None, teacher_info: dict | None = None,
        resume: bool = False, console: Console | None = None, device=None) -> DetectionResult:
    """Train ``cfg``'s detection distiller on ``splits`` (train, val CocoSplits) and write OUT (see the module
    docstring); under torchrun, one DDP rank of it. ``dataset``: fmkt.json's dataset record."""
    with distributed(cfg.train.device):
        device = resolve_device(cfg.train.device) if device is None else device
        run = prepare(cfg, splits, teacher, teacher_info, resume, console or Console(stderr=True), device, dataset)
        with make_progress(run.console, enabled=run.master) as progress:
            for epoch in range(run.start_epoch, cfg.train.epochs):
                train_epoch(run, epoch, progress, end=end_epoch)
        return finish(run)
