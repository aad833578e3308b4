"""--data imagefolder: real PNG/JPEG files in the ImageNet layout, decoded in DataLoader workers.

The transforms against hand-computed boxes and sizes, against torchvision v2's transforms and fmkt's previous
hand-written code (bit for bit); decoding against Pillow's (identical on PNG, JPEG within a stated difference); the
worker loader (the same batches whatever the
number of workers, skip(k), two ranks), unreadable files, subsets; end to end: distill with 2 workers, resume after an
interruption (the same metrics and weights as an uninterrupted run), eval and export; the TensorBoard logger.
"""
import importlib.util
import json
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from typer.testing import CliRunner

from fmkt.cli.app import app
from fmkt.data import ImageFolderSet, dataset_info, load_dataset, make_loader
from fmkt.data import transforms as T
from fmkt.errors import FmktError

from imagefolder_data import make_image_folder

runner = CliRunner()
HAVE_TB = importlib.util.find_spec("tensorboard") is not None
TIMING = ("epoch_seconds", "images_per_s")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """320 + 1 training files (10 classes), 100 + 1 validation files; one unreadable file in each split."""
    root = make_image_folder(tmp_path_factory.mktemp("imgs") / "data")
    (root / "train" / "digit_3" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "val" / "digit_5" / "broken.png").write_bytes(b"\x89PNG but not really")
    return root


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """80 training files (8 per class), 20 validation files, all readable."""
    return make_image_folder(tmp_path_factory.mktemp("clean") / "data", train_per_class=8, val_per_class=2)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # train.threads=1 in an in-process run sets it for the whole process


def splits(root, workers=0, size=32):
    train, val, info = load_dataset("imagefolder", root, image_size=size, workers=workers)
    return train, val, info


# ----------------------------------------------------------------------------- transforms, by hand
class Draws:
    """A stand-in for numpy's Generator: uniform() returns the given fractions of its range, integers() the
    given values (its calls recorded), random() the given coin."""

    def __init__(self, fractions, ints=(), coin=0.9):
        self.fractions, self.ints, self.coin, self.calls = list(fractions), list(ints), coin, []

    def uniform(self, lo, hi):
        return lo + (hi - lo) * self.fractions.pop(0)

    def integers(self, lo, hi):
        self.calls.append((lo, hi))
        return self.ints.pop(0)

    def random(self):
        return self.coin


SCALE_HALF = (0.5 - 0.08) / 0.92  # the fraction of (0.08, 1) that is a scale of 0.5
RATIO_ONE = 0.5  # log-uniform between log(3/4) and log(4/3): the middle is ratio 1


def test_random_resized_box_first_try():
    # 100 x 200 image, area 20000; scale 0.5 and ratio 1 -> a 100 x 100 box, top in [0, 0], left in [0, 100]
    rng = Draws([SCALE_HALF, RATIO_ONE], ints=[0, 37])
    assert T.random_resized_box(100, 200, rng) == (0, 37, 100, 100)
    assert rng.calls == [(0, 1), (0, 101)]


def test_random_resized_box_second_try():
    # try 1: scale 1, ratio 4/3 -> w = round(sqrt(20000 * 4/3)) = 163, h = round(sqrt(15000)) = 122 > 100: refused
    # try 2: scale 0.245 (area 4900), ratio 1 -> 70 x 70, top in [0, 30], left in [0, 130]
    rng = Draws([1.0, 1.0, (0.245 - 0.08) / 0.92, RATIO_ONE], ints=[5, 130])
    assert T.random_resized_box(100, 200, rng) == (5, 130, 70, 70)
    assert rng.calls == [(0, 31), (0, 131)]


@pytest.mark.parametrize("h,w,box", [
    (10, 1000, (0, 493, 10, 13)),   # too wide: h = 10, w = round(10 * 4/3) = 13, centred: (1000 - 13) // 2 = 493
    (1000, 10, (493, 0, 13, 10)),   # too tall: w = 10, h = round(10 / (3/4)) = 13
    (1, 1, (0, 0, 1, 1)),           # 1 x 1: every try rounds to 0 pixels; the ratio is in range: the whole image
])
def test_random_resized_box_falls_back_to_the_centre_after_ten_tries(h, w, box):
    scale = 1.0 if h * w > 1 else 0.0
    rng = Draws([scale, RATIO_ONE] * 10)
    assert T.random_resized_box(h, w, rng) == box
    assert rng.fractions == [] and rng.calls == []


