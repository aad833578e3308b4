"""One training loop for every method, in named pieces: prepare -> train_epoch -> train_step -> finish
(mdistiller's train -> train_epoch -> train_iter). :func:`fit` writes ``OUT/config.yaml``, ``OUT/metrics.jsonl``,
``OUT/checkpoint.pt`` (fmkt/checkpoint.py) and the artifact ``OUT/artifact``. The epoch's steps are fmkt.loop's (the
Python API runs the same loop); the step is fmkt.capture.make_step's: fmkt.step's eager step, or that step's body
captured as a CUDA graph.

One process or ``torchrun`` DDP alike: each rank trains on its shard with ``data.batch_size / WORLD_SIZE`` images
per step (the global batch), the distiller is wrapped in DistributedDataParallel (the frozen teacher has no
trainable parameters; BatchNorm statistics stay per rank), losses and test-set counts are summed across ranks,
and only rank 0 writes files and shows progress.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fmkt.artifact import run_record, save_artifact
from fmkt.capture import fast_path_plan, make_step
from fmkt.checkpoint import resume_run, save_run
from fmkt.config import Config, save_config
from fmkt.data import data_options, load_dataset, make_loader
from fmkt.distillers import build_distiller, check_method
from fmkt.errors import FmktError
from fmkt.evaluation import eval_keys, evaluate, evaluated_images, step_label
from fmkt.files import atomic_path, check_output_dir, ensure_writable_dir, remove_stale_temporaries
from fmkt.logs import NoLogger, open_logger
from fmkt.loop import run_epoch
from fmkt.meter import EpochMeter, epoch_record
from fmkt.mixing import with_mixing
from fmkt.optim import build_optimizer, build_scheduler, epoch_lr, scheduled_lr
from fmkt.step import nonfinite_loss, train_step  # noqa: F401 (the step's names, as tests import them from here)
from fmkt.runtime import FP32, distributed, rank_and_world, resolve_device, seed_everything, sum_over_ranks
from fmkt.student import DeployableModel, StudentSpec, build_student, spec_of

METRICS = "metrics.jsonl"


@dataclass
class FitResult:
    out: Path
    artifact: Path
    last: dict  # key -> top-1 % at the last epoch
    best: dict  # key -> best top-1 % over evaluated epochs
    epochs: int
    seconds: float
    teacher: dict | None = None
    history: list = field(default_factory=list)
    rank: int = 0
    world_size: int = 1


# --------------------------------------------------------------------------------------------- one step
def make_progress(console: Console, enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=True, disable=not (enabled and console.is_terminal),
    )


# --------------------------------------------------------------------------------------------- the run
def student_spec(cfg: Config, data) -> StudentSpec:
    """The spec of ``cfg``'s student on a dataset (``data``: its DatasetInfo)."""
    return StudentSpec.for_method(cfg.method, check_method(cfg.method.name), arch=cfg.student,
                                  num_classes=data.num_classes, channels=data.in_channels, size=tuple(data.image_size),
                                  mean=tuple(data.mean), std=tuple(data.std), adapter=dict(cfg.student_options) or None,
                                  arch_kwargs=dict(cfg.student_kwargs))


@dataclass
class Run:
    """What :func:`prepare` builds and the other pieces share."""

    cfg: Config
    console: Console
    device: torch.device
    amp: bool
    rank: int
    world: int
    out: Path
    train_set: object
    test_set: object
    data: object  # DatasetInfo
    student: DeployableModel
    distiller: object
    model: object  # the distiller, or its DDP wrapper
    optimizer: object
    scheduler: object
    loader: object  # fmkt.data.make_loader's: BatchLoader (tensors) or FolderLoader (an image folder)
    keys: list
    teacher: dict | None = None
    extra: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    best: dict = field(default_factory=dict)
    start_epoch: int = 0
    start_step: int = 0
    resumed_sums: dict = field(default_factory=dict)
    resumed_seen: int = 0
    last_good: Path | None = None
    t_start: float = field(default_factory=time.perf_counter)
    step: object = None  # (images, labels, progress) -> losses: fmkt.capture.make_step's (eager or captured)
    logger: object = field(default_factory=NoLogger)  # fmkt.logs: train.log's per-step and per-epoch scalars

    @property
    def master(self) -> bool:  # only rank 0 writes files and shows progress
        return self.rank == 0


