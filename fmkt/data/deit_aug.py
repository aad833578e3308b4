"""DeiT's per-image augmentation and repeated augmentation, taken from timm, drawn from fmkt's seeded generators.

What DeiT (and the FM-KT authors' mmcls config for DeiT3-S -> DeiT-T) does to each training image after the random
resized crop and the flip, with timm's own pieces (``timm.data.create_transform(..., separate=True)``: its
secondary stage, the RandAugment of ``data.augment_policy``, and the RandomErasing of its final stage,
``data.reprob``, mode ``pixel``, one region), and which images an epoch shows (``data.repeated_aug``: timm's
``RepeatAugSampler``, each image that many times an epoch, its copies on different ranks).

The entry point is :class:`ImageAugment` (built once per worker by :func:`build_image_augment`, None when every key
is off): ``augment(image, generator)`` takes one ``(3, H, W)`` uint8 crop and a CPU ``torch.Generator`` and
returns the augmented ``(3, H, W)`` uint8 image. timm's transforms draw from Python's ``random``, numpy's and
torch's global generators; :func:`seeded_global_rngs` seeds all three from the generator for the call and restores
them after it, so the result depends on the image and the generator alone (not on the worker, the order workers
finish, or anything else that drew from the global generators), and the callers' global streams are untouched.
:func:`image_generator` is that generator for item ``index``'s copy ``repeat`` in ``epoch``: a stream of its own
beside the crop's ``fmkt.data.transforms.item_rng(seed, epoch, index)``.

Where the image-folder pipeline calls it (a DataLoader worker, per item, training only; see ``FolderLoader``):
right after the training crop, ``image = augment(image, image_generator(seed, epoch, index, repeat))`` on the uint8
crop (the file actually decoded, ``j``, when a replacement took the item's place). With ``data.repeated_aug`` the
epoch's items are :func:`repeated_indices`' (item, repeat) pairs and its length :func:`repeated_length`, and a
copy ``repeat >= 1`` draws its crop from ``item_rng(seed, epoch, index, stream=REPEAT_STREAM + repeat)`` (copy 0:
stream 0, as without repeats), so the copies differ. ``FolderLoader`` does all this; :func:`check_augmentation`
refuses these keys where nothing would apply them (without ``data.augment``, on in-memory data, with
``data.decode=gpu``). The split carries the keys (:class:`PerImage`, set
by ``fmkt.data.load_dataset``), the loader builds :class:`ImageAugment` in each worker.
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from fmkt.errors import FmktError, first_line

PER_IMAGE_KEYS = ("augment_policy", "reprob", "repeated_aug")  # DataConfig keys the folder pipeline applies
INTERPOLATION = "bicubic"  # RandAugment's geometric ops (DeiT's --train-interpolation, mmcls's hparams)
AUG_STREAM = 0xDE17_0000  # image_generator's SeedSequence word: apart from item_rng's streams 0 (crop), 1 (replacement)
REPEAT_STREAM = 0xDE17_1000  # + repeat: the crop stream of a repeated copy (repeat >= 1)
SELECTED_ROUND = 256  # RepeatAugSampler: the epoch's items per rank, a multiple of 256 / world
_MASK = (1 << 64) - 1


@contextmanager
def seeded_global_rngs(generator: torch.Generator):
    """Seed Python's ``random``, numpy's global and torch's global CPU generator from ``generator`` (a CPU
    ``torch.Generator``, advanced by one draw) for the ``with`` block, and restore all three after it."""
    words = torch.randint(0, 1 << 32, (6,), dtype=torch.int64, generator=generator).tolist()
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: CUDA's stream is not touched
        try:
            random.seed(words[0] << 32 | words[1])
            np.random.seed(words[2:4])
            torch.default_generator.manual_seed(words[4] << 32 | words[5])
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def image_generator(seed: int, epoch: int, index: int, repeat: int = 0) -> torch.Generator:
    """The generator of item ``index``'s copy ``repeat`` (0 without repeated augmentation) in ``epoch``."""
    words = [int(seed) & _MASK, int(epoch) & _MASK, int(index) & _MASK, AUG_STREAM + int(repeat)]
    state = np.random.SeedSequence(words).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _timm_stages(size: int, mean, std, policy: str, reprob: float):
    """timm's training transform in its three stages (its crop, its RandAugment, to-tensor/normalise/erasing)."""
    from timm.data import create_transform

    try:
        return create_transform(int(size), is_training=True, auto_augment=policy or None, color_jitter=None,
                                interpolation=INTERPOLATION, mean=tuple(mean), std=tuple(std), re_prob=float(reprob),
                                re_mode="pixel", re_count=1, separate=True)
    except Exception as exc:  # timm's parser asserts or raises KeyError/ValueError on a malformed string
        raise FmktError(f"data.augment_policy {policy!r} is not a timm auto-augment string ({first_line(exc)}); "
                        "DeiT's is rand-m9-mstd0.5-inc1.") from None


