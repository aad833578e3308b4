"""Where a run's numbers go besides ``OUT/metrics.jsonl`` (always written: resume reads it): ``train.log``.

* ``jsonl`` (default): metrics.jsonl alone, a line per epoch.
* ``tensorboard``: TensorBoard event files in ``OUT/tensorboard`` as well: per step ``step/<loss>``, ``step/lr``
  and ``step/images_per_s`` (x = the global step), per epoch ``epoch/train_loss``, ``epoch/<loss>``, ``epoch/lr``,
  ``epoch/images_per_s`` and ``top1/<K>`` (x = the epoch). Needs the ``tensorboard`` package (``.[tensorboard]``);
  a resumed run drops the events past its checkpoint's step, so the curves hold no step twice.

Only rank 0 logs. :func:`check_logger` runs with the config checks, before any training.
"""
from __future__ import annotations

from pathlib import Path

from fmkt.errors import FmktError

LOGGERS = ("jsonl", "tensorboard")
TENSORBOARD_DIR = "tensorboard"


def check_logger(kind: str) -> None:
    """Raise :class:`FmktError` when ``kind`` needs a package that is not installed."""
    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise FmktError("train.log=tensorboard needs the tensorboard package: pip install -e \".[tensorboard]\" "
                            "(or pip install tensorboard), or keep train.log=jsonl.") from None


class NoLogger:
    """metrics.jsonl only (the engine writes it): nothing more per step or epoch."""

    def step(self, step: int, losses: dict, lr, images_per_s: float) -> None:
        pass

    def epoch(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NoLogger):
    """Scalars per step and per epoch in ``folder`` (torch.utils.tensorboard's SummaryWriter)."""

    def __init__(self, folder: Path, purge_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=purge_step or None)

    def step(self, step: int, losses: dict, lr, images_per_s: float) -> None:
        for k, v in losses.items():
            self.writer.add_scalar(f"step/{k}", float(v.detach() if hasattr(v, "detach") else v), step)
        self.writer.add_scalar("step/lr", float(lr), step)
        self.writer.add_scalar("step/images_per_s", float(images_per_s), step)

    def epoch(self, record: dict) -> None:
        epoch = int(record["epoch"])
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "epoch":
                self.writer.add_scalar(f"epoch/{k}", float(v), epoch)
        for k, v in record.get("top1", {}).items():
            self.writer.add_scalar(f"top1/{'K=' + k if k.isdigit() else k}", float(v), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_logger(kind: str, out: Path, purge_step: int = 0, master: bool = True):
    """The logger ``train.log`` names, writing into ``out`` (rank 0 only; the others get :class:`NoLogger`)."""
    if kind == "tensorboard" and master:
        check_logger(kind)
        return TensorBoardLogger(Path(out) / TENSORBOARD_DIR, purge_step)
    return NoLogger()