def test_evaluation_resize_and_centre_crop_sizes():
    assert T.eval_resize(224) == 256 and T.eval_resize(32) == 36
    # 375 x 500 -> shorter side 256: 256 x int(256 * 500 / 375) = 256 x 341; the centre 224: top round(16.0) = 16,
    # left round(58.5) = 58 (half to even, as torchvision); and the same turned on its side
    ramp = torch.arange(375 * 500 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 375, 500)
    resized = TF.resize(ramp, [256, 341], antialias=True)
    assert torch.equal(T.eval_crop(ramp, 224), resized[:, 16:240, 58:282])
    tall = ramp.transpose(1, 2)
    assert torch.equal(T.eval_crop(tall, 224), TF.resize(tall, [341, 256], antialias=True)[:, 58:282, 16:240])
    image = torch.full((3, 375, 500), 77, dtype=torch.uint8)
    out = T.eval_crop(image, 224)
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8 and bool((out == 77).all())
    # the crop is the centre of the resized image: a left-dark / right-bright image stays dark left, bright right
    half = torch.zeros((3, 375, 500), dtype=torch.uint8)
    half[:, :, 250:] = 200
    out = T.eval_crop(half, 224)
    assert int(out[:, :, :100].max()) == 0 and int(out[:, :, 124:].min()) == 200


def test_train_crop_flips_with_the_coin():
    image = torch.zeros((3, 40, 40), dtype=torch.uint8)
    image[:, :, :20] = 255  # bright left half
    whole = [1.0, RATIO_ONE]  # scale 1, ratio 1 on a square: the whole image
    kept = T.train_crop(image, 32, Draws(whole, ints=[0, 0], coin=0.9))
    flipped = T.train_crop(image, 32, Draws(whole, ints=[0, 0], coin=0.1))
    assert kept.shape == flipped.shape == (3, 32, 32)
    assert int(kept[:, :, 0].min()) == 255 and int(kept[:, :, -1].max()) == 0
    assert torch.equal(flipped, kept.flip(-1))
    assert T.draw_train(40, 40, Draws(whole, ints=[0, 0], coin=0.1)) == ((0, 0, 40, 40), True)
    for k in range(20):  # the order of the draws (seeded runs crop as before): the box's, then the coin
        rng = T.item_rng(3, 1, k)
        box = T.random_resized_box(375, 500, rng)
        assert T.draw_train(375, 500, T.item_rng(3, 1, k)) == (box, bool(rng.random() < 0.5))


# ----------------------------------------------------------------------------- the transforms against torchvision
def previous_resize(chw, out_hw):
    """fmkt's own resize until issue 21 (kept here as the record the torchvision ops are checked against)."""
    x = chw[None].contiguous(memory_format=torch.channels_last)
    return torch.nn.functional.interpolate(x, size=tuple(out_hw), mode="bilinear", antialias=True,
                                           align_corners=False)[0]


def previous_eval_crop(chw, size):
    """fmkt's own evaluation crop until issue 21: its shorter-side and centre arithmetic, written out."""
    h, w, short = chw.shape[1], chw.shape[2], T.eval_resize(size)
    h, w = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
    out = previous_resize(chw, (h, w))
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return out[:, top:top + size, left:left + size]


def random_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        h, w = (int(v) for v in torch.randint(9, 400, (2,), generator=g))
        yield torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("size", [32, 224])
def test_crops_are_torchvision_v2_transforms_and_the_previous_code_bit_for_bit(size, monkeypatch):
    """Evaluation: v2's Resize + CenterCrop; training: v2's RandomResizedCrop given fmkt's box (its make_params
    replaced) then RandomHorizontalFlip; both also equal to fmkt's hand-written code they replaced."""
    evaluate = v2.Compose([v2.Resize(T.eval_resize(size), antialias=True), v2.CenterCrop(size)])
    resized_crop, flip = v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(p=1.0)
    flipped = 0
    for k, image in enumerate(random_images(40, seed=size)):
        out = T.eval_crop(image, size)
        assert out.shape == (3, size, size) and torch.equal(out, evaluate(image)), k
        assert torch.equal(out, previous_eval_crop(image, size)), k
        (top, left, h, w), coin = T.draw_train(image.shape[1], image.shape[2], T.item_rng(size, 0, k))
        monkeypatch.setattr(resized_crop, "make_params", lambda _: dict(top=top, left=left, height=h, width=w))
        want = resized_crop(image)
        assert torch.equal(want, previous_resize(image[:, top:top + h, left:left + w], (size, size))), k
        want = flip(want) if coin else want
        assert torch.equal(T.train_crop(image, size, T.item_rng(size, 0, k)), want), k
        flipped += coin
    assert 5 < flipped < 35  # both sides of the coin were checked


