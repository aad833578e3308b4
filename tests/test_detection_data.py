"""Issue 23's detection data: the Fashion-MNIST canvases (tight boxes, seeded, valid COCO), the COCO reader's
handling of bad annotations, the v2 transforms' boxes (hand computations) and the seeded worker loader."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fmkt.data.transforms import item_rng
from fmkt.detection import DetectionLoader, eval_transform, make_detection_data, open_coco, to_original, \
    train_transform
from fmkt.detection.canvas import MAX_OVERLAP, draw_canvas, overlap
from fmkt.errors import FmktError

FASHION = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST is not installed")


@pytest.fixture
def one_thread():
    """Tiny tensors on a busy shared runner: one intra-op thread is as fast and far steadier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def canvases(tmp_path_factory):
    root = tmp_path_factory.mktemp("det") / "canvases"
    calls = []
    summary = make_detection_data(root, train=20, val=6, canvas=64, seed=3,
                                  progress=lambda split, done, total: calls.append((split, done, total)))
    return root, summary, calls


# --- canvases ---------------------------------------------------------------------------------------------------

def test_box_is_tight_on_the_pasted_item_by_hand():
    item = np.zeros((28, 28), dtype=np.uint8)
    item[5:21, 10:15] = 200  # a 5-wide, 16-tall bar inside the 28x28 square
    pixels, placed = draw_canvas(np.random.default_rng(0), (item[None], np.array([4])), 40, objects=(1, 1),
                                 scale=(1.0, 1.0), background="dark")
    ((x0, y0, x1, y1), label), = placed
    assert label == 4 and (x1 - x0, y1 - y0) == (5, 16)  # the bar, not the 28x28 square
    rows, cols = np.flatnonzero(pixels.any(axis=(1, 2))), np.flatnonzero(pixels.any(axis=(0, 2)))
    assert (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) == (x0, y0, x1, y1)
    assert (pixels[y0:y1, x0:x1] > 0).all(axis=2).all()  # every pixel of the bar was pasted


@needs_fashion
def test_box_is_tight_on_real_items_at_every_scale():
    from fmkt.detection.canvas import _read_items

    pool = _read_items("fashion-mnist", None)[0]["train"]
    for seed in range(12):
        pixels, placed = draw_canvas(np.random.default_rng(seed), pool, 96, objects=(1, 1), background="dark")
        (x0, y0, x1, y1), _ = placed[0]
        rows, cols = np.flatnonzero(pixels.any(axis=(1, 2))), np.flatnonzero(pixels.any(axis=(0, 2)))
        assert (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) == (x0, y0, x1, y1), seed


@needs_fashion
def test_canvases_are_valid_coco_and_seeded(canvases, tmp_path):
    from pycocotools.coco import COCO

    root, summary, calls = canvases
    assert summary["splits"]["train"]["images"] == 20 and summary["splits"]["val"]["images"] == 6
    assert calls[-1] == ("val", 6, 6) and len(calls) == 26
    for split, n in (("train", 20), ("val", 6)):
        path = root / "annotations" / f"instances_{split}.json"
        coco = COCO(str(path))
        assert len(coco.getImgIds()) == n and sorted(coco.getCatIds()) == list(range(1, 11))
        assert coco.cats[1]["name"] == "T-shirt/top" and coco.cats[10]["name"] == "Ankle boot"
        data = json.loads(path.read_text())
        assert summary["splits"][split]["objects"] == len(data["annotations"]) >= n
        for img in data["images"]:
            with Image.open(root / split / img["file_name"]) as png:
                assert png.mode == "RGB" and png.size == (64, 64)
            boxes = [a["bbox"] for a in data["annotations"] if a["image_id"] == img["id"]]
            assert 1 <= len(boxes) <= 4
            xyxy = [(x, y, x + w, y + h) for x, y, w, h in boxes]
            assert all(0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 for x0, y0, x1, y1 in xyxy)
            assert all(overlap(a, b) <= MAX_OVERLAP for i, a in enumerate(xyxy) for b in xyxy[i + 1:])
        assert all(a["iscrowd"] == 0 and a["area"] == a["bbox"][2] * a["bbox"][3] for a in data["annotations"])
    again = make_detection_data(tmp_path / "again", train=20, val=6, canvas=64, seed=3)
    other = make_detection_data(tmp_path / "other", train=20, val=6, canvas=64, seed=4)
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        assert (tmp_path / "again" / name).read_bytes() == (root / name).read_bytes()
        assert (tmp_path / "other" / name).read_bytes() != (root / name).read_bytes()
    assert (tmp_path / "again/train/000007.png").read_bytes() == (root / "train/000007.png").read_bytes()
    assert again["splits"] == summary["splits"] and other["splits"] != summary["splits"]
    with pytest.raises(FmktError, match="already exists"):
        make_detection_data(tmp_path / "again", train=1, val=1, canvas=64)


# --- the COCO reader ----------------------------------------------------------------------------------------------