def load_data(cfg: Config):
    """(train, evaluation set, DatasetInfo) with the configured subsets, images checked. With ``data.holdout``
    the evaluation set is that many training images held out (seeded, stratified), never the test split."""
    train_set, test_set, data = load_dataset(cfg.data.name, cfg.data.dir, **data_options(cfg.data))
    if cfg.data.holdout:
        test_set, train_set = train_set.split(cfg.data.holdout, seed=cfg.train.seed)
    if cfg.data.train_subset:
        train_set = train_set.subset(cfg.data.train_subset, seed=cfg.train.seed)
    if cfg.data.test_subset:
        test_set = test_set.subset(cfg.data.test_subset, seed=0)
    train_set.check(data)
    test_set.check(data)
    return train_set, test_set, data


def build_models(cfg: Config, data, teacher, device, console, captured: bool = False):
    """(student, distiller) on ``device``, the student's flow step on the kernel ``cfg`` asks for (``captured``:
    the step will be a CUDA graph, where ``--kernel auto`` takes the fused step)."""
    seed_everything(cfg.train.seed)  # the same seed on every rank: identical initial weights and RNG draws
    student = build_student(student_spec(cfg, data)).to(device)
    from fmkt.kernels import install_step_kernel, kernel_summary  # lazy: Triton is imported only where it can run

    install_step_kernel(student, cfg.train.kernel, device, captured=captured)
    if device.type == "cuda" and student.is_flow:
        console.print(kernel_summary(cfg.train.kernel, device, captured), highlight=False)
    teacher = teacher.to(device) if teacher is not None else None
    distiller = build_distiller(cfg.method, student, teacher, input_shape=(data.in_channels, *data.image_size))
    return student, distiller.to(device)


def run_start(cfg, console) -> tuple:
    """(rank, world, the console: quiet off rank 0, out) of a run (the engine's and fmkt.detection's): the global
    batch checked against the world, rank 0 checks ``out`` (created only once the data, models and checkpoint are
    known to be good), ``train.threads`` applied."""
    rank, world = rank_and_world()
    console = console if rank == 0 else Console(stderr=True, quiet=True)
    if cfg.data.batch_size % world:
        raise FmktError(f"data.batch_size {cfg.data.batch_size} is the global batch and must divide evenly over "
                        f"{world} processes; pass a multiple of {world}.")
    out = Path(cfg.out)
    if rank == 0:
        check_output_dir(out)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    return rank, world, console, out


def prepare(cfg: Config, teacher, teacher_record, resume: bool, console, extra, *, device=None, splits=None) -> Run:
    """Everything a run needs, checked before any file is written: data, models, optimiser, resumed state.
    ``device``/``splits``: the device and ``load_data(cfg)``'s splits when the caller has them already."""
    rank, world, console, out = run_start(cfg, console)
    device = resolve_device(cfg.train.device) if device is None else device
    train_set, test_set, data = load_data(cfg) if splits is None else splits
    plan = fast_path_plan(cfg.train.fast_path, cfg, device, world, check_method(cfg.method.name))
    if plan.on_gpu and not train_set.resident:  # an image folder stays on the host: workers decode into pinned memory
        plan = replace(plan, on_gpu=False, line=plan.line.replace("data on the GPU", "images decoded by host workers"))
    if device.type == "cuda":
        console.print(plan.line, highlight=False)
    student, distiller = build_models(cfg, data, teacher, device, console, captured=plan.capture)
    if plan.on_gpu:  # moved once: every batch is indexed and augmented on the GPU (the same batches as on the host)
        train_set, test_set = train_set.to(device), test_set.to(device)
    loader = make_loader(train_set, cfg.data.batch_size // world, shuffle=True,
                         augment_info=data if cfg.data.augment else None, seed=cfg.train.seed, drop_last=True,
                         rank=rank, world_size=world, device=device)
    if len(loader) == 0:
        raise FmktError(f"the training set ({len(train_set)} images) is smaller than one batch "
                        f"({cfg.data.batch_size}); lower data.batch_size.")
    optimizer = build_optimizer(cfg, distiller.named_parameters(), device_lr=plan.capture or None,
                                capturable=plan.capture)
    keys = eval_keys(student, cfg.method.eval_steps)
    run = Run(cfg=cfg, console=console, device=device, amp=cfg.train.amp and device.type == "cuda", rank=rank,
              world=world, out=out, train_set=train_set, test_set=test_set, data=data, student=student,
              distiller=distiller, model=distiller, optimizer=optimizer,
              scheduler=build_scheduler(cfg, optimizer, len(loader)), loader=loader, keys=keys,
              teacher=teacher_record, extra=dict(extra or {}), best={k: -1.0 for k in keys})
    if resume:
        resume_run(run)
    open_outputs(run)
    run.step = with_mixing(make_step(run, plan), run)  # Mixup/CutMix (data.mixup, data.cutmix) before it
    return run