JPEG_TOLERANCE = 2  # measured 0 (torchvision 0.29.1 and Pillow 13, both on libjpeg-turbo); other builds may round
#                     the IDCT and the chroma upsampling differently by a level


def pillow_decode(path):
    """Pillow's decoding as fmkt did it until issue 21 (convert("RGB")), as (3, H, W) uint8."""
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def test_decoder_is_pillows_on_png_and_within_the_stated_difference_on_jpeg(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (37, 53, 4), dtype=np.uint8)
    rgb = Image.fromarray(pixels[..., :3])
    modes = {"L": rgb.convert("L"), "LA": rgb.convert("LA"), "RGB": rgb, "RGBA": Image.fromarray(pixels, "RGBA"),
             "P": rgb.convert("P")}
    for mode, img in modes.items():
        img.save(tmp_path / f"{mode}.png")
        assert torch.equal(T.decode_rgb(str(tmp_path / f"{mode}.png")), pillow_decode(tmp_path / f"{mode}.png")), mode
    modes["P"].save(tmp_path / "Pt.png", transparency=3)  # a palette with a transparent entry
    assert torch.equal(T.decode_rgb(str(tmp_path / "Pt.png")), pillow_decode(tmp_path / "Pt.png"))
    worst = 0
    for mode, quality in [("L", 90), ("RGB", 75), ("RGB", 95), ("CMYK", 90)]:
        path = tmp_path / f"{mode}{quality}.jpg"
        (rgb.convert(mode) if mode != "RGB" else rgb).save(path, quality=quality)
        got, want = T.decode_rgb(str(path)), pillow_decode(path)
        assert got.shape == want.shape == (3, 37, 53) and got.dtype == torch.uint8, mode
        worst = max(worst, int((got.int() - want.int()).abs().max()))
    assert worst <= JPEG_TOLERANCE, worst


def test_pillow_decodes_only_what_torchvision_cannot(tmp_path, monkeypatch):
    from torchvision.io import decode_image, read_file

    pixels = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for name, img in [("a.bmp", Image.fromarray(pixels)), ("a.tif", Image.fromarray(pixels)),
                      ("a.ppm", Image.fromarray(pixels)), ("a.pgm", Image.fromarray(pixels[..., 0]))]:
        img.save(tmp_path / name)
        with pytest.raises(RuntimeError, match="Unsupported image file"):  # else Pillow is not needed for it
            decode_image(read_file(str(tmp_path / name)))
        assert torch.equal(T.decode_rgb(str(tmp_path / name)), pillow_decode(tmp_path / name)), name
    Image.fromarray(pixels).save(tmp_path / "a.png")
    monkeypatch.setattr(T, "pillow_rgb", lambda path: pytest.fail(f"Pillow decoded {path}"))
    assert T.decode_rgb(str(tmp_path / "a.png")).shape == (3, 20, 30)


