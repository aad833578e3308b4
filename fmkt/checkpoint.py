"""The training state for ``--resume``: ``OUT/checkpoint.pt`` (written atomically, read with weights_only=True).

It holds the learnable weights (student and adapters, never the teacher), optimiser, scheduler, RNG, epoch and
step, the history and best accuracies, the resolved config (a resume with other settings is refused, naming the
keys) and the epoch's running loss sums, so a run killed mid-epoch resumes to the same metrics. Its one writer
(:func:`save_run`, :func:`training_state`) and its readers (:func:`resume_run`, :func:`restore`) are this file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fmkt import __version__
from fmkt.errors import FmktError, first_line
from fmkt.files import atomic_path, check_output_dir
from fmkt.optim import load_optimizer_state
from fmkt.runtime import env_rank

CHECKPOINT = "checkpoint.pt"
# Keys that may change between a run and its --resume (they do not change the result).
RESUME_FREE_KEYS = {"out", "train.device", "train.threads", "train.kernel", "train.fast_path", "train.log",
                    "data.workers"}
CHECKPOINT_KEYS = ("epoch", "step_in_epoch", "model", "optimizer", "scheduler", "rng", "config", "history", "best")


def check_start(out, resume: bool) -> None:
    """Before any work (a teacher trained first included): rank 0 checks that ``out`` can be written, and
    ``--resume`` needs ``out``'s checkpoint."""
    if env_rank()[0] == 0:
        check_output_dir(out)
    if resume and not (Path(out) / CHECKPOINT).is_file():
        raise FmktError(f"--resume was given but {Path(out) / CHECKPOINT} does not exist; "
                        "run without --resume to start fresh.")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def training_state(distiller, optimizer, scheduler, config: dict, epoch: int, step_in_epoch: int, history: list,
                   best: dict, sums: dict | None = None, seen: int = 0) -> dict:
    """The checkpoint's payload (what :func:`restore` and :func:`resume_run` read back): the learnable weights,
    optimiser, scheduler and RNG state, where the run is, its history, and the epoch's running loss sums."""
    return {"epoch": epoch, "step_in_epoch": step_in_epoch, "model": distiller.learnable_state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
            "config": config, "history": history, "best": best, "epoch_sums": dict(sums or {}), "epoch_seen": seen}


def save_run(run, epoch: int, step_in_epoch: int, sums: dict | None = None, seen: int = 0) -> None:
    """``OUT/checkpoint.pt`` of a run (fmkt.engine's Run; rank 0 writes it) at (epoch, step_in_epoch) with the epoch's
    running loss sums so far; every rank then knows it as the last good checkpoint. :func:`resume_run` reads it."""
    path = Path(run.out) / CHECKPOINT
    if run.master:
        save_checkpoint(path, training_state(run.distiller, run.optimizer, run.scheduler, run.cfg.to_dict(), epoch,
                                             step_in_epoch, run.history, run.best, sums, seen))
    run.last_good = path


def resume_run(run) -> None:
    """``OUT/checkpoint.pt`` into a run (what :func:`save_run` wrote): :func:`restore`'s state, where the run is, its
    history and best accuracies, and a mid-epoch checkpoint's running loss sums (so the epoch's metrics come out
    whole)."""
    path = Path(run.out) / CHECKPOINT
    ckpt = load_checkpoint(path)
    restore(ckpt, path, run.cfg.to_dict(), run.distiller, run.optimizer, run.scheduler)
    run.start_epoch, run.start_step = ckpt["epoch"], ckpt["step_in_epoch"]
    run.history, run.best = list(ckpt["history"]), dict(ckpt["best"])
    run.resumed_sums, run.resumed_seen = dict(ckpt.get("epoch_sums", {})), int(ckpt.get("epoch_seen", 0))
    run.last_good = path
    run.console.print(f"resuming from {path}: epoch {run.start_epoch + 1}, step {run.start_step}")


def save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({**payload, "fmkt_version": __version__}, tmp)


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


def config_diff(old: dict, new: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """Dotted keys whose values differ between two config dicts (the resume-free keys excepted). A key the old
    config lacks (a checkpoint written before the key existed) counts as its default value."""
    if defaults is None:
        from fmkt.config import Config

        defaults = Config().to_dict()
    keys = []
    for k in sorted(set(old) | set(new)):
        full = f"{prefix}{k}"
        a, b = old.get(k, (defaults or {}).get(k)), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and full not in ("method.loss_params", "method.encoder_params"):
            keys += config_diff(a, b, full + ".", (defaults or {}).get(k) if isinstance(defaults, dict) else None)
        elif a != b and full not in RESUME_FREE_KEYS:
            keys.append(full)
    return keys


def restore(ckpt: dict, path: Path, cfg_dict: dict, distiller, optimizer, scheduler) -> None:
    """Load the checkpoint's state into the run (after checking the config is the same), RNG included."""
    diff = config_diff(ckpt["config"], cfg_dict)
    if diff:
        raise FmktError(f"--resume refused: the configuration differs from the checkpoint's in {', '.join(diff)}.")
    try:
        distiller.load_learnable_state_dict(ckpt["model"])
        load_optimizer_state(optimizer, ckpt["optimizer"])  # a device-tensor LR stays one (a graph reads it)
        scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise FmktError(f"checkpoint {path} does not fit this model ({first_line(exc, 160, with_type=False)}); "
                        "delete it to start fresh.") from None
    set_rng_state(ckpt["rng"])
