"""A small real image folder in the ImageNet layout (ROOT/train/CLASS/*, ROOT/val/CLASS/*) for the tests: sklearn's
8x8 digits upscaled to 32x32 and written as PNG and JPEG files, grey, RGB and RGBA among them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = [f"digit_{d}" for d in range(10)]


def digit_images():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target


def write_image(path: Path, pixels: np.ndarray, k: int, size=32) -> None:
    """One digit as a ``size`` x ``size`` file (``size`` (w, h): oblong); ``k`` picks its format and mode (JPEG/PNG;
    grey, RGB, RGBA)."""
    grey = Image.fromarray(pixels, mode="L").resize(tuple(size) if isinstance(size, tuple) else (size, size),
                                                    Image.BILINEAR)
    if k % 3 == 1:  # a coloured digit
        rgb = np.stack([np.asarray(grey), np.asarray(grey) // 2, 255 - np.asarray(grey)], axis=-1)
        img = Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    elif k % 7 == 2:
        img = grey.convert("RGBA")
    else:
        img = grey
    if path.suffix == ".png":
        img.save(path)
    else:
        img.convert("RGB" if img.mode == "RGBA" else img.mode).save(path, quality=90)


def make_image_folder(root: Path, train_per_class: int = 32, val_per_class: int = 10, classes: int = 10,
                      size=32) -> Path:
    """ROOT with train/ and val/ holding ``classes`` digit classes of real PNG and JPEG files."""
    images, labels = digit_images()
    for split, per_class, offset in [("train", train_per_class, 0), ("val", val_per_class, 100)]:
        for c in range(classes):
            folder = root / split / CLASSES[c]
            folder.mkdir(parents=True, exist_ok=True)
            members = np.flatnonzero(labels == c)[offset:offset + per_class]
            for k, i in enumerate(members):
                ext = ".png" if k % 2 else (".jpeg" if k % 5 == 0 else ".jpg")
                write_image(folder / f"{split}_{i:04d}{ext}", images[i], k, size)
    return root