def test_decoding_converts_every_mode_to_rgb(tmp_path):
    grey = Image.new("L", (6, 4), 90)
    grey.save(tmp_path / "g.png")
    Image.new("RGBA", (6, 4), (10, 20, 30, 0)).save(tmp_path / "a.png")
    grey.convert("P").save(tmp_path / "p.png")
    Image.new("CMYK", (6, 4), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    for name, rgb in [("g.png", (90, 90, 90)), ("a.png", (10, 20, 30)), ("p.png", (90, 90, 90))]:
        out = T.decode_rgb(str(tmp_path / name))
        assert out.shape == (3, 4, 6) and out.dtype == torch.uint8 and out[:, 0, 0].tolist() == list(rgb), name
    assert T.decode_rgb(str(tmp_path / "c.jpg")).shape == (3, 4, 6)
    deep = (np.arange(24, dtype=np.uint16).reshape(4, 6) * 2731).astype(np.uint16)  # 0 ... 62813
    Image.fromarray(deep).save(tmp_path / "d.png")  # 16 bits: scaled to 8 (Pillow's conversion saturated at 255)
    out = T.decode_rgb(str(tmp_path / "d.png"))
    assert out.dtype == torch.uint8 and torch.equal(out[0], torch.from_numpy((deep >> 8).astype(np.uint8)))


def test_unreadable_files_raise_a_short_reason(tmp_path):
    Image.fromarray(np.full((30, 40, 3), 9, np.uint8)).save(tmp_path / "ok.jpg", quality=90)
    Image.fromarray(np.full((30, 40, 3), 9, np.uint8)).save(tmp_path / "ok.png")
    jpeg, png = (tmp_path / "ok.jpg").read_bytes(), (tmp_path / "ok.png").read_bytes()
    files = {"cut.jpg": jpeg[:len(jpeg) // 2], "cut.png": png[:len(png) // 2], "empty.jpg": b"",
             "junk.jpg": b"not a jpeg at all", "junk.png": b"\x89PNG but not really"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(Exception) as caught:
            T.decode_rgb(str(tmp_path / name))
        why = T.describe_error(caught.value)
        assert ".cpp:" not in why and len(why) < 160 and ":" in why, (name, why)
    assert T.jpeg_size(jpeg) == (30, 40) and T.jpeg_size(jpeg[:len(jpeg) // 2]) == (30, 40)  # the header is whole
    assert T.jpeg_size(jpeg[:20]) is None and T.jpeg_size(png) is None and T.jpeg_size(b"") is None


# ----------------------------------------------------------------------------- the folder and its loader
def test_folder_facts_subsets_and_holdout(clean):
    train, val, info = splits(clean)
    assert (len(train), len(val), info.num_classes, info.in_channels, info.image_size) == (80, 20, 10, 3, (32, 32))
    assert info.class_names == tuple(f"digit_{d}" for d in range(10))
    assert (info.mean, info.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert dataset_info("imagefolder", clean, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3).std == (0.25,) * 3
    sub = train.subset(20, seed=1)
    assert len(sub) == 20 and torch.bincount(sub.labels).tolist() == [2] * 10
    assert sub.files.tolist() == train.subset(20, seed=1).files.tolist() != train.subset(20, seed=2).files.tolist()
    held, rest = train.split(10, seed=0)
    assert len(held) == 10 and len(rest) == 70 and not set(held.files.tolist()) & set(rest.files.tolist())
    with pytest.raises(FmktError, match="needs --data-dir"):
        load_dataset("imagefolder")


def test_the_same_batches_whatever_the_number_of_workers(clean):
    train, _, info = splits(clean)
    batches = {}
    for workers in (0, 2):
        loader = make_loader(train, 16, shuffle=True, augment_info=info, seed=3, drop_last=True)
        loader.workers = workers
        loader.set_epoch(1)
        batches[workers] = list(loader)
    assert len(batches[0]) == 5
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert x0.dtype == torch.float32 and x0.shape == (16, 3, 32, 32)
        assert 0 <= float(x0.min()) <= float(x0.max()) <= 1
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    loader = make_loader(train, 16, shuffle=True, augment_info=info, seed=3, drop_last=True)
    loader.workers = 0
    loader.set_epoch(2)
    assert not torch.equal(next(iter(loader))[0], batches[0][0][0])  # another epoch: other items, other crops


def test_skip_starts_at_batch_k_and_decodes_nothing_before(clean, monkeypatch):
    import fmkt.data.workers as workers

    train, _, info = splits(clean)
    loader = make_loader(train, 8, shuffle=True, augment_info=info, seed=0, drop_last=True)
    loader.workers = 0
    full = list(loader)
    decoded = []
    real = workers.decode_rgb
    monkeypatch.setattr(workers, "decode_rgb", lambda path, data=None: decoded.append(path) or real(path, data))
    loader.skip(7)
    tail = list(loader)
    assert len(full) == 10 and len(tail) == 3 and len(decoded) == 3 * 8
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[7:], tail))
    assert len(list(loader)) == 10  # skip holds for one iteration


def test_two_ranks_see_disjoint_items_with_equal_batch_counts(clean):
    train, _, info = splits(clean)
    train = train.take(torch.arange(77))  # 77 items: rank 0 gets 39, rank 1 38 + one padded by wrapping around
    loaders = [make_loader(train, 8, shuffle=True, augment_info=info, seed=5, drop_last=True, rank=r, world_size=2)
               for r in range(2)]
    for loader in loaders:
        loader.set_epoch(4)
    idx = [loader.indices().tolist() for loader in loaders]
    assert len(loaders[0]) == len(loaders[1]) == 4 and len(idx[0]) == len(idx[1]) == 39
    assert set(idx[0]) | set(idx[1]) == set(range(77))
    assert len(set(idx[0]) & set(idx[1])) == 1  # the one padded item
    shards = [train.shard(r, 2) for r in range(2)]  # evaluation's share: no padding
    assert len(shards[0]) + len(shards[1]) == 77 and not set(shards[0].files.tolist()) & set(shards[1].files.tolist())


def test_unreadable_files_are_replaced_in_training_dropped_in_evaluation(clean, caplog):
    train, val, info = splits(clean)
    bad = ImageFolderSet(train.root, "train", np.concatenate([train.files[:14], [b"digit_0/missing.jpg"],
                                                              [train.files[14]]]),
                         torch.cat([train.labels[:14], torch.tensor([0]), train.labels[14:15]]), 32, 0)
    with caplog.at_level(logging.WARNING, logger="fmkt.data"):
        loader = make_loader(bad, 8, shuffle=True, augment_info=info, seed=0, drop_last=True)
        first = list(loader)
        again = list(loader)
    assert [len(y) for _, y in first] == [8, 8]  # static batch sizes: another item took the place
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))  # deterministically
    assert bad.skipped.count == 1 and bad.skipped.first == [bad.path(14)]
    assert "skipped unreadable file" in caplog.text and "missing.jpg" in caplog.text
    evaluated = sum(len(y) for _, y in make_loader(bad, 8))
    assert evaluated == 15  # an evaluation leaves it out
    hopeless = ImageFolderSet(train.root, "train", np.array([b"no/such.jpg"] * 4), torch.zeros(4, dtype=torch.long),
                              32, 0)
    with pytest.raises(FmktError, match="could not be decoded"):
        list(make_loader(hopeless, 2, shuffle=True, augment_info=info, drop_last=True))


# ----------------------------------------------------------------------------- end to end
def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def folder_args(root, *more):
    return ["--data", "imagefolder", "--data-dir", root, "--set", "data.image_size=32", "--set", "data.workers=2",
            "--batch-size", 32, "--set", "train.threads=1", *more]


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_distill_eval_and_export_from_a_folder(folder, tmp_path, one_thread):
    out = tmp_path / "d"
    log = "tensorboard" if HAVE_TB else "jsonl"
    result = cli("distill", *folder_args(folder), "--student", "resnet8", "--set", "teacher.arch=resnet8",
                 "--set", "teacher.epochs=1", "--epochs", 1, "--set", "method.train_steps=2", "--eval-steps", "1,2",
                 "--set", f"train.log={log}", "--out", out)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "artifact" / "fmkt.json").read_text())
    data = meta["dataset"]
    assert (data["name"], data["dir"], data["image_size"], data["num_classes"]) == \
        ("imagefolder", str(folder.resolve()), 32, 10)
    assert data["skipped_files"]["count"] >= 1 and str(folder.resolve() / "val/digit_5/broken.png") in \
        data["skipped_files"]["first"]
    assert meta["model"]["input"]["size"] == [32, 32] and meta["model"]["input"]["channels"] == 3
    if HAVE_TB:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"step/loss_ce", "step/lr", "step/images_per_s", "epoch/train_loss", "top1/K=1"} <= tags, tags
        assert len(events.Scalars("step/lr")) == 10  # 320 images / 32: a scalar per step

    evaluated = cli("eval", out / "artifact", "--steps", "1,2", "--json")  # the folder fmkt.json records
    assert evaluated.exit_code == 0, evaluated.output
    res = json.loads(evaluated.output)
    assert res["dataset"] == "imagefolder" and res["images"] == 101
    assert res["top1"]["1"] == pytest.approx(json.loads((out / "metrics.jsonl").read_text())["top1"]["1"])
    pytest.importorskip("onnxruntime")
    exported = cli("export", out / "artifact", "--steps", 1, "--out", tmp_path / "x")
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "x" / "model.onnx").is_file()
    report = json.loads((tmp_path / "x" / "parity.json").read_text())["reports"][0]  # the folder's own val images
    assert report["data"].startswith(f"imagefolder test split of {folder.resolve()}, first ") and report["passed"]