def write_coco(root, images, annotations, categories, files=None):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "train").mkdir(exist_ok=True)
    for img in images if files is None else files:
        Image.new("RGB", (img["width"], img["height"])).save(root / "train" / img["file_name"])
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))


def bad_dataset(root):
    images = [{"id": 1, "file_name": "a.png", "width": 100, "height": 80},
              {"id": 2, "file_name": "b.png", "width": 50, "height": 50},
              {"id": 3, "file_name": "c.png", "width": 50, "height": 50}]
    cats = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    ann = [([10, 10, 20, 30], 1, 3, 0),  # 1: good
           ([90, 70, 20, 20], 1, 7, 0),  # 2: clipped to [90, 70, 10, 10]
           ([120, 10, 10, 10], 1, 3, 0),  # 3: outside the image
           ([10, 10, 0, 5], 1, 3, 0),  # 4: zero width
           ([10, 10, 5, -2], 1, 3, 0),  # 5: negative height
           ([10, 10, 5, 5], 1, 99, 0),  # 6: unknown category
           ([10, 10, 5, 5], 42, 3, 0),  # 7: unknown image
           ([1, 2, 3], 1, 3, 0),  # 8: malformed bbox
           ([5, 5, 20, 20], 2, 3, 1)]  # 9: crowd (b.png's only annotation)
    anns = [{"id": n, "image_id": i, "category_id": c, "bbox": b, "iscrowd": crowd, "area": 1.0}
            for n, (b, i, c, crowd) in enumerate(ann, start=1)]
    write_coco(root, images, anns, cats)


def test_bad_annotations_are_handled_counted_and_named(tmp_path):
    bad_dataset(tmp_path)
    split = open_coco(tmp_path, "train")
    assert split.report.counts == {"clipped": 1, "outside": 1, "empty": 2, "unknown_category": 1,
                                   "unknown_image": 1, "malformed": 1, "crowd": 1, "no_boxes": 2}
    ex = split.report.examples
    assert ex["empty"] == ["annotation 4 of a.png", "annotation 5 of a.png"]
    assert ex["unknown_image"] == ["annotation 7 (image id 42)"] and ex["no_boxes"] == ["b.png", "c.png"]
    assert ex["clipped"] == ["annotation 2 of a.png"] and ex["crowd"] == ["annotation 9 of b.png"]
    assert split.report.dropped() == 6
    lines = "\n".join(split.report.lines())
    assert ": 2 annotation(s) have a zero or negative width" in lines and "2 image(s) have no box" in lines
    assert split.names == ("three", "seven") and split.cat_ids == (3, 7) and split.num_classes == 2
    assert split.train_indices.tolist() == [0] and len(split) == 3
    target = split.target(0)
    assert target["boxes"].tolist() == [[10, 10, 30, 40], [90, 70, 100, 80]]
    assert target["labels"].tolist() == [1, 2] and target["boxes"].dtype == torch.float32
    assert split.target(1)["boxes"].shape == (0, 4)
    gt = {a["id"]: a for a in split.gt["annotations"]}
    assert sorted(gt) == [1, 2, 9] and gt[2]["bbox"] == [90, 70, 10, 10] and gt[9]["iscrowd"] == 1
    assert gt[2]["area"] == 100.0 and gt[1]["area"] == 1.0  # a clipped box's area is recomputed
    assert len(split.gt["images"]) == 3  # images without boxes stay for evaluation


def test_missing_and_malformed_files_are_one_sentence(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in range(5)]
    write_coco(tmp_path, images, [], [{"id": 1, "name": "x"}], files=images[:2])
    with pytest.raises(FmktError, match=r"3 of the 5 images .* \(first: 2.png, 3.png, 4.png\)") as err:
        open_coco(tmp_path, "train")
    assert "\n" not in str(err.value)
    assert len(open_coco(tmp_path, "train", check_files=False)) == 5
    with pytest.raises(FmktError, match="not found"):
        open_coco(tmp_path, "val")
    path = tmp_path / "annotations" / "instances_train.json"
    for text, match in [("{", "not valid JSON"), ('{"images": []}', "no 'images' and 'categories'"),
                        ('{"images": [{"id": 1}], "categories": []}', "image entry 0"),
                        ('{"images": [], "categories": []}', "no categories")]:
        path.write_text(text)
        with pytest.raises(FmktError, match=match) as err:
            open_coco(tmp_path, "train")
        assert "\n" not in str(err.value)


# --- transforms ---------------------------------------------------------------------------------------------------

