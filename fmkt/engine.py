"""One training loop for every method: optimiser, LR schedule, AMP, progress, evaluation, checkpoints, artifact.

nanoGPT-style: one obvious path. ``fit`` trains a distiller built from a ``Config`` and writes
``OUT/config.yaml``, ``OUT/metrics.jsonl`` (one line per epoch), ``OUT/checkpoint.pt`` (full state for
``--resume``, written atomically) and the student artifact ``OUT/artifact``.

The same loop serves one process and ``torchrun`` DDP (nanoGPT's way): under ``torchrun`` (``WORLD_SIZE`` > 1)
:func:`distributed` starts the process group (NCCL on CUDA, one GPU per ``LOCAL_RANK``; gloo on CPU), each rank
trains on its shard with ``data.batch_size / WORLD_SIZE`` images per step (``data.batch_size`` is the global
batch), the distiller is wrapped in DistributedDataParallel (the frozen teacher has no trainable parameters, so
DDP ignores it; BatchNorm statistics stay per rank), losses and test-set counts are summed across ranks, and only
rank 0 writes files and shows progress.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fmkt import __version__
from fmkt.adapter import create_backbone
from fmkt.artifact import model_spec, save_artifact
from fmkt.config import Config, config_from_dict, save_config
from fmkt.data import BatchLoader, ImageTensors, check_images, load_dataset
from fmkt.distillers import build_distiller, check_method
from fmkt.errors import FmktError
from fmkt.io import atomic_path, ensure_writable_dir
from fmkt.runtime import FP32, strict_fp32
from fmkt.student import DeployableModel

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# Keys that may change between a run and its --resume (they do not change the result).
RESUME_FREE_KEYS = {"out", "train.device", "train.threads", "train.kernel"}


def env_rank() -> tuple[int, int]:
    """(rank, world_size) as torchrun sets them in the environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def ddp_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
    # Under torchrun each process takes the GPU of its LOCAL_RANK.
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def step_label(k) -> str:
    """How a K value reads in tables: theta for 0, K=n otherwise, 'student' for a plain model."""
    return {"0": "theta (K=0)", "plain": "student"}.get(str(k), f"K={k}")


def build_student(cfg: Config, info) -> DeployableModel:
    _, flow, theta = check_method(cfg.method.name)
    backbone = create_backbone(cfg.student, num_classes=info.num_classes, in_channels=info.in_channels,
                               input_size=info.image_size, options=cfg.student_options, check_head=flow)
    return DeployableModel(
        backbone, info.mean, info.std,
        encoder=cfg.method.encoder if flow else None, encoder_kwargs=cfg.method.encoder_params,
        schedule=cfg.method.schedule, theta_head=theta,
        transfer=cfg.method.transfer if flow else "logits",
        default_steps=cfg.method.train_step_choices()[-1],
    )


def eval_keys(model: DeployableModel, steps) -> list[str]:
    """Keys to evaluate: "plain" for a plain model; else each K it can run, plus "0" when it has a theta head."""
    if not model.is_flow:
        return ["plain"]
    steps = list(steps) + ([0] if model.theta_head is not None and 0 not in steps else [])
    return [str(k) for k in model.available_steps(steps)]