def test_fmkt_json_counts_the_validation_images_evaluated(tmp_path, one_thread):
    """An unreadable val file is left out of the evaluation: fmkt.json's metrics say how many images were scored
    (20, not the split's 21 files) and how many were left out."""
    root = make_image_folder(tmp_path / "data", train_per_class=4, val_per_class=2)
    (root / "val" / "digit_7" / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "t"
    result = cli("train", *folder_args(root, "--set", "data.workers=0", "--batch-size", 8), "--model", "resnet8",
                 "--epochs", 1, "--out", out)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "artifact" / "fmkt.json").read_text())
    assert (meta["metrics"]["images_evaluated"], meta["metrics"]["images_unreadable"]) == (20, 1)
    assert meta["metrics"]["split"] == "test" and meta["dataset"]["skipped_files"]["count"] == 1


def test_resume_mid_epoch_matches_an_uninterrupted_run(folder, tmp_path, monkeypatch, one_thread):
    args = ["train", *folder_args(folder), "--epochs", 2, "--set", "train.checkpoint_every_steps=4"]
    full = cli(*args, "--out", tmp_path / "full")
    assert full.exit_code == 0, full.output

    import fmkt.engine as engine

    real_evaluate, calls = engine.evaluate, {"n": 0}

    def crash_at_the_end_of_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(engine, "evaluate", crash_at_the_end_of_epoch_2)
    assert cli(*args, "--out", tmp_path / "res").exit_code == 130
    monkeypatch.setattr(engine, "evaluate", real_evaluate)
    resumed = cli(*args, "--out", tmp_path / "res", "--resume", "--set", "data.workers=1")  # workers may change
    assert resumed.exit_code == 0, resumed.output
    assert "epoch 2, step 8" in " ".join(resumed.output.split())  # 10 steps an epoch: 8 done, 2 left
    assert metrics(tmp_path / "res") == metrics(tmp_path / "full")
    sha = [json.loads((tmp_path / r / "artifact" / "fmkt.json").read_text())["weights_sha256"] for r in ("full", "res")]
    assert sha[0] == sha[1]


