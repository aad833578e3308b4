"""The one dataset interface (fmkt.data.split.Split) and the one sampler (fmkt.data.loader.EpochSampler).

- A new dataset kind is one class implementing the interface plus its registry entry: a toy kind (host-resident
  uint8 arrays with its own loader on the shared sampler) trains, evaluates, records and feeds export parity through
  the CLI's own path, with no other change.
- Both kinds answer the interface: where they live, how they shard, what fmkt.json records of them, which loader
  batches them; their loaders are one sampler (the same items for the same seed, epoch and rank).
- Export parity reads the data the artifact records: an image folder's val files (its folder from fmkt.json) at the
  artifact's input size, decoded as evaluation decodes them; a seeded random batch, said so, when the folder is gone.
"""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fmkt.cli.app import app
from fmkt.data import DATASET_SOURCES, BatchLoader, DatasetInfo, EpochSampler, FolderLoader, ImageFolderSet, \
    ImageTensors, Split, load_dataset, make_loader
from fmkt.data.sources import DatasetSource
from fmkt.errors import FmktError
from fmkt.export.parity import parity_images

from imagefolder_data import make_image_folder

runner = CliRunner()


# ----------------------------------------------------------------------------- a new kind: one class
class ToyLoader(EpochSampler):
    """The toy kind's loader: the shared sampler's items, converted to float on the fly."""

    def __init__(self, data, batch_size, **sampling):
        super().__init__(len(data), batch_size, **sampling)
        self.data = data

    def __iter__(self):
        idx = self.indices()
        for b in self.batch_numbers():
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield torch.from_numpy(self.data.pixels[sel.numpy()]).float().div_(255.0), self.data.labels[sel]


class ToySplit(Split):
    """uint8 (N, 1, 8, 8) pixels kept on the host as numpy: a kind fmkt has never seen."""

    def __init__(self, pixels: np.ndarray, labels: torch.Tensor) -> None:
        self.pixels, self.labels = pixels, labels

    def take(self, indices):
        return ToySplit(self.pixels[indices.numpy()], self.labels[indices])

    def loader(self, batch_size, *, shuffle=False, augment_info=None, seed=0, drop_last=False, rank=0,
               world_size=1, device=None):
        return ToyLoader(self, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank,
                         world_size=world_size)

    def sample_inputs(self, n):
        return torch.from_numpy(self.pixels[:n]).float().div_(255.0)

    def record(self, *others):
        return {"toy_items": len(self) + sum(len(o) for o in others)}

    @classmethod
    def open(cls, source, data_dir, *, image_size=None, workers=None, decode="cpu", per_image=None):
        rng = np.random.default_rng(0)

        def split(n):
            labels = rng.integers(0, 4, n)
            pixels = (labels[:, None, None, None] * 60 + rng.integers(0, 20, (n, 1, 8, 8))).astype(np.uint8)
            return cls(pixels, torch.from_numpy(labels))

        return split(96), split(40), source.info


TOY_INFO = DatasetInfo("toy", 4, 1, (8, 8), (0.4,), (0.3,), 0, False, ("a", "b", "c", "d"))


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(DATASET_SOURCES, "toy", DatasetSource(TOY_INFO, "toy", None, kind=ToySplit))
    return "toy"