class ImageAugment:
    """timm's RandAugment (``policy``) then its RandomErasing (``reprob``) on one uint8 RGB crop (see the module
    docstring). ``mean``/``std``: the raw [0, 1] images' statistics; RandAugment fills with the mean colour and
    random erasing draws N(0, 1) noise after normalising with them (timm's, DeiT's and mmcls's fill), the erased
    pixels rounded back to uint8 and every other pixel left exactly as it was."""

    def __init__(self, size: int, mean, std, policy: str | None = None, reprob: float = 0.0):
        from timm.data.random_erasing import RandomErasing

        _, secondary, final = _timm_stages(size, mean, std, policy, reprob)
        self.rand_augment = list(secondary.transforms)  # [] without a policy (colour jitter is off)
        self.erasing = next((t for t in final.transforms if isinstance(t, RandomErasing)), None)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self.policy, self.reprob = policy, float(reprob)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``image``: (3, H, W) uint8 on the CPU; returns a new (3, H, W) uint8 image."""
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise FmktError(f"ImageAugment takes a (3, H, W) uint8 image, got {tuple(image.shape)} {image.dtype}.")
        with seeded_global_rngs(generator):
            if self.rand_augment:
                image = self._rand_augment(image)
            if self.erasing is not None:
                image = self._erase(image)
        return image

    def _rand_augment(self, image: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        pil = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
        for transform in self.rand_augment:
            pil = transform(pil)
        return torch.from_numpy(np.array(pil, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()

    def _erase(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.float() / 255.0 - self.mean) / self.std
        before = x.clone()
        x = self.erasing(x)
        back = ((x * self.std + self.mean) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        return torch.where(x != before, back, image)


@dataclass(frozen=True)
class PerImage:
    """An image folder's per-image keys as its loader needs them (the DataConfig's names), carried by the split."""

    augment_policy: str | None = None
    reprob: float = 0.0
    repeated_aug: int = 0


def per_image_options(data_cfg) -> PerImage | None:
    """``data_cfg``'s per-image keys (a DataConfig), or None when all are off."""
    if not any(getattr(data_cfg, k) for k in PER_IMAGE_KEYS):
        return None
    return PerImage(data_cfg.augment_policy or None, float(data_cfg.reprob), int(data_cfg.repeated_aug))


def build_image_augment(data_cfg, size: int, mean, std) -> ImageAugment | None:
    """The per-image augmentation ``data_cfg`` (a DataConfig or a :class:`PerImage`) asks for at crop ``size``, or None when it asks for
    none (a default run calls nothing, so it stays bit-identical)."""
    if not data_cfg.augment_policy and not data_cfg.reprob:
        return None
    return ImageAugment(size, mean, std, data_cfg.augment_policy, data_cfg.reprob)


# ------------------------------------------------------------------------------------------ repeated augmentation
def repeated_length(n: int, world: int, repeats: int) -> int:
    """Items per rank and epoch under repeated augmentation: timm's ``RepeatAugSampler.num_selected_samples``
    (``n // 256 * 256 / world``, or ``ceil(n / world)`` below 256 images, at most ``ceil(n * repeats / world)``),
    so an epoch shows about ``n`` images in all, each ``repeats`` times: ``1 / repeats`` of the dataset's files."""
    if n >= SELECTED_ROUND:
        selected = int(math.floor(n // SELECTED_ROUND * SELECTED_ROUND / world))
    else:
        selected = int(math.ceil(n / world))
    return min(selected, int(math.ceil(n * repeats / world)))


def repeated_indices(n: int, repeats: int, seed: int, epoch: int, rank: int, world: int,
                     shuffle: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s (item indices, repeat numbers) of an epoch in batch order, timm's ``RepeatAugSampler``: one
    permutation of ``n`` items (fmkt's: ``torch.Generator().manual_seed(seed + epoch)``, where timm seeds with the
    epoch alone; identical on every rank), each item repeated ``repeats`` times in a row, padded by wrapping around
    to a multiple of ``world``, every ``world``-th position from ``rank`` on, the first :func:`repeated_length`."""
    if repeats < 1:
        raise FmktError(f"data.repeated_aug must be >= 1 here, got {repeats}.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle else torch.arange(n)
    items = order.repeat_interleave(repeats)
    copies = torch.arange(repeats).repeat(n)
    total = int(math.ceil(n * repeats / world)) * world
    positions = torch.arange(rank, total, world)[:repeated_length(n, world, repeats)] % (n * repeats)
    return items[positions], copies[positions]


# ------------------------------------------------------------------------------------------ the config check
def check_augmentation(data_cfg) -> None:
    """One sentence if the per-image keys (``data.augment_policy``, ``data.reprob``, ``data.repeated_aug``) are set
    where nothing would apply them: without ``data.augment``, on in-memory data (they are the image-folder
    pipeline's), or with ``data.decode=gpu`` (they augment the CPU workers' crops). A malformed policy string is
    refused here too."""
    on = [k for k in PER_IMAGE_KEYS if getattr(data_cfg, k)]
    if not on:
        return
    keys = ", ".join(f"data.{k}" for k in on)
    if data_cfg.augment_policy:
        _timm_stages(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), data_cfg.augment_policy, 0.0)
    if not data_cfg.augment:
        raise FmktError(f"data.augment is false, and {keys} augment the training crops; turn it on or unset "
                        f"{keys}.")
    if data_cfg.name != "imagefolder":
        raise FmktError(f"per-image augmentation ({keys}) applies to image folders (--data imagefolder) only; "
                        f"{data_cfg.name} keeps its own (data.mixup and data.cutmix work with every dataset).")
    if data_cfg.decode == "gpu":
        raise FmktError(f"{keys} augment each decoded crop in the CPU workers, and data.decode=gpu decodes on the "
                        "GPU; use data.decode=cpu with them.")