def test_tensorboard_missing_is_one_sentence_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    result = cli("train", "--epochs", 1, "--set", "train.log=tensorboard", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "needs the tensorboard package" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


def test_eval_refuses_a_folder_with_other_classes(folder, tmp_path):
    other = make_image_folder(tmp_path / "other", train_per_class=2, val_per_class=1, classes=3)
    meta = {"model": {"input": {"size": [32, 32]}}, "dataset": {"name": "imagefolder", "class_names": ["a"] * 10}}
    from fmkt.commands import eval_split

    with pytest.raises(FmktError, match="not the 10 classes"):
        eval_split("imagefolder", str(other), meta["model"], meta["dataset"])
    assert len(eval_split("imagefolder", str(folder), meta["model"], {})[1]) == 101


# ----------------------------------------------------------------------------- data.decode=gpu
def test_gpu_decode_is_refused_in_one_sentence_without_cuda(clean, tmp_path, monkeypatch):
    train, _, info = splits(clean)
    train.decode = "gpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FmktError, match=r"data.decode=gpu .* this machine has none \(torch.cuda.is_available\(\) "
                                        r"is False\); use data.decode=cpu\.$"):
        make_loader(train, 8, shuffle=True, augment_info=info, drop_last=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, a run on its CPU
    with pytest.raises(FmktError, match="this run is on cpu; set train.device=cuda or data.decode=cpu"):
        make_loader(train, 8, device="cpu")
    train.decode = "tpu"
    with pytest.raises(FmktError, match="data.decode is 'tpu': expected one of cpu, gpu"):
        make_loader(train, 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = cli("train", *folder_args(clean, "--set", "data.decode=gpu", "--set", "data.workers=0"), "--model",
                 "resnet8", "--epochs", 1, "--out", tmp_path / "o")
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "data.decode=gpu decodes JPEGs with nvjpeg" in text, result.output
    assert not (tmp_path / "o").exists()


def on_cpu_as_if_gpu(monkeypatch):
    """data.decode=gpu's byte path with its device decoding on the CPU (decode_jpeg(list, device="cpu")): all of it
    but the CUDA call; the refusal lifted."""
    import fmkt.data.workers as workers

    monkeypatch.setattr(workers, "refuse_gpu_decode", lambda device: None)
    return workers


def loader_batches(data, info, decode, workers, augment=True, epoch=1):
    data.decode = decode
    loader = make_loader(data, 8, shuffle=augment, augment_info=info if augment else None, seed=7, drop_last=augment)
    loader.workers = workers
    assert loader.fetch.encoded == (decode == "gpu")
    loader.set_epoch(epoch)
    return list(loader)


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


@pytest.fixture(scope="module")
def oblong(tmp_path_factory):
    """40 training files (4 per class), 10 validation files, 48 wide and 36 high."""
    return make_image_folder(tmp_path_factory.mktemp("oblong") / "data", train_per_class=4, val_per_class=1,
                             size=(48, 36))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_byte_path_draws_what_the_cpu_path_draws(oblong, monkeypatch, workers):
    """The workers draw each JPEG's box and flip from its header (no decoding) and the batch is decoded together
    afterwards: on the CPU, the very batches of data.decode=cpu, training and evaluation."""
    mod = on_cpu_as_if_gpu(monkeypatch)
    train, val, info = splits(oblong)
    sizes = [T.jpeg_size(T.read_bytes(train.path(i))) for i in range(len(train))]
    jpegs = [i for i, hw in enumerate(sizes) if hw is not None]
    assert 10 < len(jpegs) < len(train)  # JPEGs left encoded, PNGs decoded by the workers
    assert all(tuple(T.decode_rgb(train.path(i)).shape[1:]) == sizes[i] == (36, 48) for i in jpegs)
    seen = []
    real = mod.decode_jpegs
    monkeypatch.setattr(mod, "decode_jpegs", lambda datas, device: seen.append(len(datas)) or real(datas, device))
    assert same(loader_batches(train, info, "gpu", workers), loader_batches(train, info, "cpu", workers))
    assert same(loader_batches(val, info, "gpu", workers, augment=False), loader_batches(val, info, "cpu", 0, False))
    assert sum(seen) > 10 and max(seen) > 1  # decoded in batches


def test_the_byte_path_handles_bad_jpegs_as_the_workers_do(clean, tmp_path, monkeypatch):
    """A JPEG whose header reads but whose data does not: the device fails, the CPU fails, the file is skipped and
    counted, replaced in training by the item the CPU path picks, left out of an evaluation; a JPEG only the device
    cannot decode (as nvjpeg, CMYK) is decoded on the CPU."""
    mod = on_cpu_as_if_gpu(monkeypatch)
    train, _, info = splits(clean)
    good = next(i for i in range(len(train)) if train.path(i).endswith(".jpg"))
    data = open(train.path(good), "rb").read()
    (tmp_path / "train" / "digit_0").mkdir(parents=True)
    (tmp_path / "train" / "digit_0" / "cut.jpg").write_bytes(data[:len(data) // 2])
    files = np.array([f"{clean}/train/{f.decode()}".encode() for f in train.files[:15]] +
                     [str(tmp_path / "train" / "digit_0" / "cut.jpg").encode()])
    runs = {}
    for decode in ("cpu", "gpu"):
        bad = ImageFolderSet("/", "", files, torch.cat([train.labels[:15], torch.tensor([0])]), 32, 0)
        runs[decode] = (loader_batches(bad, info, decode, 0), loader_batches(bad, info, decode, 0, augment=False))
        assert bad.skipped.count == 1 and bad.skipped.first[0].endswith("cut.jpg"), decode
    assert same(runs["gpu"][0], runs["cpu"][0]) and same(runs["gpu"][1], runs["cpu"][1])
    assert sum(len(y) for _, y in runs["gpu"][1]) == 15 and [len(y) for _, y in runs["gpu"][0]] == [8, 8]
    monkeypatch.setattr(mod, "decode_jpegs", lambda datas, device: [None] * len(datas))
    assert same(loader_batches(train, info, "gpu", 0), loader_batches(train, info, "cpu", 0))
