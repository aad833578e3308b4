"""Decoding and the ImageNet transforms with torchvision: what happens to one file, whoever decodes it.

* :func:`decode_rgb`: the file's bytes (``torchvision.io.read_file``) decoded by ``torchvision.io.decode_image`` to
  ``(3, H, W)`` uint8 RGB (grey, grey + alpha, palette and CMYK images are converted, an alpha channel is dropped,
  an animated GIF gives its first frame: Pillow's ``convert("RGB")``, pixel for pixel on PNG, WebP and GIF, and on
  JPEG with the wheels tested, both on libjpeg-turbo; a 16-bit PNG is scaled to 8 bits, where Pillow saturated it). BMP, PPM/PGM and TIFF, which
  torchvision.io has no decoder for, are decoded by Pillow (:func:`pillow_rgb`), the only use of Pillow left.
* training (:func:`train_crop`): torchvision's ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))`` with
  its algorithm (:func:`random_resized_box`: 10 tries of a random area and log-uniform aspect ratio, then the
  central crop clamped to the ratio range), bilinear resize with antialiasing, then a horizontal flip with p = 0.5:
  :func:`draw_train` draws the box and the coin, :func:`apply_train` is ``torchvision.transforms.v2.functional``'s
  ``resized_crop`` (+ ``horizontal_flip``);
* evaluation (:func:`eval_crop`): v2's ``resize`` of the shorter side to ``floor(size / 0.875)`` (256 for 224),
  bilinear with antialiasing, then ``center_crop`` to ``size x size``.

Randomness comes from a ``numpy.random.Generator`` the caller seeds per item (:func:`item_rng`: seed, epoch and
item index), never from torch's global generator, so a crop never depends on which worker decoded the file or on
the order they finished, and ``data.decode=gpu`` draws the same boxes from the JPEG's header (:func:`jpeg_size`)
before any pixel is decoded. (torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec, with a
DeprecationWarning; they are what the tested range, torch 2.11-2.14 with torchvision 0.26-0.29, all has.) Images
stay uint8 until the batch reaches its device (on the CPU torchvision resizes uint8 natively, bit for bit what
fmkt's own code before issue 21 gave; on CUDA it resizes in float32 and rounds).
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from fmkt.errors import first_line

#: File endings read as images (case-insensitive): torchvision's ImageFolder list.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SCALE = (0.08, 1.0)  # RandomResizedCrop: the crop's area as a fraction of the image's
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # and its aspect ratio (width / height)
EVAL_CROP = 0.875  # evaluation: the centre crop is this fraction of the resized shorter side
JPEG = b"\xff\xd8\xff"
_TORCHVISION = (JPEG, b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")  # + RIFF....WEBP: what decode_image reads
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # JPEG frame headers (DHT, JPG, DAC are not)
_MASK = (1 << 64) - 1


def item_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of one item's random draws in one epoch (``stream`` 1: the choice of a replacement)."""
    return np.random.default_rng([int(seed) & _MASK, int(epoch) & _MASK, int(index) & _MASK, int(stream)])


def read_bytes(path: str) -> torch.Tensor:
    """The file's bytes as a 1-D uint8 tensor (raises for a missing or empty file)."""
    from torchvision.io import read_file

    return read_file(path)


def torchvision_decodes(data) -> bool:
    """Whether ``data`` (the file's first bytes) starts like a format ``torchvision.io.decode_image`` reads."""
    head = bytes(_uint8(data[:12]))
    return head.startswith(_TORCHVISION) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def decode_rgb(path: str, data: torch.Tensor | None = None) -> torch.Tensor:
    """The image file at ``path`` (``data``: its bytes, if already read) as ``(3, H, W)`` uint8 RGB. Raises
    whatever the decoder raises for a file it cannot read (not an image, truncated, empty, of size 0); the caller
    decides what a bad file means."""
    data = read_bytes(path) if data is None else data
    # Pillow only for what torchvision.io has no decoder for (BMP, PPM/PGM, TIFF) or what is no image at all
    image = decode_bytes(data) if torchvision_decodes(data) else pillow_rgb(path)
    if image.shape[-1] == 0 or image.shape[-2] == 0:
        raise ValueError("an image of size 0")
    return image


def decode_bytes(data: torch.Tensor) -> torch.Tensor:
    """JPEG/PNG/WebP/GIF bytes decoded on the CPU by ``torchvision.io.decode_image`` to ``(3, H, W)`` uint8 RGB."""
    from torchvision.io import ImageReadMode, decode_image

    return as_rgb8(decode_image(data, mode=ImageReadMode.RGB))