def test_boxes_follow_resize_and_flip_by_hand(one_thread):
    image = torch.zeros((3, 40, 80), dtype=torch.uint8)
    image[:, 0:20, 0:40] = 255  # the top-left quarter, which a flip sends to the top right
    boxes = torch.tensor([[0.0, 0.0, 40.0, 20.0], [8.0, 4.0, 24.0, 36.0]])
    out, resized = eval_transform(image, boxes, 20)
    assert out.shape == (3, 20, 20) and out.dtype == torch.uint8
    assert resized.tolist() == [[0, 0, 10, 10], [2, 2, 6, 18]]  # x * 20/80, y * 20/40
    # the pixels moved with the boxes (antialiasing blurs the one row and column at the edge)
    assert (out[:, :9, :9] == 255).all() and (out[:, 11:, :] == 0).all() and (out[:, :, 11:] == 0).all()
    assert torch.equal(to_original(resized, (40, 80), 20), boxes)
    coins = {}
    for index in range(8):
        flipped = bool(item_rng(5, 1, index).random() < 0.5)
        img, got = train_transform(image, boxes, 20, item_rng(5, 1, index))
        want = [[10, 0, 20, 10], [14, 2, 18, 18]] if flipped else [[0, 0, 10, 10], [2, 2, 6, 18]]
        assert got.tolist() == want  # a flip maps x to 20 - x and swaps the ends
        assert (img[:, :9, 11:] == 255).all() and (img[:, :, :9] == 0).all() if flipped else \
            torch.equal(img, out)
        coins[flipped] = True
    assert coins == {True: True, False: True}  # both faces came up


# --- the loader ---------------------------------------------------------------------------------------------------

def batches(loader):
    return [(images, [{k: v.tolist() for k, v in t.items()} for t in targets]) for images, targets in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))


@needs_fashion
def test_loader_batches_do_not_depend_on_workers_and_resume(canvases, one_thread):
    split = open_coco(canvases[0], "train")
    loader = DetectionLoader(split, 48, 4, train=True, seed=1, workers=0)
    loader.set_epoch(2)
    plain = batches(loader)
    assert len(plain) == len(loader) == 5 and plain[0][0].shape == (4, 3, 48, 48)
    assert plain[0][0].dtype == torch.float32 and 0.0 <= plain[0][0].min() and plain[0][0].max() <= 1.0
    assert set(plain[0][1][0]) == {"boxes", "labels"}
    workers = DetectionLoader(split, 48, 4, train=True, seed=1, workers=2)
    workers.set_epoch(2)
    assert same(batches(workers), plain)
    workers.skip(3)
    assert same(batches(workers), plain[3:])
    assert same(batches(workers), plain)  # skip holds for one iteration only
    workers.close()
    loader.set_epoch(3)
    assert not same(batches(loader), plain)


@needs_fashion
def test_loader_ranks_are_disjoint_and_flips_follow_the_coin(canvases, one_thread):
    split = open_coco(canvases[0], "train")
    ranks = [DetectionLoader(split, 48, 2, train=True, seed=1, rank=r, world_size=2, workers=0) for r in (0, 1)]
    seen = [set(r.indices().tolist()) for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 10 and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(split.train_indices.tolist())
    rank = ranks[1]
    rank.set_epoch(4)
    targets = [t for _, batch in batches(rank) for t in batch]
    flips = []
    for index, target in zip(rank.indices().tolist(), targets):  # each box flips with its own image's coin
        expect = eval_transform(torch.zeros((3, 64, 64), dtype=torch.uint8), split.target(index)["boxes"], 48)[1]
        flips.append(bool(item_rng(1, 4, index).random() < 0.5))
        if flips[-1]:
            expect = torch.stack([48 - expect[:, 2], expect[:, 1], 48 - expect[:, 0], expect[:, 3]], dim=1)
        assert target["boxes"] == expect.tolist()
        assert target["labels"] == split.target(index)["labels"].tolist()
    assert len(targets) == 10 and set(flips) == {True, False}


@needs_fashion
def test_eval_batches_keep_ids_and_sizes(canvases, one_thread):
    split = open_coco(canvases[0], "val")
    loaders = [DetectionLoader(split, 32, 4, rank=r, world_size=2, workers=0) for r in (0, 1)]
    got = [t for loader in loaders for _, targets in batches(loader) for t in targets]
    assert sorted(t["image_id"] for t in got) == list(range(1, 7))  # every image once, no padding
    assert all(t["orig_size"] == [64, 64] for t in got)
    first = got[0]
    assert torch.equal(to_original(torch.tensor(first["boxes"]), first["orig_size"], 32),
                       split.target(0)["boxes"])


def test_make_detection_data_command(tmp_path):
    """`fmkt-cli make-detection-data OUT`: the canvases in COCO format, the counts printed; an existing OUT is one
    sentence (exit 2) unless --force."""
    from typer.testing import CliRunner

    from fmkt.cli.app import app

    runner, out = CliRunner(), tmp_path / "canvases"
    args = ["make-detection-data", str(out), "--train", "6", "--val", "2", "--canvas", "64", "--seed", "1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "train: 6 images" in first.output and "val: 2 images" in first.output
    gt = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert len(gt["images"]) == 6 and len(list((out / "train").iterdir())) == 6
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, args + ["--force"]).exit_code == 0
