"""A real detection dataset without a download: Fashion-MNIST (or MNIST) items pasted at random scales and places on
larger canvases, written in COCO format (issue 23), so tests and the default detection run see real object images.

``ROOT/train/*.png`` are built from the source's train split, ``ROOT/val/*.png`` from its test split, with
``ROOT/annotations/instances_{train,val}.json`` beside them. Each canvas (RGB PNG, ``canvas`` x ``canvas``) holds
``objects`` items (inclusive range); an item is the 28x28 picture resized (bilinear) to a side drawn log-uniformly
from ``scale`` x 28 pixels, tinted with a random colour and alpha-blended over a grey-noise (or dark) background,
its grey levels the alpha (those below :data:`ALPHA_MIN` dropped). Its box is tight: the extent of the pasted
item's nonzero pixels, not its square. An item whose box would share more than :data:`MAX_OVERLAP` of the smaller
of it and a box already placed is drawn again, up to :data:`TRIES` times, then left out, so no object hides
another. COCO category ids are 1..10 with the source's class names; ``area`` is the box's ``w * h`` (there are
no masks).

Every canvas draws from its own generator, ``numpy.random.default_rng([seed, split, index])``, so the same seed
gives byte-identical JSON (and PNGs) whatever else changes.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from fmkt.errors import FmktError

SOURCES = ("fashion-mnist", "mnist")  # IDX datasets of 28x28 grey items
SPLITS = (("train", 0), ("val", 1))  # (folder, the split's number in the per-canvas seed); val items: the test split
MAX_OVERLAP = 0.25  # the most of the smaller box two boxes may share
TRIES = 20  # placements tried per item before it is left out
NOISE = 48  # background='noise': grey levels drawn uniformly in [0, NOISE)
TINT = (96, 256)  # an item's colour: each channel drawn in this range
ALPHA_MIN = 8  # an item's pixels fainter than this are not pasted (at least 3 grey levels over a black canvas)
BACKGROUNDS = ("noise", "dark")


def make_detection_data(out_dir, source: str = "fashion-mnist", train: int = 500, val: int = 100,
                        canvas: int = 128, objects: tuple[int, int] = (1, 4), scale: tuple[float, float] = (0.5, 2.0),
                        seed: int = 0, background: str = "noise", data_dir=None, overwrite: bool = False,
                        progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write the canvases of ``train`` and ``val`` images to ``out_dir`` in COCO format (see the module docstring)
    and return a summary: ``{"root", "source", "seed", "canvas", "splits": {split: {"images", "objects",
    "per_class"}}, "seconds"}``. ``progress(split, done, total)`` is called after each canvas. ``out_dir`` is
    written whole to a temporary folder and renamed into place; an existing one needs ``overwrite``."""
    from fmkt.files import atomic_dir

    _check_options(source, train, val, canvas, objects, scale, background)
    start = time.perf_counter()
    items, names = _read_items(source, data_dir)
    summary = {"root": str(out_dir), "source": source, "seed": int(seed), "canvas": int(canvas), "splits": {}}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for (split, code), count in zip(SPLITS, (train, val)):
            pool = items[split]
            coco = _write_split(Path(tmp), split, code, count, pool, names, canvas, objects, scale, seed,
                                background, progress)
            summary["splits"][split] = _split_summary(coco, names)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def _check_options(source, train, val, canvas, objects, scale, background) -> None:
    if source not in SOURCES:
        raise FmktError(f"source is {source!r}: expected one of {', '.join(SOURCES)} (28x28 IDX items).")
    if min(train, val) < 0:
        raise FmktError(f"train={train}, val={val}: expected image counts >= 0.")
    if len(objects) != 2 or not 1 <= objects[0] <= objects[1]:
        raise FmktError(f"objects is {tuple(objects)}: expected (min, max) with 1 <= min <= max.")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise FmktError(f"scale is {tuple(scale)}: expected (min, max) with 0 < min <= max.")
    if canvas < 8 or round(28 * scale[0]) > canvas:
        raise FmktError(f"canvas is {canvas} pixels: expected at least 8 and at least the smallest item "
                        f"({round(28 * scale[0])} pixels).")
    if background not in BACKGROUNDS:
        raise FmktError(f"background is {background!r}: expected one of {', '.join(BACKGROUNDS)}.")


def _read_items(source: str, data_dir) -> tuple[dict, tuple[str, ...]]:
    """The source's items as ``{"train": (images (N, 28, 28) uint8, labels (N,)), "val": (test split)}`` and its
    class names."""
    from fmkt.data import DATASET_SOURCES

    src = DATASET_SOURCES[source]
    train_x, train_y, test_x, test_y = src.read(src, Path(data_dir or src.default_dir))
    return {"train": (train_x[:, 0], train_y), "val": (test_x[:, 0], test_y)}, tuple(src.info.class_names)


