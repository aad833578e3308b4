"""One split of a COCO-format detection dataset (``annotations/instances_SPLIT.json`` + an image folder), read
into arrays: file names, image sizes, per-image training boxes (xyxy, float32) and contiguous labels 1..C; never
the pixels (the loader's workers decode those).

Bad annotations are handled as users expect and counted and named (:class:`AnnotationReport`, its first
:data:`EXAMPLES` examples per kind), never a crash:

* an annotation whose image id or category id is not in the file, whose bbox is not 4 finite numbers, or whose
  width or height is zero or negative is dropped;
* a box reaching outside its image is clipped to it, and dropped if nothing is left;
* a crowd region (``iscrowd=1``) is not a training box but stays in the evaluation ground truth
  (:attr:`CocoSplit.gt`), where COCO's evaluator treats it as an ignore region;
* an image without a training box stays in the split for evaluation but is left out of training
  (:attr:`CocoSplit.train_indices`), as torchvision's references do (``_coco_remove_images_without_annotations``).

A missing or malformed JSON file, or images listed but missing from the folder, is one :class:`FmktError`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from fmkt.errors import FmktError

EXAMPLES = 3  # bad annotations (and images) named per kind
#: kind -> what it says of an annotation (or, for "no_boxes", of an image), and whether it is dropped
KINDS = {
    "unknown_image": ("refer to an image id not in 'images' (dropped)", True),
    "unknown_category": ("have a category id not in 'categories' (dropped)", True),
    "malformed": ("have no bbox of 4 finite numbers (dropped)", True),
    "empty": ("have a zero or negative width or height (dropped)", True),
    "outside": ("lie outside their image (dropped)", True),
    "clipped": ("reach outside their image (clipped to it)", False),
    "crowd": ("are crowd regions (iscrowd=1: not trained on, kept for evaluation)", False),
    "no_boxes": ("have no box to train on (kept for evaluation, left out of training)", False),
}


class AnnotationReport:
    """What :func:`open_coco` did to bad annotations: ``counts[kind]`` and ``examples[kind]`` (the first few,
    named by annotation id and image file) for each kind of :data:`KINDS` met."""

    def __init__(self, source: str) -> None:
        self.source, self.counts, self.examples = source, {}, {}

    def note(self, kind: str, example: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        first = self.examples.setdefault(kind, [])
        if len(first) < EXAMPLES:
            first.append(example)

    def dropped(self) -> int:
        """Annotations left out of both training and evaluation."""
        return sum(n for kind, n in self.counts.items() if KINDS[kind][1])

    def lines(self) -> list[str]:
        """One sentence per kind met, for the log: ``"note: F: 3 annotation(s) have ... (e.g. ...)."``."""
        out = []
        for kind, (what, _drop) in KINDS.items():
            if kind in self.counts:
                noun = "image(s)" if kind == "no_boxes" else "annotation(s)"
                out.append(f"note: {self.source}: {self.counts[kind]} {noun} {what} (e.g. "
                           f"{', '.join(self.examples[kind])}).")
        return out

    def as_dict(self) -> dict:
        """``{"counts": {...}, "examples": {...}}`` for fmkt.json and the CLI."""
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}


class CocoSplit:
    """One split: ``files`` (names under ``folder``), ``image_ids``, ``sizes`` ((N, 2) int64: height, width),
    the training boxes of all images in one ``boxes`` array ((A, 4) float32 xyxy) with ``labels`` ((A,) int64,
    1..C) and ``offsets`` ((N + 1,): image i's boxes are ``boxes[offsets[i]:offsets[i + 1]]``), the categories
    (``cat_ids[label - 1]`` is a label's COCO id, ``names[label - 1]`` its name), ``train_indices`` (the images
    with a training box), ``report`` and ``gt`` (the cleaned COCO dict the evaluator reads)."""

    def __init__(self, folder: str, annotation_file: str, table: dict, cats: tuple, boxes: tuple, gt: dict,
                 report: AnnotationReport) -> None:
        self.folder, self.annotation_file = folder, annotation_file
        self.files, self.image_ids, self.sizes = table["files"], table["ids"], table["sizes"]
        self.cat_ids, self.names = cats
        self.boxes, self.labels, self.offsets = boxes
        self.gt, self.report = gt, report
        self.train_indices = np.flatnonzero(np.diff(self.offsets) > 0)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        """C, the number of categories (labels are 1..C; torchvision detectors take C + 1 with background 0)."""
        return len(self.cat_ids)

    def path(self, index: int) -> str:
        return os.path.join(self.folder, self.files[index])

    def target(self, index: int) -> dict:
        """Image ``index``'s training target: ``{"boxes": (n, 4) float32 xyxy, "labels": (n,) int64}`` tensors."""
        import torch

        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        return {"boxes": torch.from_numpy(self.boxes[lo:hi].copy()),
                "labels": torch.from_numpy(self.labels[lo:hi].copy())}


def open_coco(root, split: str, annotations=None, images=None, check_files: bool = True) -> CocoSplit:
    """Split ``split`` of the COCO-format dataset at ``root``: ``annotations`` (default
    ``root/annotations/instances_{split}.json``) over the image folder ``images`` (default ``root/split``), so
    COCO 2017 itself opens as ``open_coco(root, "val2017")``. Bad annotations are handled as the module docstring
    says; ``check_files``: every listed image must exist (else one :class:`FmktError` naming the first few)."""
    path = Path(annotations) if annotations is not None else Path(root) / "annotations" / f"instances_{split}.json"
    folder = str(images) if images is not None else os.path.join(str(root), split)
    data = read_json(path)
    table = _image_table(data["images"], path)
    cats = _categories(data["categories"], path)
    report = AnnotationReport(str(path))
    per_image, kept = _clean_annotations(data.get("annotations") or [], table, cats[0], report)
    for i in np.flatnonzero([not boxes for boxes in per_image]):
        report.note("no_boxes", table["files"][i])
    if check_files:
        check_images(table["files"], folder, path)
    gt = {"info": data.get("info", {}), "images": data["images"], "annotations": kept,
          "categories": data["categories"]}
    return CocoSplit(folder, str(path), table, cats, _flatten(per_image), gt, report)


def read_json(path: Path) -> dict:
    """The COCO dict in ``path``; one :class:`FmktError` for a missing, unreadable or malformed file."""
    hint = "expected a COCO instances file (images, annotations, categories)"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FmktError(f"COCO annotation file {path} not found: {hint} there; write one with "
                        "make_detection_data (fmkt-cli make-detection-data) or check the dataset root.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FmktError(f"cannot read {path} ({exc}): {hint}.") from None
    except json.JSONDecodeError as exc:
        raise FmktError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): {hint}.") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise FmktError(f"{path} has no 'images' and 'categories' lists: {hint}.")
    if not isinstance(data.get("annotations", []), list):
        raise FmktError(f"{path} has an 'annotations' entry that is not a list: {hint}.")
    return data


def _image_table(images: list, path: Path) -> dict:
    """``{"files", "ids" (N,), "sizes" (N, 2) (height, width), "index" (image id -> row)}``; an image entry
    without an id, file name and positive width and height is one :class:`FmktError`."""
    files, ids, sizes = [], [], []
    for n, img in enumerate(images):
        try:
            entry = (str(img["file_name"]), int(img["id"]), int(img["height"]), int(img["width"]))
        except (KeyError, TypeError, ValueError):
            entry = None
        if entry is None or entry[2] <= 0 or entry[3] <= 0:
            raise FmktError(f"image entry {n} of {path} ({str(img)[:80]}) lacks an id, a file_name or a positive "
                            "width and height: expected COCO image entries.")
        files.append(entry[0])
        ids.append(entry[1])
        sizes.append(entry[2:])
    index = {image_id: row for row, image_id in enumerate(ids)}
    if len(index) != len(ids):
        raise FmktError(f"{path} lists {len(ids) - len(index)} image id(s) twice: expected one entry per image.")
    return {"files": files, "ids": np.asarray(ids, dtype=np.int64),
            "sizes": np.asarray(sizes, dtype=np.int64).reshape(-1, 2), "index": index}


def _categories(categories: list, path: Path) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(COCO ids sorted, their names): label l (1..C) is category ``ids[l - 1]``."""
    try:
        pairs = sorted((int(c["id"]), str(c.get("name", c["id"]))) for c in categories)
    except (KeyError, TypeError, ValueError):
        raise FmktError(f"{path} has a category without an integer id: expected COCO category entries.") from None
    ids = tuple(p[0] for p in pairs)
    if not ids or len(set(ids)) != len(ids):
        raise FmktError(f"{path} has {'no categories' if not ids else 'a category id twice'}: expected one entry "
                        "per category.")
    return ids, tuple(p[1] for p in pairs)


def _clean_annotations(annotations: list, table: dict, cat_ids: tuple, report: AnnotationReport):
    """Per image, its training ``[(x0, y0, x1, y1, label)]``; and the evaluation annotations (clipped, crowd kept,
    the dropped left out). Each bad annotation is noted in ``report``."""
    label_of = {cat: label for label, cat in enumerate(cat_ids, start=1)}
    per_image: list[list] = [[] for _ in table["files"]]
    kept = []
    for n, ann in enumerate(annotations):
        ann = ann if isinstance(ann, dict) else {"image_id": None}
        image_id = ann.get("image_id")
        row = table["index"].get(image_id) if isinstance(image_id, (int, str)) else None
        name = f"annotation {ann.get('id', n)}"
        if row is None:
            report.note("unknown_image", f"{name} (image id {image_id})")
            continue
        name = f"{name} of {table['files'][row]}"
        kind, box = _check_box(ann, label_of, table["sizes"][row])
        if kind is not None:
            report.note(kind, name)
        if box is None:
            continue
        x0, y0, x1, y1 = box
        crowd = bool(ann.get("iscrowd", 0))
        if crowd:
            report.note("crowd", name)
        else:
            per_image[row].append((x0, y0, x1, y1, label_of[ann["category_id"]]))
        area = ann.get("area") if kind is None and isinstance(ann.get("area"), (int, float)) else None
        kept.append({**ann, "id": ann.get("id", n + 1), "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": float(area if area is not None else (x1 - x0) * (y1 - y0)), "iscrowd": int(crowd)})
    return per_image, kept


def _check_box(ann: dict, label_of: dict, size) -> tuple[str | None, tuple | None]:
    """(the kind of fault or None, the xyxy box clipped to the image or None when the annotation is dropped)."""
    if ann.get("category_id") not in label_of:
        return "unknown_category", None
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return "malformed", None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return "empty", None
    height, width = (float(v) for v in size)
    box = (min(max(x, 0.0), width), min(max(y, 0.0), height), min(max(x + w, 0.0), width),
           min(max(y + h, 0.0), height))
    if box[2] <= box[0] or box[3] <= box[1]:
        return "outside", None
    return ("clipped" if box != (x, y, x + w, y + h) else None), box


def _flatten(per_image: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes (A, 4) float32, labels (A,) int64, offsets (N + 1,) int64) of the per-image training boxes."""
    counts = np.asarray([len(b) for b in per_image], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = [box for boxes in per_image for box in boxes]
    table = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    return table[:, :4].astype(np.float32), table[:, 4].astype(np.int64), offsets


def check_images(files: list, folder: str, path: Path) -> None:
    """One :class:`FmktError` when any of ``files`` is not a file under ``folder``: the count and the first few."""
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        first = ", ".join(missing[:EXAMPLES])
        raise FmktError(f"{len(missing)} of the {len(files)} images {path} lists are missing from {folder} "
                        f"(first: {first}); put them there or pass the image folder.")