def open_outputs(run: Run) -> None:
    """The output folder, config.yaml and metrics.jsonl (exactly the epochs the state has seen); DDP wrapping."""
    if run.master:
        ensure_writable_dir(run.out)
        remove_stale_temporaries(run.out)  # a run killed while writing a checkpoint leaves its temporary file
        save_config(run.cfg, run.out / "config.yaml")
        with atomic_path(run.out / METRICS) as tmp:
            tmp.write_text("".join(json.dumps(h) + "\n" for h in run.history))
    done = run.start_epoch * len(run.loader) + run.start_step  # steps a resumed run logged before: purged after
    run.logger = open_logger(run.cfg.train.log, run.out, done + 1 if done else 0, run.master)
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # some methods leave parameters without a gradient (e.g. the student's own classifier under feature
        # transfer), so DDP must look for unused ones; the teacher has requires_grad off and is not synced
        run.model = DistributedDataParallel(run.distiller, find_unused_parameters=True,
                                            device_ids=[run.device.index] if run.device.type == "cuda" else None)


def train_epoch(run: Run, epoch: int, progress: Progress, end=None) -> None:
    """One epoch: fmkt.loop's steps (skipping those a mid-epoch checkpoint already did) with the progress bar,
    train.log's step log and the mid-epoch checkpoints at each read of the losses, then the record and evaluation
    (``end``: :func:`end_epoch`'s stand-in of another task, fmkt.detection.run's with COCO mAP)."""
    cfg, iters = run.cfg, len(run.loader)
    run.distiller.train()
    run.loader.set_epoch(epoch)
    task = progress.add_task(f"epoch {epoch + 1}/{cfg.train.epochs}", total=iters, loss=0.0, ips=0.0)
    skip = run.start_step if epoch == run.start_epoch else 0
    sums, seen = {}, 0
    if skip:  # the checkpoint's sums are global (all ranks): kept on rank 0 only, summed later
        sums, seen = (run.resumed_sums, run.resumed_seen) if run.master else (dict.fromkeys(run.resumed_sums, 0.0), 0)
    meter = EpochMeter(sums, seen)
    run.loader.skip(skip)  # the batches a mid-epoch checkpoint already did are not even built (or decoded)
    progress.advance(task, skip)
    t0 = time.perf_counter()

    def show(records) -> None:  # the steps just read: train.log's step log and the progress bar
        ips = meter.trained / max(time.perf_counter() - t0, 1e-9)
        for r in records:
            run.logger.step(epoch * iters + r.step + 1, r.losses, r.lr, ips)
        progress.update(task, advance=len(records), loss=records[-1].loss, ips=ips)

    run_epoch(run.step, run.loader, epoch, iters, run.device, lambda s: scheduled_lr(cfg, s, iters), start=skip,
              meter=meter, save_every=cfg.train.checkpoint_every_steps, on_read=show, last_good=lambda: run.last_good,
              on_save=lambda done, m: save_run(run, epoch, done, *sum_over_ranks(m.sums, m.seen, run.device)))
    progress.remove_task(task)
    sums, seen = sum_over_ranks(meter.sums, meter.seen, run.device)
    trained = seen - (run.resumed_seen if skip else 0)
    (end or end_epoch)(run, epoch, sums, seen, time.perf_counter() - t0, trained)