def _write_split(root: Path, split: str, code: int, count: int, pool, names, size: int, objects, scale, seed: int,
                 background: str, progress) -> dict:
    """Draw and write one split's canvases and its ``instances_{split}.json``; return the COCO dict."""
    from PIL import Image

    from fmkt.files import atomic_write_text

    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([int(seed), code, index])
        pixels, placed = draw_canvas(rng, pool, size, objects, scale, background)
        name = f"{index:06d}.png"
        Image.fromarray(pixels, "RGB").save(folder / name, format="PNG", compress_level=1)
        images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
        for (x0, y0, x1, y1), label in placed:
            w, h = x1 - x0, y1 - y0
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": label + 1,
                                "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0})
        if progress is not None:
            progress(split, index + 1, count)
    coco = {"info": {"description": f"fmkt detection canvases of {len(names)}-class 28x28 items",
                     "version": "1"},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"id": c + 1, "name": n, "supercategory": "item"} for c, n in enumerate(names)]}
    atomic_write_text(root / "annotations" / f"instances_{split}.json", json.dumps(coco, separators=(",", ":")))
    return coco


def background_pixels(rng: np.random.Generator, size: int, background: str) -> np.ndarray:
    """The empty canvas, ``(size, size, 3)`` uint8: grey noise (the same level in the three channels) or black."""
    if background == "dark":
        return np.zeros((size, size, 3), dtype=np.uint8)
    grey = rng.integers(0, NOISE, (size, size), dtype=np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def draw_canvas(rng: np.random.Generator, pool, size: int, objects=(1, 4), scale=(0.5, 2.0),
                background: str = "noise") -> tuple[np.ndarray, list]:
    """One canvas from ``rng``: ``(pixels (size, size, 3) uint8, [((x0, y0, x1, y1), class index)])``, boxes in
    pixels with exclusive ends (``x1 - x0`` is the width), tight on each pasted item's nonzero pixels."""
    pixels = background_pixels(rng, size, background).astype(np.float32)
    images, labels = pool
    placed: list = []
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        for _try in range(TRIES):
            k = int(rng.integers(0, len(images)))
            side = min(size, max(1, round(28 * math.exp(rng.uniform(math.log(scale[0]), math.log(scale[1]))))))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
            tint = rng.integers(TINT[0], TINT[1], 3).astype(np.float32)
            alpha = resized(images[k], side)
            box = tight_box(alpha, x, y)
            if box is None or any(overlap(box, other) > MAX_OVERLAP for other, _ in placed):
                continue
            a = alpha[:, :, None].astype(np.float32) / 255.0
            patch = pixels[y:y + side, x:x + side]
            pixels[y:y + side, x:x + side] = patch * (1.0 - a) + tint * a
            placed.append((box, int(labels[k])))
            break
    return np.rint(pixels).clip(0, 255).astype(np.uint8), placed


def resized(item: np.ndarray, side: int) -> np.ndarray:
    """A 28x28 uint8 item resized to ``side`` x ``side`` (Pillow's bilinear filter), its pixels fainter than
    :data:`ALPHA_MIN` set to 0 (so every pixel the box spans for is visibly pasted)."""
    from PIL import Image

    out = item if side == item.shape[0] else np.asarray(Image.fromarray(item, "L").resize((side, side),
                                                                                           Image.BILINEAR))
    return np.where(out >= ALPHA_MIN, out, 0).astype(np.uint8)


def tight_box(alpha: np.ndarray, x: int, y: int) -> tuple[int, int, int, int] | None:
    """The extent ``(x0, y0, x1, y1)`` (exclusive ends) of ``alpha``'s nonzero pixels pasted at ``(x, y)``;
    None when it has none."""
    cols, rows = np.flatnonzero(alpha.any(axis=0)), np.flatnonzero(alpha.any(axis=1))
    if cols.size == 0:
        return None
    return x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1


def overlap(a, b) -> float:
    """The area two ``(x0, y0, x1, y1)`` boxes share, as a fraction of the smaller one's."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def _split_summary(coco: dict, names) -> dict:
    counts = np.bincount([a["category_id"] - 1 for a in coco["annotations"]], minlength=len(names))
    return {"images": len(coco["images"]), "objects": len(coco["annotations"]),
            "per_class": {n: int(c) for n, c in zip(names, counts)}}
