"""COCO mAP with the field's reference evaluator, pycocotools (``COCOeval``, iouType bbox, its default 101-point
interpolated precision over IoU 0.50:0.95, 100 detections per image).

:func:`coco_map` returns AP, AP50, AP75, APs, APm, APl in percent (as fmkt reports top-1), or None for a number
COCO leaves undefined (its -1: no ground-truth box in that area range); no detection at all gives 0.0 for every
defined number. pycocotools' printing is silenced. :func:`to_coco_results` turns a detector's outputs on an
evaluation batch into the detection dicts it takes, in the original image's pixels.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from fmkt.errors import FmktError

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six of COCOeval.stats, in its order
AREAS = {"AP": (0, 1e10), "AP50": (0, 1e10), "AP75": (0, 1e10), "APs": (0, 32 ** 2), "APm": (32 ** 2, 96 ** 2),
         "APl": (96 ** 2, 1e10)}  # COCOeval.params.areaRng, both ends inclusive as COCOeval reads them


def _ground_truth(gt) -> dict:
    """The COCO dict of ``gt``: a dict, a path to an instances JSON, or a split with ``.gt``."""
    if hasattr(gt, "gt"):
        return gt.gt
    if isinstance(gt, dict):
        return gt
    from fmkt.detection.coco import read_json

    return read_json(Path(gt))


def coco_map(gt, detections: list) -> dict:
    """COCO mAP of ``detections`` (COCO results: ``{"image_id", "category_id", "bbox": [x, y, w, h] in the original
    image's pixels, "score"}``) against ``gt`` (a COCO dict, its JSON path, or a :class:`CocoSplit`): ``{"AP",
    "AP50", "AP75", "APs", "APm", "APl"}`` in percent, None where COCO leaves one undefined."""
    data = _ground_truth(gt)
    if not detections:
        return {key: 0.0 if _defined(data, key) else None for key in KEYS}
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    known = {img["id"] for img in data["images"]}
    strangers = sorted({d.get("image_id") for d in detections} - known, key=str)
    if strangers:
        raise FmktError(f"{len(strangers)} image id(s) of the detections are not in the ground truth (first: "
                        f"{', '.join(map(str, strangers[:3]))}): expected detections of the evaluated split.")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {**data, "annotations": data.get("annotations", [])}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])  # loadRes adds keys: the caller's dicts stay
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # in percent, rounded past float noise (pycocotools' mean of 101 ones is 0.99999999999999...)
    return {key: None if value < 0 else round(float(value) * 100.0, 10) for key, value in zip(KEYS, evaluator.stats)}


def _defined(data: dict, key: str) -> bool:
    """Whether COCOeval would give ``key`` a value: some non-crowd ground-truth box in its area range."""
    lo, hi = AREAS[key]
    return any(not a.get("iscrowd", 0) and lo <= a.get("area", a["bbox"][2] * a["bbox"][3]) <= hi
               for a in data.get("annotations", []))


def to_coco_results(outputs: list, targets: list, cat_ids, size: int) -> list[dict]:
    """COCO detection dicts of a detector's ``outputs`` (per image ``{"boxes" (n, 4) xyxy on the size x size input,
    "scores", "labels" 1..C}``) on an evaluation batch whose ``targets`` carry ``image_id`` and ``orig_size``:
    boxes mapped back to the original pixels (:func:`fmkt.detection.transforms.to_original`) as [x, y, w, h],
    labels to their COCO category ids (``cat_ids[label - 1]``)."""
    from fmkt.detection.transforms import to_original

    results = []
    for out, target in zip(outputs, targets):
        boxes = to_original(out["boxes"].detach().cpu(), target["orig_size"].tolist(), size)
        image_id = int(target["image_id"])
        for (x0, y0, x1, y1), score, label in zip(boxes.tolist(), out["scores"].tolist(), out["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": int(cat_ids[int(label) - 1]),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return results


def write_results(path, results: list) -> None:
    """``results`` as a COCO results JSON file (what other COCO tools read), written atomically."""
    from fmkt.files import atomic_write_text

    atomic_write_text(path, json.dumps(results))