@torch.no_grad()
def evaluate(model: DeployableModel, data, keys: list[str], batch_size: int, device) -> dict:
    """Top-1 accuracy (%) on ``data`` for each key ("plain", "0" theta, "K"); Z1 is computed once per batch.

    Always in IEEE fp32 (no autocast, TF32 off; ``runtime.FP32``), whatever the training precision, so the numbers
    stored in fmkt.json and shown by bench mean one thing on every device.

    Under DDP each rank counts its shard (items r, r + W, ...) and the counts are summed: every rank returns the
    same numbers, those of the whole set (the caller makes the models equal first).
    """
    if ddp_active():
        rank, world = dist.get_rank(), dist.get_world_size()
        data = ImageTensors(data.images[rank::world], data.labels[rank::world])
    loader = BatchLoader(data, batch_size, shuffle=False, augment_info=None, seed=0)
    correct, total = count_correct(model, loader, keys, device)
    if ddp_active():
        counts = torch.tensor([correct[k] for k in keys] + [total], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        correct, total = {k: int(c) for k, c in zip(keys, counts[:-1].tolist())}, int(counts[-1])
    return {k: 100.0 * correct[k] / max(total, 1) for k in keys}


@torch.no_grad()
def count_correct(model: DeployableModel, batches, keys: list[str], device) -> tuple[dict, int]:
    """({key: correct top-1 count}, images) over ``batches`` of (images, labels, ...); Z1 once per batch; IEEE
    fp32 (``runtime.strict_fp32``)."""
    was_training = model.training
    model.eval()
    correct = {k: 0 for k in keys}
    total = 0
    for images, labels, *_ in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with strict_fp32():
            if keys == ["plain"]:
                outputs = {"plain": model(images)}
            else:
                z1 = model.features(images)
                outputs = {k: model.logits_from_features(z1, None if k == "plain" else int(k)) for k in keys}
        for k, logits in outputs.items():
            correct[k] += int((logits.argmax(1) == labels).sum())
        total += labels.numel()
    model.train(was_training)
    return correct, total


def lr_factor(cfg: Config, epoch_progress: float) -> float:
    """Multiplier of the base LR at a fractional epoch: linear warm-up, then cosine to 0 or step decay."""
    o, epochs = cfg.optim, cfg.train.epochs
    if o.warmup_epochs > 0 and epoch_progress < o.warmup_epochs:
        return (epoch_progress + 1e-8) / o.warmup_epochs
    if o.scheduler == "cosine":
        span = max(epochs - o.warmup_epochs, 1e-8)
        return 0.5 * (1.0 + math.cos(math.pi * min((epoch_progress - o.warmup_epochs) / span, 1.0)))
    return o.gamma ** sum(1 for m in o.milestones if epoch_progress >= m)


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in params if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def check_output_dir(path: str | Path) -> None:
    """Refuse, before any work, an --out that is (or lies under) a file or a folder that takes no writes.

    Creates nothing: the nearest existing folder gets a write probe (a temporary folder, removed at once), which
    also catches read-only mounts where root ignores permission bits.
    """
    import tempfile

    path = Path(path)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise FmktError(f"output path {path} cannot be used: {probe} exists and is a file; pass a folder path.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fmkt-probe-", dir=probe))
    except OSError as exc:
        raise FmktError(f"output folder {path} is not writable ({probe}: {exc.strerror}); choose another --out.") \
            from None


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        full = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and full not in ("method.loss_params", "method.encoder_params"):
            keys += config_diff(a, b, full + ".")
        elif a != b and full not in RESUME_FREE_KEYS:
            keys.append(full)
    return keys


def nonfinite_loss(value: float, epoch: int, step: int, *, updated: bool, last_good=None) -> FmktError:
    """The one sentence for a NaN/Inf loss. Before any weight update the learning rate cannot be the cause, so
    that case names what can be (the data, the method's settings); afterwards a lower LR is the usual cure."""
    where = f"the loss became {value} at epoch {epoch + 1}, step {step + 1}"
    if not updated:
        return FmktError(f"{where}, before any weight update, so the learning rate is not the cause: check the "
                         "data (NaN/Inf in the images?) and the method's settings (schedule, loss, transfer).")
    return FmktError(f"{where}; stopped. The last good checkpoint is {last_good or 'none'}; try a lower --lr.")


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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


