"""Issue 23's benchmark scripts: benchmarks/detection_speed.py times the run's own detection step (and says why a
capture is unavailable instead of making a number up); benchmarks/detection_accuracy.py's table is the runs'
mean +- std per row with the teacher and the latency it measured."""
import csv
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytest.importorskip("torchvision")

from benchmarks import detection_accuracy, detection_speed  # noqa: E402


def test_detection_speed_times_the_eager_step_and_names_why_no_capture_on_cpu(tmp_path):
    assert detection_speed.main(["--device", "cpu", "--methods", "none", "--batch", "1", "--size", "64",
                                 "--warmup", "0", "--iters", "1", "--out", str(tmp_path)]) == 0
    (json_file,) = tmp_path.glob("detection_speed_cpu-*.json")
    doc = json.loads(json_file.read_text())
    eager, captured = doc["rows"]
    assert (eager["method"], eager["path"], eager["status"]) == ("none", "eager", "ok")
    assert eager["images_per_s"] > 0 and eager["images_per_s"] == pytest.approx(1e3 / eager["ms_per_step"], abs=0.01)
    assert captured["status"] == "unavailable" and captured["images_per_s"] is None and "CUDA" in captured["reason"]
    assert doc["settings"]["batch"] == 1 and "machine" in doc["environment"]
    rows = list(csv.DictReader(open(json_file.with_suffix(".csv"))))
    assert list(rows[0]) == detection_speed.FIELDS and [r["path"] for r in rows] == ["eager", "captured"]


def _run(row, seed, ap, speed, teacher_ap=None):
    keys = dict(zip(detection_accuracy.KEYS, [ap, ap + 10, ap - 5, None, ap, ap + 1]))
    return {"row": row, "seed": seed, "map": keys, "images_per_s": [speed, speed + 2],
            "teacher_map": None if teacher_ap is None else {"AP": teacher_ap, "AP50": 50.0}}


def test_detection_accuracy_table_is_mean_and_std_of_the_runs_per_row():
    doc = {"runs": {"none-s0": _run("none", 0, 10.0, 4.0), "none-s1": _run("none", 1, 14.0, 6.0),
                    "fmkt-s0": _run("fmkt", 0, 20.0, 2.0, teacher_ap=30.0)},
           "latency": {"rows": [{"backend": "eager", "variant": "student", "p50_ms": 120.4},
                                {"backend": "onnxruntime", "variant": "4", "p50_ms": 99.6}]}}
    lines = detection_accuracy.table(doc).splitlines()
    none = next(line for line in lines if line.startswith("| none |"))
    cells = [c.strip() for c in none.strip("|").split("|")]
    assert cells[:4] == ["none", "2", "12.00 ± 2.83", "22.00 ± 2.83"] and cells[5] == "n/a"  # APs: no value
    assert cells[-2] == "6.00 ± 1.41" and cells[-1] == "120 / n/a"  # img/s: each run's mean; eager / ORT p50
    fmkt = next(line for line in lines if line.startswith("| fmkt |"))
    assert "20.00 ± 0.00" in fmkt and fmkt.endswith("| n/a / 100 |")
    teacher = next(line for line in lines if line.startswith("| teacher |"))
    assert "30.00 ± 0.00" in teacher and not any(line.startswith("| pkd |") for line in lines)
    seed1 = next(line for line in detection_accuracy.table(doc, [1]).splitlines() if line.startswith("| none |"))
    assert seed1.startswith("| none | 1 | 14.00 ± 0.00")  # only the runs of the seeds asked for