def end_epoch(run: Run, epoch: int, sums: dict, seen: int, seconds: float, trained: int | None = None) -> None:
    """The epoch's record (+ top-1 per K when evaluated), appended to metrics.jsonl; the end-of-epoch checkpoint."""
    cfg = run.cfg
    record = epoch_record(epoch, epoch_lr(cfg, epoch, len(run.loader)), sums, seen, seconds, trained)
    if run.world > 1:  # BatchNorm running statistics are per rank: evaluate (and save) rank 0's everywhere
        for buf in run.distiller.student.buffers():
            dist.broadcast(buf, 0)
    if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
        record["top1"] = evaluate(run.student, run.test_set, run.keys, cfg.data.eval_batch_size, run.device)
        run.best = {k: max(run.best[k], record["top1"][k]) for k in run.keys}
    run.history.append(record)
    if run.master:
        with open(run.out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        run.logger.epoch(record)
    accs = ", ".join(f"{step_label(k)} {v:.2f}" for k, v in record.get("top1", {}).items())
    run.console.print(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {record['train_loss']:.4f}  "
                      f"{record['images_per_s']:.0f} img/s  {accs}")
    save_run(run, epoch + 1, 0)


def evaluation_split(cfg: Config) -> str:
    """What the metrics were measured on."""
    if cfg.data.holdout:
        return f"{cfg.data.holdout} training images held out (seed {cfg.train.seed}); not the test split"
    return "test" + (f" ({cfg.data.test_subset}-image subset)" if cfg.data.test_subset else "")


def finish(run: Run) -> FitResult:
    """The student artifact (rank 0), once every rank is done."""
    last = run.history[-1]["top1"]
    artifact = run.out / "artifact"
    if run.master:
        distributed_run = {"distributed": {"world_size": run.world, "backend": dist.get_backend()}} \
            if run.world > 1 else {}
        record = run_record(run.cfg.method, teacher=run.teacher,
                            dataset={"name": run.data.name, "num_classes": run.data.num_classes,
                                     "class_names": list(run.data.class_names) if run.data.class_names else None,
                                     **run.train_set.record(run.test_set)},
                            metrics={"last": last, "best": run.best, "epochs": run.cfg.train.epochs,
                                     "precision": FP32, "split": evaluation_split(run.cfg),
                                     **evaluated_images(run.test_set)},
                            **distributed_run, **run.extra)
        save_artifact(artifact, run.student.cpu(), spec_of(run.student).to_json(), record)
    run.logger.close()
    if run.world > 1:  # the others wait until rank 0's files are in place (a cached teacher is read next)
        dist.barrier()
    return FitResult(out=run.out, artifact=artifact, last=last, best=run.best, epochs=run.cfg.train.epochs,
                     seconds=time.perf_counter() - run.t_start, teacher=run.teacher, history=run.history,
                     rank=run.rank, world_size=run.world)


def fit(cfg: Config, *, teacher: DeployableModel | None = None, teacher_info: dict | None = None,
        resume: bool = False, console: Console | None = None, extra_info: dict | None = None, device=None,
        splits=None) -> FitResult:
    """Train ``cfg``'s distiller and write OUT (see the module docstring); under torchrun, one DDP rank of it.
    ``teacher_info``: fmkt.json's teacher record; ``extra_info``: more keys for fmkt.json; ``device`` and
    ``splits`` (``load_data(cfg)``'s): what the caller resolved and loaded already (fmkt.commands' distill)."""
    with distributed(cfg.train.device):
        run = prepare(cfg, teacher, teacher_info, resume, console or Console(stderr=True), extra_info,
                      device=device, splits=splits)
        with make_progress(run.console, enabled=run.master) as progress:
            for epoch in range(run.start_epoch, cfg.train.epochs):
                train_epoch(run, epoch, progress)
        return finish(run)