CHECKPOINT_KEYS = ("epoch", "step_in_epoch", "model", "optimizer", "scheduler", "rng", "config", "history", "best")


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FmktError(f"--resume was given but {path} does not exist; run without --resume to start fresh.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: any unpickling error means the same to the user
        raise FmktError(f"checkpoint {path} cannot be read ({type(exc).__name__}); it is damaged — "
                        "delete it to start fresh.") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise FmktError(f"{path} is not an fmkt checkpoint (it lacks the training state); delete it or choose "
                        "another --out to start fresh.")
    return ckpt


def make_progress(console: Console, enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=True, disable=not (enabled and console.is_terminal),
    )


def fit(cfg: Config, *, teacher: DeployableModel | None = None, teacher_info: dict | None = None,
        resume: bool = False, console: Console | None = None, extra_info: dict | None = None) -> FitResult:
    """Train ``cfg``'s distiller and write OUT (see the module docstring); under torchrun, one DDP rank of it."""
    with distributed(cfg.train.device):
        return _fit(cfg, teacher, teacher_info, resume, console, extra_info)


def _fit(cfg: Config, teacher, teacher_info, resume, console, extra_info) -> FitResult:
    console = console or Console(stderr=True)
    ddp = ddp_active()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0  # only rank 0 writes files and shows progress
    if not master:
        console = Console(stderr=True, quiet=True)
    if cfg.data.batch_size % world:
        raise FmktError(f"data.batch_size {cfg.data.batch_size} is the global batch and must divide evenly over "
                        f"{world} processes; pass a multiple of {world}.")
    out = Path(cfg.out)
    if master:
        check_output_dir(out)  # created only once the data, models and checkpoint are known to be good
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    amp = cfg.train.amp and device.type == "cuda"

    train_set, test_set, info = load_dataset(cfg.data.name, cfg.data.dir)
    if cfg.data.train_subset:
        train_set = train_set.subset(cfg.data.train_subset, seed=cfg.train.seed)
    if cfg.data.test_subset:
        test_set = test_set.subset(cfg.data.test_subset, seed=0)
    check_images(train_set.images, info.in_channels)
    check_images(test_set.images, info.in_channels)

    seed_everything(cfg.train.seed)  # the same seed on every rank: identical initial weights and RNG draws
    student = build_student(cfg, info).to(device)
    from fmkt.kernels import install_step_kernel, kernel_summary  # lazy: Triton is imported only where it can run

    install_step_kernel(student, cfg.train.kernel, device)
    if device.type == "cuda" and student.is_flow:
        console.print(kernel_summary(cfg.train.kernel, device), highlight=False)
    if teacher is not None:
        teacher = teacher.to(device)
    input_shape = (info.in_channels, *info.image_size)
    distiller = build_distiller(cfg.method, student, teacher, input_shape=input_shape).to(device)

    optimizer = build_optimizer(cfg, distiller.parameters())
    loader = BatchLoader(train_set, cfg.data.batch_size // world, shuffle=True,
                         augment_info=info if cfg.data.augment else None, seed=cfg.train.seed, drop_last=True,
                         rank=rank, world_size=world)
    iters = len(loader)
    if iters == 0:
        raise FmktError(f"the training set ({len(train_set)} images) is smaller than one batch "
                        f"({cfg.data.batch_size}); lower data.batch_size.")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it / iters))
    keys = eval_keys(student, cfg.method.eval_steps)

    start_epoch, start_step, history = 0, 0, []
    resumed_sums, resumed_seen = {}, 0
    best = {k: -1.0 for k in keys}
    ckpt_path = out / CHECKPOINT
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        diff = config_diff(ckpt["config"], cfg.to_dict())
        if diff:
            raise FmktError(f"--resume refused: the configuration differs from the checkpoint's in {', '.join(diff)}.")
        try:
            distiller.load_learnable_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise FmktError(f"checkpoint {ckpt_path} does not fit this model ({str(exc).splitlines()[0][:160]}); "
                            "delete it to start fresh.") from None
        _set_rng_state(ckpt["rng"])
        start_epoch, start_step = ckpt["epoch"], ckpt["step_in_epoch"]
        history, best = list(ckpt["history"]), dict(ckpt["best"])
        # a mid-epoch checkpoint carries the epoch's running loss sums, so the epoch's metrics come out whole
        resumed_sums, resumed_seen = dict(ckpt.get("epoch_sums", {})), int(ckpt.get("epoch_seen", 0))
        console.print(f"resuming from {ckpt_path}: epoch {start_epoch + 1}, step {start_step}")
    if master:
        ensure_writable_dir(out)
        save_config(cfg, out / "config.yaml")
        # metrics.jsonl holds exactly the epochs the (resumed) state has seen.
        with atomic_path(out / METRICS) as tmp:
            tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    model = distiller
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        # some methods leave parameters without a gradient (e.g. the student's own classifier under feature
        # transfer), so DDP must look for unused ones; the teacher has requires_grad off and is not synced
        model = DistributedDataParallel(distiller, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True)

    def checkpoint(epoch: int, step_in_epoch: int, sums: dict | None = None, seen: int = 0) -> None:
        if master:
            save_checkpoint(ckpt_path, {
                "epoch": epoch, "step_in_epoch": step_in_epoch, "model": distiller.learnable_state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                "config": cfg.to_dict(), "history": history, "best": best, "fmkt_version": __version__,
                "epoch_sums": dict(sums or {}), "epoch_seen": seen,
            })

    def global_sums(sums: dict, seen: int) -> tuple[dict, int]:
        """The epoch's loss sums and image count over all ranks."""
        if not ddp:
            return sums, seen
        names = sorted(sums)
        t = torch.tensor([sums[k] for k in names] + [seen], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return dict(zip(names, t[:-1].tolist())), int(t[-1])

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext
    t_start = time.perf_counter()
    last_good = ckpt_path if resume else None
    with make_progress(console, enabled=master) as progress:
        for epoch in range(start_epoch, cfg.train.epochs):
            distiller.train()
            loader.set_epoch(epoch)
            task = progress.add_task(f"epoch {epoch + 1}/{cfg.train.epochs}", total=iters, loss=0.0, ips=0.0)
            sums, seen, t0 = {}, 0, time.perf_counter()
            skip = start_step if epoch == start_epoch else 0
            if skip:  # the checkpoint's sums are global (all ranks); keep them on rank 0 only, summed later
                sums, seen = (resumed_sums, resumed_seen) if master else ({k: 0.0 for k in resumed_sums}, 0)
            for step, (images, labels) in enumerate(loader):
                if step < skip:
                    progress.advance(task)
                    continue
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                with autocast():
                    _, losses = model(images, labels, epoch + step / iters)
                loss = sum(losses.values())
                finite = torch.isfinite(loss.detach()).float()
                if ddp:  # every rank stops together
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if not bool(finite):
                    raise nonfinite_loss(loss.item(), epoch, step, updated=bool(epoch or step or resume),
                                         last_good=last_good)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * labels.numel()
                seen += labels.numel()
                progress.update(task, advance=1, loss=float(loss.detach()),
                                ips=seen / max(time.perf_counter() - t0, 1e-9))
                every = cfg.train.checkpoint_every_steps
                if every and (step + 1) % every == 0 and step + 1 < iters:
                    checkpoint(epoch, step + 1, *global_sums(sums, seen))
                    last_good = ckpt_path
            progress.remove_task(task)
            sums, seen = global_sums(sums, seen)
            record = {
                "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                "train_loss": sum(sums.values()) / max(seen, 1),
                **{k: v / max(seen, 1) for k, v in sums.items()},
                "epoch_seconds": round(time.perf_counter() - t0, 3),
                "images_per_s": round(seen / max(time.perf_counter() - t0, 1e-9), 1),
            }
            if ddp:  # BatchNorm running statistics are per rank: evaluate (and save) rank 0's everywhere
                for buf in distiller.student.buffers():
                    dist.broadcast(buf, 0)
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                acc = evaluate(student, test_set, keys, cfg.data.eval_batch_size, device)
                record["top1"] = acc
                best = {k: max(best[k], acc[k]) for k in keys}
            history.append(record)
            if master:
                with open(out / METRICS, "a") as f:
                    f.write(json.dumps(record) + "\n")
            accs = ", ".join(f"{step_label(k)} {v:.2f}" for k, v in record.get("top1", {}).items())
            console.print(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {record['train_loss']:.4f}  "
                          f"{record['images_per_s']:.0f} img/s  {accs}")
            checkpoint(epoch + 1, 0)
            last_good = ckpt_path

    last = history[-1]["top1"]
    spec = model_spec(student, cfg.student, info.in_channels, info.image_size,
                      cfg.method.encoder if student.is_flow else None, cfg.method.encoder_params)
    artifact = out / "artifact"
    if master:
        save_artifact(artifact, student.cpu(), spec, {
            "method": cfg.method.name,
            "loss": cfg.method.loss if cfg.method.name in ("fmkt", "theta", "ofmkt") else cfg.method.name,
            "train_steps": cfg.method.train_step_choices(),
            "dataset": {"name": info.name, "num_classes": info.num_classes,
                        "class_names": list(info.class_names) if info.class_names else None},
            "metrics": {"last": last, "best": best, "epochs": cfg.train.epochs, "precision": FP32},
            "teacher": teacher_info,
            **({"distributed": {"world_size": world, "backend": dist.get_backend()}} if ddp else {}),
            **(extra_info or {}),
        })
    if ddp:  # the others wait until rank 0's files are in place (a cached teacher is read next)
        dist.barrier()
    return FitResult(out=out, artifact=artifact, last=last, best=best, epochs=cfg.train.epochs,
                     seconds=time.perf_counter() - t_start, teacher=teacher_info, history=history,
                     rank=rank, world_size=world)


def reload_config(path: Path) -> Config:
    import yaml

    return config_from_dict(yaml.safe_load(Path(path).read_text()))
