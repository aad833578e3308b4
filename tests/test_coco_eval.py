"""COCO mAP (pycocotools) on hand-made cases whose numbers are known: perfect, missed, half found (with the
score order mattering), a loose box that only the lower IoU thresholds accept, and the detections' plumbing."""
import json

import pytest
import torch

from fmkt.detection import coco_map, to_coco_results
from fmkt.errors import FmktError

# COCO's 101 recall points 0, 0.01, ..., 1: a detector that finds 1 of 2 boxes reaches recall 0.5, so precision p
# holds on the 51 points 0 ... 0.5 and 0 on the other 50: AP = p * 51 / 101.
HALF = 51 / 101 * 100


def gt_dict(boxes, image_ids=None, categories=(1, 2)):
    """One image per box unless ``image_ids`` says otherwise; boxes are (x, y, w, h, category)."""
    image_ids = image_ids or list(range(1, len(boxes) + 1))
    images = [{"id": i, "file_name": f"{i}.png", "width": 400, "height": 400} for i in sorted(set(image_ids))]
    anns = [{"id": n, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": float(w * h), "iscrowd": 0}
            for n, ((x, y, w, h, c), i) in enumerate(zip(boxes, image_ids), start=1)]
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in categories]}


def det(image_id, bbox, score, category=1):
    return {"image_id": image_id, "category_id": category, "bbox": list(bbox), "score": score}


# a small (20x20 = 400 < 32^2), a medium (50x50) and a large (120x120 > 96^2) box, two categories
BOXES = [(10, 10, 20, 20, 1), (100, 100, 50, 50, 2), (200, 200, 120, 120, 1)]


def test_perfect_detections_are_100_and_quiet(capsys):
    gt = gt_dict(BOXES)
    dets = [det(i, b[:4], 0.9, b[4]) for i, b in enumerate(BOXES, start=1)]
    assert coco_map(gt, dets) == {k: 100.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert capsys.readouterr().out == ""  # pycocotools' printing silenced
    assert "area" not in dets[0]  # the caller's dicts are not changed


def test_boxes_moved_off_their_objects_score_0():
    gt = gt_dict(BOXES)
    dets = [det(i, (b[0] + b[2], b[1], b[2], b[3]), 0.9, b[4]) for i, b in enumerate(BOXES, start=1)]  # IoU 0
    assert coco_map(gt, dets) == {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def test_no_detections_give_zeros_and_undefined_ranges_none():
    gt = gt_dict(BOXES[:2])  # no large box: COCO leaves APl undefined (-1)
    assert coco_map(gt, []) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": None}
    dets = [det(1, BOXES[0][:4], 0.5)]
    assert coco_map(gt, dets)["APl"] is None


def test_one_of_two_found_and_the_score_order_counts():
    gt = gt_dict([(10, 10, 40, 40, 1), (200, 200, 40, 40, 1)], image_ids=[1, 1])
    found = det(1, (10, 10, 40, 40), 0.8)
    assert coco_map(gt, [found])["AP50"] == pytest.approx(HALF)  # 50.495...: precision 1 up to recall 0.5
    assert coco_map(gt, [found])["AP"] == pytest.approx(HALF)  # exact: the same at every IoU threshold
    false = det(1, (300, 10, 40, 40), 0.9)  # a false positive ranked above the true one: precision 1/2
    assert coco_map(gt, [found, false])["AP50"] == pytest.approx(HALF / 2)
    false["score"] = 0.7  # ranked below it: the precision at recall 0.5 is 1 again
    assert coco_map(gt, [found, false])["AP50"] == pytest.approx(HALF)


def test_a_loose_box_passes_only_the_lower_iou_thresholds():
    gt = gt_dict([(0, 0, 100, 100, 1)])
    result = coco_map(gt, [det(1, (0, 0, 100, 62), 0.9)])  # IoU 0.62: thresholds 0.50, 0.55, 0.60 of ten
    assert result["AP50"] == 100.0 and result["AP75"] == 0.0 and result["AP"] == pytest.approx(30.0)


def test_ground_truth_from_a_file_and_strangers_refused(tmp_path):
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(gt_dict(BOXES)))
    assert coco_map(str(path), [det(1, BOXES[0][:4], 0.9)])["APs"] == 100.0
    with pytest.raises(FmktError, match=r"1 image id\(s\) .* \(first: 99\)"):
        coco_map(path, [det(99, BOXES[0][:4], 0.9)])
    with pytest.raises(FmktError, match="not found"):
        coco_map(tmp_path / "missing.json", [])


def test_outputs_map_back_to_the_original_pixels_and_category_ids():
    outputs = [{"boxes": torch.tensor([[16.0, 16.0, 32.0, 32.0]]), "scores": torch.tensor([0.75]),
                "labels": torch.tensor([2])}]
    targets = [{"image_id": torch.tensor(7), "orig_size": torch.tensor([128, 256])}]  # height 128, width 256
    assert to_coco_results(outputs, targets, (3, 9), 64) == [
        {"image_id": 7, "category_id": 9, "bbox": [64.0, 32.0, 64.0, 32.0], "score": 0.75}]
