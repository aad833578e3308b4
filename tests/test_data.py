"""Tests of fmkt.data: loaders (real digits / Fashion-MNIST, fake IDX and CIFAR folders),
error messages, augmentation and the seeded batch loader."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fmkt.data import (
    DATASETS,
    DIGITS_MEAN,
    DIGITS_STD,
    BatchLoader,
    DatasetInfo,
    ImageTensors,
    augment_batch,
    check_images,
    dataset_info,
    list_datasets,
    load_dataset,
    normalize,
    read_idx,
)
from fmkt.errors import FmktError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | arr.ndim
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool, magic: int | None = None) -> Path:
    data = idx_bytes(arr, magic)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_mnist_folder(folder: Path, gz: bool, n_train: int = 6, n_test: int = 4) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(folder / name, arr, gz)
    return arrays


def make_cifar_folder(root: Path, hundred: bool, per_file: int = 3) -> dict:
    rng = np.random.default_rng(1)
    if hundred:
        sub, files, key, ncls = "cifar-100-python", ["train", "test"], b"fine_labels", 100
    else:
        sub = "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        key, ncls = b"labels", 10
    folder = root / sub
    folder.mkdir(parents=True)
    content = {}
    for i, name in enumerate(files):
        data = rng.integers(0, 256, (per_file + i, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, ncls, per_file + i)]
        entry = {b"data": data, key: labels, b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        content[name] = (data, labels)
    return content


# ----------------------------------------------------------------------------- registry


def test_registry_and_info():
    assert list_datasets() == ["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder"]
    c10 = dataset_info("CIFAR10")
    assert (c10.crop_padding, c10.hflip, c10.in_channels, c10.num_classes) == (4, True, 3, 10)
    assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.2470, 0.2435, 0.2616)
    assert dataset_info("cifar100").num_classes == 100 and len(dataset_info("cifar100").class_names) == 100
    fm = dataset_info("fashion_mnist")
    assert (fm.crop_padding, fm.hflip, fm.mean, fm.std) == (2, False, (0.2860,), (0.3530,))
    assert fm.class_names[0] == "T-shirt/top" and len(fm.class_names) == 10
    assert dataset_info("mnist").mean == (0.1307,)
    d = dataset_info("digits")
    assert (d.crop_padding, d.hflip, d.image_size) == (1, False, (8, 8))
    for info in DATASETS.values():
        assert len(info.mean) == len(info.std) == info.in_channels
    with pytest.raises(FmktError, match="digits, mnist, fashion-mnist, cifar10, cifar100"):
        dataset_info("imagenet")
    with pytest.raises(FmktError, match="imagenet"):
        load_dataset("imagenet")


# ----------------------------------------------------------------------------- digits


def test_digits_split_shapes_range_and_stratification():
    train, test, info = load_dataset("digits")
    assert info.name == "digits"
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert len(train) == 1437 and len(test) == 360
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.images.min() >= 0 and train.images.max() == 1.0
    # values are k/16
    assert torch.equal(train.images * 16, (train.images * 16).round())
    counts_tr, counts_te = train.labels.bincount(), test.labels.bincount()
    assert ((counts_te.double() / (counts_tr + counts_te) - 0.2).abs() < 0.02).all()
    # pinned statistics equal the train split's
    assert abs(train.images.mean().item() - DIGITS_MEAN) < 1e-3
    assert abs(train.images.std().item() - DIGITS_STD) < 1e-3
    # deterministic and not corruptible through the returned tensors
    train.images.zero_()
    train.labels.fill_(3)
    again, test2, _ = load_dataset("digits")
    assert again.images.max() == 1.0 and again.labels.bincount().shape[0] == 10
    assert torch.equal(test.images, test2.images) and torch.equal(test.labels, test2.labels)


def test_subset_is_seeded_and_stratified():
    train, _, _ = load_dataset("digits")
    a = train.subset(200, seed=1)
    b = train.subset(200, seed=1)
    c = train.subset(200, seed=2)
    assert len(a) == 200 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    counts = a.labels.bincount(minlength=10).double()
    expected = 200 * train.labels.bincount().double() / len(train)
    assert ((counts - expected).abs() <= 1.0).all()
    assert len(train.subset(10**6, seed=0)) == len(train)


# ----------------------------------------------------------------------------- IDX


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} is absent (apt-get install -y dataset-fashion-mnist)")
def test_fashion_mnist_loads():
    train, test, info = load_dataset("fashion-mnist")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0
    assert abs(train.images.mean().item() - info.mean[0]) < 1e-3
    assert abs(train.images.std().item() - info.std[0]) < 1e-3


def test_read_idx_gz_and_raw(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = write_idx(tmp_path / "a-idx3-ubyte", arr, gz=False)
    gz = write_idx(tmp_path / "b-idx3-ubyte", arr, gz=True)
    assert gz.name.endswith(".gz")
    np.testing.assert_array_equal(read_idx(raw), arr)
    np.testing.assert_array_equal(read_idx(gz, expected_ndim=3), arr)
    with pytest.raises(FmktError, match=str(raw)):
        read_idx(raw, expected_ndim=1)


@pytest.mark.parametrize("gz", [False, True])
def test_tiny_mnist_folder_loads(tmp_path, gz):
    arrays = make_mnist_folder(tmp_path / "m", gz)
    train, test, info = load_dataset("mnist", tmp_path / "m")
    assert info.name == "mnist"
    assert train.images.shape == (6, 1, 28, 28) and test.images.shape == (4, 1, 28, 28)
    np.testing.assert_allclose(
        train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"] / 255.0, rtol=1e-6
    )
    assert train.labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_missing_folder_and_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FmktError) as e:
        load_dataset("fashion-mnist", missing)
    msg = str(e.value)
    assert str(missing) in msg and "train-images-idx3-ubyte(.gz)" in msg
    assert "dataset-fashion-mnist" in msg and "--data-dir" in msg
    folder = tmp_path / "partial"
    make_mnist_folder(folder, gz=True)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FmktError, match=str(folder)):
        load_dataset("mnist", folder)


def test_bad_magic_names_the_file(tmp_path):
    folder = tmp_path / "bad"
    make_mnist_folder(folder, gz=False)
    bad = folder / "train-images-idx3-ubyte"
    bad.write_bytes(idx_bytes(np.zeros((6, 28, 28), np.uint8), magic=0x12345678))
    with pytest.raises(FmktError) as e:
        load_dataset("mnist", folder)
    assert str(bad) in str(e.value) and "0x12345678" in str(e.value)


def test_wrong_sizes_raise(tmp_path):
    folder = tmp_path / "trunc"
    make_mnist_folder(folder, gz=False)
    img = folder / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-10])  # truncated data
    with pytest.raises(FmktError, match="bytes"):
        load_dataset("mnist", folder)
    folder2 = tmp_path / "count"
    make_mnist_folder(folder2, gz=False)
    write_idx(folder2 / "train-labels-idx1-ubyte", np.zeros(5, np.uint8), gz=False)
    with pytest.raises(FmktError, match="one label per image"):
        load_dataset("mnist", folder2)
    folder3 = tmp_path / "size"
    make_mnist_folder(folder3, gz=False)
    write_idx(folder3 / "t10k-images-idx3-ubyte", np.zeros((4, 32, 32), np.uint8), gz=False)
    with pytest.raises(FmktError, match="28x28"):
        load_dataset("mnist", folder3)
    folder4 = tmp_path / "corrupt-gz"
    make_mnist_folder(folder4, gz=True)
    (folder4 / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(FmktError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", folder4)


# ----------------------------------------------------------------------------- CIFAR


def test_fake_cifar10_loads_from_parent_and_folder(tmp_path):
    content = make_cifar_folder(tmp_path, hundred=False)
    train, test, info = load_dataset("cifar10", tmp_path)
    assert train.images.shape == (3 + 4 + 5 + 6 + 7, 3, 32, 32) and test.images.shape == (8, 3, 32, 32)
    data, labels = content["data_batch_1"]
    # row layout: 1024 red (row-major), then green, then blue
    assert train.images[0, 0, 0, 1].item() == pytest.approx(data[0, 1] / 255.0)
    assert train.images[0, 1, 0, 0].item() == pytest.approx(data[0, 1024] / 255.0)
    assert train.images[0, 2, 1, 0].item() == pytest.approx(data[0, 2048 + 32] / 255.0)
    assert train.labels[:3].tolist() == labels
    assert test.labels.tolist() == content["test_batch"][1]
    train2, _, _ = load_dataset("cifar10", tmp_path / "cifar-10-batches-py")
    assert torch.equal(train.images, train2.images)


def test_fake_cifar100_loads(tmp_path):
    content = make_cifar_folder(tmp_path, hundred=True)
    train, test, info = load_dataset("cifar100", tmp_path)
    assert info.num_classes == 100
    assert train.images.shape == (3, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.labels.tolist() == content["train"][1]


def test_cifar_errors_name_the_path(tmp_path):
    with pytest.raises(FmktError) as e:
        load_dataset("cifar10", tmp_path)
    assert str(tmp_path) in str(e.value) and "data_batch_1" in str(e.value)
    make_cifar_folder(tmp_path, hundred=True)
    bad = tmp_path / "cifar-100-python" / "test"
    with open(bad, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}, f)
    with pytest.raises(FmktError, match=str(bad)):
        load_dataset("cifar100", tmp_path)


# ----------------------------------------------------------------------------- checks and transforms


def test_check_images():
    check_images(torch.rand(2, 3, 4, 4))
    check_images(torch.rand(2, 1, 4, 4), in_channels=1)
    x = torch.rand(2, 3, 4, 4)
    x[1, 2, 0, 0] = float("nan")
    with pytest.raises(FmktError, match="NaN"):
        check_images(x)
    x[1, 2, 0, 0] = float("inf")
    with pytest.raises(FmktError, match="NaN or Inf"):
        check_images(x)
    with pytest.raises(FmktError, match="channels"):
        check_images(torch.rand(2, 2, 4, 4))
    with pytest.raises(FmktError, match="expected 1"):
        check_images(torch.rand(2, 3, 4, 4), in_channels=1)
    with pytest.raises(FmktError, match=r"\(N, C, H, W\)"):
        check_images(torch.rand(3, 4, 4))


def test_normalize():
    info = dataset_info("cifar10")
    x = torch.rand(4, 3, 5, 5)
    y = normalize(x, info)
    for c in range(3):
        assert torch.allclose(y[:, c], (x[:, c] - info.mean[c]) / info.std[c])
    with pytest.raises(FmktError):
        normalize(torch.rand(4, 1, 5, 5), info)


def _info(pad: int, flip: bool, channels: int = 3) -> DatasetInfo:
    return DatasetInfo("t", 10, channels, (8, 8), (0.5,) * channels, (0.5,) * channels, pad, flip)


def test_augment_deterministic_under_seed():
    x = torch.rand(16, 3, 8, 8)
    info = _info(2, True)
    a = augment_batch(x, info, torch.Generator().manual_seed(5))
    b = augment_batch(x, info, torch.Generator().manual_seed(5))
    c = augment_batch(x, info, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape


def test_crop_only_shifts_content():
    p, n = 2, 200
    base = torch.arange(1, 65, dtype=torch.float32).view(1, 1, 8, 8) / 64  # all distinct, nonzero
    x = base.expand(n, 3, 8, 8).clone()
    x[:, 1] *= 0.5
    out = augment_batch(x, _info(p, False), torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    seen = set()
    for i in range(n):
        match = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])
        ]
        assert len(match) == 1, i
        seen.add(match[0])
    assert len(seen) == (2 * p + 1) ** 2  # every offset occurs
    assert torch.equal(augment_batch(x, _info(0, False), torch.Generator()), x)


def test_flip_only_when_hflip():
    x = torch.rand(64, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, _info(0, False), g), x)
    out = augment_batch(x, _info(0, True), torch.Generator().manual_seed(0))
    same = [torch.equal(out[i], x[i]) for i in range(64)]
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    assert all(s or f for s, f in zip(same, flipped))
    assert 10 < sum(flipped) < 54


# ----------------------------------------------------------------------------- BatchLoader


def _ids(n: int, channels: int = 1) -> ImageTensors:
    """Items whose label is their index, and whose pixels all equal index / n."""
    labels = torch.arange(n)
    images = (labels.float() / n).view(n, 1, 1, 1).expand(n, channels, 4, 4).clone()
    return ImageTensors(images, labels)


def test_loader_covers_every_sample_once():
    data = _ids(103)
    loader = BatchLoader(data, batch_size=10, shuffle=True, seed=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 11
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(103))
    assert seen.tolist() != list(range(103))  # shuffled
    for x, y in batches:
        assert torch.equal(x[:, 0, 0, 0], y.float() / 103)
    plain = torch.cat([y for _, y in BatchLoader(data, 10, shuffle=False)])
    assert plain.tolist() == list(range(103))
    dropped = BatchLoader(data, 10, shuffle=True, drop_last=True)
    assert len(dropped) == 10 == len(list(dropped))
    assert all(len(y) == 10 for _, y in dropped)


def test_loader_set_epoch_and_reproducibility():
    data = _ids(64, channels=3)
    info = _info(1, True)
    loader = BatchLoader(data, 16, shuffle=True, augment_info=info, seed=7)
    first = list(loader)
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other = BatchLoader(data, 16, shuffle=True, augment_info=info, seed=7)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    loader.set_epoch(1)
    second = list(loader)
    assert torch.cat([y for _, y in second]).tolist() != torch.cat([y for _, y in first]).tolist()
    loader.set_epoch(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, loader))


def test_loader_shards_across_ranks():
    data = _ids(101)
    loaders = [BatchLoader(data, 8, shuffle=True, seed=1, rank=r, world_size=2) for r in range(2)]
    for ld in loaders:
        ld.set_epoch(4)
    shards = [torch.cat([y for _, y in ld]) for ld in loaders]
    assert len(loaders[0]) == len(loaders[1]) == 7
    assert len(shards[0]) == len(shards[1]) == 51
    assert set(shards[0].tolist()) | set(shards[1].tolist()) == set(range(101))
    # disjoint except the one padded item that wraps around
    assert len(set(shards[0].tolist()) & set(shards[1].tolist())) <= 1
    with pytest.raises(FmktError):
        BatchLoader(data, 8, rank=2, world_size=2)
    with pytest.raises(FmktError):
        BatchLoader(data, 0)


# Fixture: sha256 of each batch's image bytes (float32, C order) then label bytes (int64), for 70 images
# arange(70*3*32*32)/(70*3*32*32) shaped (70, 3, 32, 32), labels arange(70) % 100, cifar100's augmentation (crop
# padding 4, flips), batch 16, shuffle, seed 5, epoch 2; produced by the per-batch algorithm of commit 7f3a9f3
# (fmkt/data/loader.py before 60bbb5e pre-drew an epoch's randoms): BatchLoader.__iter__ calling augment_batch,
# which drew the crop offsets then the flips of each batch in turn; run twice, the same hashes.
PER_BATCH_HASHES = [
    "dbc82612e0ad4d0440c8445c46709d8ff168a67737e96c10a19f4e744680f980",
    "fbc0a53512a51b118cc57389df7bd018c048b4e1ef2d87ad23fefb4543db85aa",
    "c7a20932f4584f17608535786acb38a7fa88c104997f4fd894129111d0c69897",
    "d90b0924e56d41ef2cc4fec5ba87b336749021b495ae7a88d6e6dc38d4a49d84",
    "331f6f519045795578391e2acbcfaf14d1d0aec25708cb9c796f086e320e3c09",  # the partial batch of 6
]


@pytest.mark.parametrize("drop_last", [True, False])
def test_predrawn_augmentation_gives_the_same_batches(drop_last):
    """The loader draws an epoch's augmentation randoms up front (so a GPU-resident dataset needs no host work per
    batch): the batches are exactly those of drawing per batch, as before: pinned against the old algorithm's
    hashes (a change of draw order fails here), and against augment_batch per batch."""
    n = 70
    images = torch.arange(n * 3 * 32 * 32, dtype=torch.float32).reshape(n, 3, 32, 32) / (n * 3 * 32 * 32)
    pinned = BatchLoader(ImageTensors(images, torch.arange(n) % 100), 16, shuffle=True,
                         augment_info=dataset_info("cifar100"), seed=5, drop_last=drop_last)
    pinned.set_epoch(2)
    got = []
    for x, y in pinned:
        h = hashlib.sha256(x.contiguous().numpy().tobytes())
        h.update(y.numpy().tobytes())
        got.append(h.hexdigest())
    assert got == PER_BATCH_HASHES[:4 if drop_last else 5]

    info = dataset_info("fashion-mnist")
    gen = torch.Generator().manual_seed(3)
    data = ImageTensors(torch.rand(70, 1, 28, 28, generator=gen), torch.randint(0, 10, (70,), generator=gen))
    loader = BatchLoader(data, 16, shuffle=True, augment_info=info, seed=5, drop_last=False)
    loader.set_epoch(2)
    per_batch, idx, g = [], loader.indices(), loader._aug_generator()
    for b in range(len(loader)):
        sel = idx[b * 16:(b + 1) * 16]
        per_batch.append(augment_batch(data.images.index_select(0, sel), info, g))
    got = [images for images, _ in loader]
    assert len(got) == len(per_batch) == 5 and all(torch.equal(a, b) for a, b in zip(got, per_batch))
    moved = data.to("cpu")
    assert torch.equal(moved.images, data.images) and torch.equal(moved.labels, data.labels)


def test_holdout_split_is_stratified_disjoint_and_seeded():
    """data.holdout's split: the held-out part is exactly subset(n, seed) (stratified), the rest is everything else,
    nothing shared, the same for the same seed."""
    import torch

    from fmkt.data import ImageTensors

    images = torch.arange(120, dtype=torch.float32).view(120, 1, 1, 1)
    data = ImageTensors(images, torch.arange(120) % 6)
    held, rest = data.split(30, seed=4)
    assert len(held) == 30 and len(rest) == 90
    assert torch.equal(held.images, data.subset(30, seed=4).images)
    assert torch.bincount(held.labels).tolist() == [5] * 6
    assert set(held.images.flatten().tolist()).isdisjoint(rest.images.flatten().tolist())
    assert torch.equal(data.split(30, seed=4)[0].images, held.images)
    assert not torch.equal(data.split(30, seed=5)[0].images, held.images)
