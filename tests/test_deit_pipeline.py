"""DeiT's per-image augmentation (RandAugment, random erasing) and repeated augmentation in the image-folder
pipeline: applied to training crops only, seeded per item (the same batches whatever the number of workers, skip(k)
sees what an uninterrupted epoch sees), timm's repeated-augmentation epoch (each item's copies in a row, each copy
its own crop), refused where nothing would apply them, and a DeiT-style distill from a folder with every key on.
"""
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from fmkt.cli.app import app
from fmkt.config import DataConfig
from fmkt.data import load_dataset, make_loader
from fmkt.data.deit_aug import PerImage, check_augmentation, per_image_options, repeated_length
from fmkt.errors import FmktError

from imagefolder_data import make_image_folder

DEIT = PerImage("rand-m9-mstd0.5-inc1", 0.25, 0)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """80 training files (8 per class), 20 validation files."""
    return make_image_folder(tmp_path_factory.mktemp("deit") / "data", train_per_class=8, val_per_class=2)


def batches(root, per_image, workers=0, shuffle=True, epoch=1, skip=0, bs=16):
    train, val, info = load_dataset("imagefolder", root, image_size=32, workers=workers, per_image=per_image)
    data = train if shuffle else val
    loader = make_loader(data, bs, shuffle=shuffle, augment_info=info if shuffle else None, seed=3,
                         drop_last=shuffle)
    loader.workers = workers
    loader.set_epoch(epoch)
    loader.skip(skip)
    return loader, list(loader)


def test_training_crops_are_augmented_seeded_per_item(clean):
    _, plain = batches(clean, None)
    _, deit = batches(clean, DEIT)
    _, deit2 = batches(clean, DEIT, workers=2)
    assert len(plain) == len(deit) == 5
    changed = 0
    for (x0, y0), (x1, y1), (x2, y2) in zip(plain, deit, deit2):
        assert torch.equal(y0, y1) and torch.equal(y1, y2)  # the same items in the same order
        assert torch.equal(x1, x2)  # whatever the number of workers
        assert x1.dtype == torch.float32 and 0 <= float(x1.min()) <= float(x1.max()) <= 1
        changed += int((x0 != x1).flatten(1).any(1).sum())
    assert changed >= 40  # RandAugment's two ops change almost every crop
    _, other_epoch = batches(clean, DEIT, epoch=2)
    assert not torch.equal(other_epoch[0][0], deit[0][0])


def test_evaluation_is_never_augmented(clean):
    _, plain = batches(clean, None, shuffle=False)
    _, deit = batches(clean, DEIT, shuffle=False)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, deit))


def test_skip_sees_what_an_uninterrupted_epoch_sees(clean):
    _, full = batches(clean, PerImage("rand-m9-mstd0.5-inc1", 0.25, 3), bs=8)
    _, tail = batches(clean, PerImage("rand-m9-mstd0.5-inc1", 0.25, 3), bs=8, skip=7)
    assert len(tail) == len(full) - 7
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[7:], tail))


def test_repeated_augmentation_shows_each_item_in_a_row_with_its_own_crops(clean):
    loader, got = batches(clean, PerImage(None, 0.0, 3), bs=8)
    assert loader.num_samples == repeated_length(80, 1, 3) == 80 and len(got) == 10
    items, copies = loader.copies()
    assert items.tolist()[:6] == [items[0].item()] * 3 + [items[3].item()] * 3 and copies.tolist()[:6] == [0, 1, 2] * 2
    images = torch.cat([x for x, _ in got])
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])  # one file, 3 crops
    ranks = []
    for rank in (0, 1):
        train, _, info = load_dataset("imagefolder", clean, image_size=32, workers=0, per_image=PerImage(None, 0, 3))
        ranked = make_loader(train, 8, shuffle=True, augment_info=info, seed=3, drop_last=True, rank=rank,
                             world_size=2)
        ranks.append((len(ranked), ranked.copies()))
    assert ranks[0][0] == ranks[1][0] == repeated_length(80, 2, 3) // 8
    pairs = [set(zip(i.tolist(), c.tolist())) for _, (i, c) in ranks]
    assert not pairs[0] & pairs[1]  # a copy is on one rank only


def test_the_keys_are_refused_where_nothing_applies_them():
    for data, what in [(DataConfig(name="imagefolder", reprob=0.25, decode="gpu"), "data.decode=cpu"),
                       (DataConfig(name="digits", repeated_aug=3), "image folders")]:
        with pytest.raises(FmktError, match=what):
            check_augmentation(data)
    check_augmentation(DataConfig(name="imagefolder", augment_policy="rand-m9-mstd0.5-inc1", reprob=0.25,
                                  repeated_aug=3))
    assert per_image_options(DataConfig(name="imagefolder")) is None
    assert per_image_options(DataConfig(name="imagefolder", reprob=0.25)) == PerImage(None, 0.25, 0)


def test_a_deit_style_distill_from_a_folder(clean, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "distill", "--data", "imagefolder", "--data-dir", str(clean), "--student", "resnet8", "--teacher-model",
        "resnet8", "--out", str(out), "--epochs", "1", "--eval-steps", "1", "--set", "data.image_size=32",
        "--set", "data.workers=0", "--set", "data.batch_size=16", "--set", "method.train_steps=2",
        "--set", "data.augment_policy=rand-m9-mstd0.5-inc1", "--set", "data.reprob=0.25",
        "--set", "data.repeated_aug=3", "--set", "data.mixup=0.8", "--set", "data.cutmix=1.0",
        "--set", "train.threads=1"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and math.isfinite(rows[0]["train_loss"])