def test_a_new_dataset_kind_is_one_class(toy, tmp_path):
    """Registered with its class, the toy kind trains and is evaluated through the CLI's own path (the engine, the
    evaluation, fmkt.json, eval, export parity) with nothing else told about it."""
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", toy, "--model", "resnet8", "--epochs", "1", "--batch-size", "16",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "artifact" / "fmkt.json").read_text())
    assert meta["dataset"]["name"] == "toy" and meta["dataset"]["toy_items"] == 136  # the kind's own record
    assert meta["metrics"]["images_evaluated"] == 40 and "images_unreadable" not in meta["metrics"]
    evaluated = runner.invoke(app, ["eval", str(out / "artifact"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    res = json.loads(evaluated.output)
    assert res["images"] == 40 and res["top1"]["plain"] == pytest.approx(meta["metrics"]["last"]["plain"])
    images, source = parity_images(meta, 12)
    assert source == "toy test split, first 12 images"
    assert torch.equal(images, load_dataset("toy")[1].sample_inputs(12))


def test_a_kind_must_implement_the_interface():
    class Half(Split):  # no loader, no sample_inputs, no open
        def take(self, indices):
            return self

    with pytest.raises(TypeError, match="abstract"):
        Half()


# ----------------------------------------------------------------------------- the two kinds, one interface
@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """80 training files (8 per class), 20 validation files, all readable."""
    return make_image_folder(tmp_path_factory.mktemp("kinds") / "data", train_per_class=8, val_per_class=2)


def test_both_kinds_answer_the_interface(clean):
    tensors, _, info = load_dataset("digits")
    folder, val, _ = load_dataset("imagefolder", clean, image_size=32, workers=0)
    assert isinstance(tensors, Split) and isinstance(folder, Split)
    assert tensors.resident and not folder.resident  # where they live: in memory (movable) / the host
    assert torch.equal(tensors.to("cpu").images, tensors.images)
    with pytest.raises(FmktError, match="stays on the host"):
        folder.to("cpu")
    assert isinstance(make_loader(tensors, 8), BatchLoader) and isinstance(make_loader(folder, 8), FolderLoader)
    shard = tensors.shard(1, 3)
    assert torch.equal(shard.images, tensors.images[1::3]) and len(folder.shard(1, 3)) == len(range(1, 80, 3))
    assert tensors.record(tensors) == {}
    assert folder.record(val) == {"dir": str(clean.resolve()), "image_size": 32,
                                  "skipped_files": {"count": 0, "first": []}}
    assert tensors.evaluation_record() == {"images_evaluated": len(tensors)}
    assert val.evaluation_record() == {"images_evaluated": None, "images_unreadable": None}  # not evaluated here
    val.evaluated = 19
    assert val.evaluation_record() == {"images_evaluated": 19, "images_unreadable": 1}
    tensors.check(info)
    with pytest.raises(FmktError, match="channels"):
        ImageTensors(torch.zeros(2, 2, 8, 8), torch.zeros(2, dtype=torch.long)).check(info)


def test_one_sampler_gives_both_kinds_the_same_items(clean):
    """BatchLoader and FolderLoader are one EpochSampler: the same items, batch by batch, for the same length, seed,
    epoch and rank; the same batch count; skip(k) starts both at batch k once."""
    folder, _, info = load_dataset("imagefolder", clean, image_size=32, workers=0)
    tensors = load_dataset("digits")[0].take(torch.arange(len(folder)))
    for rank in (0, 1):
        loaders = [make_loader(d, 8, shuffle=True, augment_info=None, seed=5, drop_last=True, rank=rank,
                               world_size=2) for d in (tensors, folder)]
        for loader in loaders:
            loader.set_epoch(3)
        assert len(loaders[0]) == len(loaders[1]) == 5
        assert torch.equal(loaders[0].indices(), loaders[1].indices())
    sampler = EpochSampler(80, 8, shuffle=True, seed=5, drop_last=True)
    sampler.skip(3)
    assert list(sampler.batch_numbers()) == [3, 4, 5, 6, 7, 8, 9] and list(sampler.batch_numbers()) == list(range(10))


# ----------------------------------------------------------------------------- export parity reads the recorded data
def test_parity_reads_the_image_folder_the_artifact_records(clean, tmp_path):
    meta = {"model": {"input": {"channels": 3, "size": [32, 32]}},
            "dataset": {"name": "imagefolder", "dir": str(clean.resolve()), "image_size": 32,
                        "class_names": [f"digit_{d}" for d in range(10)]}}
    images, source = parity_images(meta, 12)
    assert source == f"imagefolder test split of {clean.resolve()}, first 12 images, resized to 32x32 as " \
                     "data.image_size does"
    _, val, _ = load_dataset("imagefolder", clean, image_size=32, workers=0)
    expected = next(iter(make_loader(val.take(torch.arange(12)), 12)))[0]  # the evaluation transform's crops
    assert images.shape == (12, 3, 32, 32) and torch.equal(images, expected)
    gone = {**meta, "dataset": {**meta["dataset"], "dir": str(tmp_path / "moved")}}
    images, source = parity_images(gone, 12)
    assert images.shape == (12, 3, 32, 32) and source.startswith("seeded random batch")
