"""sklearn's 8x8 digits (1797 images): a fixed stratified split (seed 0, 20 % test), values 0..16."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fmkt.data.sources import DatasetSource

DIGIT_CLASSES = tuple(str(i) for i in range(10))

# Statistics of the fixed train split (1437 images, values /16), computed once with
# `load_dataset("digits")[0].images.mean() / .std()` and pinned here (0.305383, 0.376119).
DIGITS_MEAN = 0.3054
DIGITS_STD = 0.3761


def read_digits(source: DatasetSource, folder: Path | None) -> tuple[np.ndarray, ...]:
    """The digits split as uint8 arrays (images 0..16); ``source`` and ``folder`` are unused (sklearn ships it)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = d.images.astype(np.uint8)[:, None]  # values 0..16
    labels = d.target.astype(np.int64)
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=labels)
    tr, te = np.sort(tr), np.sort(te)
    return images[tr], labels[tr], images[te], labels[te]