def decode_jpegs(datas: list, device) -> list:
    """JPEG bytes (1-D uint8 tensors) decoded together on ``device`` by ``torchvision.io.decode_jpeg`` on the list
    (batched nvjpeg on CUDA) as ``(3, H, W)`` uint8 RGB; when the batch fails, one by one, None for each that
    fails (CMYK or a corrupt file: the caller tries the CPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out = []
        for data in datas:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def as_rgb8(image: torch.Tensor) -> torch.Tensor:
    """A decoded image as ``(3, H, W)`` uint8: an animation's first frame, 16 bits scaled to 8."""
    if image.ndim == 4:
        image = image[0]
    if image.dtype != torch.uint8:
        from torchvision.transforms.v2 import functional as TF

        image = TF.to_dtype(image, torch.uint8, scale=True)
    return image


def pillow_rgb(path: str) -> torch.Tensor:
    """Pillow's decoding, kept only for the formats torchvision.io cannot decode (BMP, PPM/PGM, TIFF): the file
    converted to RGB as ``(3, H, W)`` uint8."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def _uint8(data) -> np.ndarray:
    """Bytes or a uint8 tensor as a uint8 array (no copy)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(data, dtype=np.uint8)


def jpeg_size(data) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG's frame header without decoding it (``data``: bytes or a uint8 array), or
    None when ``data`` is not a JPEG whose header says a non-empty size."""
    data = _uint8(data)
    if bytes(data[:3]) != JPEG:
        return None
    i, n = 2, len(data)
    while i + 9 <= n:
        marker = int(data[i + 1])
        if data[i] != 0xFF or marker in (0xD9, 0xDA):  # not a marker, or the end / the scan before any frame
            return None
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill byte, or a marker without length
            i += 1 if marker == 0xFF else 2
            continue
        if marker in _SOF:
            h, w = int(data[i + 5]) << 8 | int(data[i + 6]), int(data[i + 7]) << 8 | int(data[i + 8])
            return (h, w) if h and w else None
        i += 2 + (int(data[i + 2]) << 8 | int(data[i + 3]))
    return None


def describe_error(exc: BaseException) -> str:
    """A decoder's exception in one short line (torchvision's C++ location prefix dropped)."""
    text = re.sub(r"^.*?\.(cpp|cu|h):\d+, ", "", first_line(exc, None, with_type=False))[:120]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def random_resized_box(height: int, width: int, rng, scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop: torchvision's ``RandomResizedCrop.get_params`` with ``rng`` (a
    ``numpy.random.Generator``) in place of torch's global generator."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # fallback: the central crop, clamped to the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def eval_resize(size: int) -> int:
    """The shorter side an evaluation image is resized to before its central ``size`` crop (256 for 224)."""
    return int(size / EVAL_CROP)


def draw_train(height: int, width: int, rng) -> tuple[tuple[int, int, int, int], bool]:
    """The training transform's random draws for a ``height x width`` image, in their fixed order: (the
    RandomResizedCrop box, whether to flip)."""
    box = random_resized_box(height, width, rng)
    return box, bool(rng.random() < 0.5)


def apply_train(chw: torch.Tensor, box, flip: bool, size: int) -> torch.Tensor:
    """``box`` of ``chw`` resized to ``size x size`` (bilinear, antialiased), flipped if ``flip``."""
    from torchvision.transforms.v2 import functional as TF

    out = TF.resized_crop(chw, *box, [size, size], antialias=True)
    return TF.horizontal_flip(out) if flip else out


def crop(chw: torch.Tensor, draws, size: int) -> torch.Tensor:
    """The training transform with ``draws`` (:func:`draw_train`'s), or the evaluation's when ``draws`` is None,
    on any device (a CUDA image is resized in float32 and rounded: torchvision's uint8 path there)."""
    return eval_crop(chw, size) if draws is None else apply_train(chw, *draws, size)


def train_crop(chw: torch.Tensor, size: int, rng) -> torch.Tensor:
    """RandomResizedCrop to ``size x size`` then a horizontal flip with p = 0.5: ``(3, size, size)`` uint8."""
    return apply_train(chw, *draw_train(chw.shape[-2], chw.shape[-1], rng), size)


def eval_crop(chw: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``eval_resize(size)``, then the central ``size x size``: ``(3, size, size)``."""
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(TF.resize(chw, [eval_resize(size)], antialias=True), [size, size])
