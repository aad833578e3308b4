"""What the registry holds for each named dataset (:class:`DatasetSource`: its facts, files and kind), and the checks
its readers share.

A reader parses the files of one dataset family into ``(train_images, train_labels, test_images, test_labels)``
numpy arrays: images (N, C, H, W) of small unsigned integers (divide by ``DatasetSource.scale`` for [0, 1]),
labels (N,) ints checked against the class count. Every bad or missing file is one :class:`FmktError` that
names the path and says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fmkt.data.tensors import DatasetInfo, ImageTensors
from fmkt.errors import FmktError

#: ``reader(source, folder) -> (train_images, train_labels, test_images, test_labels)``; folder is None
#: for a dataset that needs none (``DatasetSource.default_dir`` None).
Reader = Callable[["DatasetSource", Path | None], tuple[np.ndarray, ...]]


@dataclass(frozen=True)
class DatasetSource:
    """One registered dataset: its facts, where its files live by default, and the reader that parses them."""

    info: DatasetInfo
    title: str  # the name in messages ("Fashion-MNIST")
    read: Reader | None  # the in-memory kind's reader; None for a kind that reads its files itself
    scale: float = 255.0  # the divisor that maps the parsed values to [0, 1]
    default_dir: str | None = None  # None: the data needs no folder (sklearn's digits) or names it (``--data-dir``)
    install_hint: str = ""  # what to do when the files are missing, as the end of a sentence
    #: the :class:`fmkt.data.split.Split` kind whose ``open(source, data_dir, ...)`` / ``describe`` read it: in
    #: memory (``read``'s arrays) by default; for :class:`fmkt.data.folder.ImageFolderSet` ``info`` is a template
    #: (the classes come from the files)
    kind: type = ImageTensors

    def not_found(self, folder: Path, expected: str) -> FmktError:
        """The error for a missing folder or file: ``expected`` says what should be in ``folder``."""
        return FmktError(f"{self.title} not found in {folder}: expected {expected} there; {self.install_hint}.")


def check_label_range(labels: np.ndarray, num_classes: int, path: Path) -> None:
    """Raise :class:`FmktError` naming ``path`` unless every label is in [0, num_classes - 1]."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise FmktError(
            f"{path} has labels in [{labels.min()}, {labels.max()}]: expected labels in "
            f"[0, {num_classes - 1}]; re-download it or pass --data-dir."
        )
