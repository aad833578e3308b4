"""What the benchmarks share (as Liger-Kernel's benchmark/scripts/utils.py): the machine in a results file's name,
JSON and CSV written atomically, a synthetic student artifact, synthetic in-memory data, and one row lookup.

Every script puts the repository root on ``sys.path`` and imports from here, so a result is named, written and
looked up one way.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


# ------------------------------------------------------------------------------------------------- naming
def slug(text: str) -> str:
    """``text`` as a file-name word: lower case, every run of other characters one ``-`` (fmkt.bench.device_slug's
    rule, without its length cap)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_slug(device, machine: dict, *, with_device: bool = False) -> str:
    """The machine in a results file's name (``machine``: fmkt.runtime.environment()["machine"]): the GPU's name
    as fmkt.bench.device_slug writes it ("nvidia-h100-80gb-hbm3"), ``cpu`` on the CPU. ``with_device``: the
    device, then the GPU's or the CPU model's name ("cuda-nvidia-h100-80gb-hbm3", "cpu-intel-r-xeon-r-processor":
    the latency and Pareto tables, whose CPU rows compare CPU models)."""
    from fmkt.bench import device_slug

    kind = torch.device(device).type
    if with_device:
        return f"{kind}-{device_slug(machine)}"
    return "cpu" if kind == "cpu" else device_slug(machine)


# ------------------------------------------------------------------------------------------------- files
def write_json(path, doc, *, indent: int = 2, **dumps) -> Path:
    """``doc`` as JSON (one trailing newline) at ``path``, written to a temporary name and renamed into place (a
    run cut off mid-write leaves the previous file)."""
    from fmkt.files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=indent, **dumps) + "\n")
    return path


def write_csv(path, rows: list[dict], fields: list[str]) -> Path:
    """``rows`` as CSV with the columns ``fields`` (a row's missing keys are empty cells), written atomically."""
    from fmkt.files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------------- rows
def find_row(rows, **match):
    """The first row whose fields equal ``match`` (keyword arguments: no argument order to get wrong), or None.
    A row is a dict (JSON rows, ours) or an object with attributes (fmkt.bench's Row)."""
    def field(row, key):
        return row.get(key) if isinstance(row, dict) else getattr(row, key, None)

    return next((r for r in rows if all(field(r, k) == v for k, v in match.items())), None)


# ------------------------------------------------------------------------------------------------- synthetic inputs
STUDENTS = {  # name -> StudentSpec fields (the dataset shape each one is deployed on)
    "resnet8x4": dict(arch="resnet8x4", num_classes=100, channels=3, size=(32, 32), mean=(0.5071, 0.4865, 0.4409),
                      std=(0.2673, 0.2564, 0.2762)),
    "resnet8": dict(arch="resnet8", num_classes=10, channels=1, size=(28, 28), mean=(0.2860,), std=(0.3530,)),
}
DATASET_SHAPE = {"resnet8x4": "cifar100-shaped", "resnet8": "fashion-mnist-shaped"}


def synthetic_artifact(path, student: str = "resnet8x4", encoder: str = "conv", *, reuse: bool = False) -> Path:
    """An FM-KT^Theta artifact of ``STUDENTS[student]`` with ``encoder`` and random weights (seed 0): what latency
    is measured on (latency does not depend on the weights; no accuracy). Rebuilt each call, so a changed encoder
    is never timed from a stale file, unless ``reuse`` and an artifact is already at ``path``."""
    from fmkt.artifact import is_artifact, save_artifact
    from fmkt.student import StudentSpec, build_student, spec_of

    path = Path(path)
    if reuse and is_artifact(path):
        return path
    torch.manual_seed(0)
    model = build_student(StudentSpec(**STUDENTS[student], encoder=encoder, theta_head=True))
    record = {"method": "theta", "loss": "dist", "train_steps": [8],
              "dataset": {"name": f"{DATASET_SHAPE[student]} (random weights, latency only)",
                          "num_classes": STUDENTS[student]["num_classes"]}, "metrics": {}}
    return save_artifact(path, model, spec_of(model).to_json(), record)


def synthetic_dataset(info, train: int, test: int = 8, seed: int = 0) -> str:
    """Register random in-memory images with ``info``'s facts (shape, classes, statistics, crop augmentation) in
    fmkt.data's registry, ``train`` + ``test`` of them, and return the name: a config's ``data.name``, so a
    benchmark runs the engine's own data path (load_dataset, the loader, the augmentation) on them."""
    from fmkt.data import DATASET_SOURCES
    from fmkt.data.sources import DatasetSource

    c, (h, w) = info.in_channels, info.image_size
    name = f"synthetic-{c}x{h}x{w}-{info.num_classes}c-{train}-{test}-s{seed}"

    def read(source, folder):
        rng = np.random.default_rng(seed)
        return tuple(a for n in (train, test) for a in (rng.integers(0, 256, (n, c, h, w), dtype=np.uint8),
                                                      rng.integers(0, info.num_classes, n)))

    DATASET_SOURCES.setdefault(name, DatasetSource(replace(info, name=name, class_names=None),
                                                   f"random images ({name})", read))
    return name
