"""benchmarks/: the shared helper (benchmarks/_common.py: the machine in a file name, JSON/CSV, the synthetic
artifact and data, the one row lookup), the results already in the repository named by it, and the timing scripts
on a tiny CPU setting: train_speed.py times ``engine.prepare(cfg).step`` (the engine's own choice of step) and
keeps its file names and columns; profile_step.py runs."""
import csv
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _common  # noqa: E402
from benchmarks._common import find_row, machine_slug  # noqa: E402

H100 = {"gpu": "NVIDIA H100 80GB HBM3", "cpu": "Intel(R) Xeon(R) Processor @ 2.50GHz"}
XEON = {"gpu": None, "cpu": "Intel(R) Xeon(R) Processor @ 2.50GHz"}


@pytest.fixture(autouse=True)
def _registry_restored():
    """The synthetic datasets a benchmark registers leave with the test (the registry is documentation elsewhere)."""
    from fmkt.data import DATASET_SOURCES

    before = dict(DATASET_SOURCES)
    yield
    DATASET_SOURCES.clear()
    DATASET_SOURCES.update(before)


def test_machine_slug_names_the_gpu_or_cpu_and_with_the_device_the_cpu_model():
    assert machine_slug("cuda", H100) == "nvidia-h100-80gb-hbm3"
    assert machine_slug(torch.device("cpu"), H100) == "cpu" == machine_slug("cpu", XEON)
    assert machine_slug("cuda", H100, with_device=True) == "cuda-nvidia-h100-80gb-hbm3"
    assert machine_slug("cpu", XEON, with_device=True) == "cpu-intel-r-xeon-r-processor-2-50ghz"
    assert _common.slug("kernels_NVIDIA H100_torch2.5.1_triton3.1.0") == "kernels-nvidia-h100-torch2-5-1-triton3-1-0"


def _stored_machine(doc: dict) -> dict | None:
    machine = (doc.get("environment") or {}).get("machine") or doc.get("machine")
    if machine is None and isinstance(doc.get("device"), str):  # triton_vs_torch files before the machine key
        machine = {"gpu": None if doc["device"] == "cpu" else doc["device"], "cpu": doc["device"]}
    return machine


@pytest.mark.parametrize("prefix,with_device", [("train_speed_", False), ("profile_step_", False),
                                                ("triton_vs_torch_", False), ("latency_", True),
                                                ("pareto_", True)])
def test_results_in_the_repository_are_named_as_the_helper_names_them(prefix, with_device):
    """Every stored result of a script that names its file by machine starts with what machine_slug gives for the
    machine the file records: the helper names results as the scripts always did."""
    checked = []
    for path in sorted((ROOT / "benchmarks" / "results").rglob(f"{prefix}*.json")):
        machine = _stored_machine(json.loads(path.read_text()))
        if machine is None:
            continue
        device = "cuda" if machine.get("gpu") else "cpu"
        assert path.name.startswith(prefix + machine_slug(device, machine, with_device=with_device)), path
        checked.append(path.name)
    if prefix in ("train_speed_", "latency_", "pareto_"):
        assert checked, f"no stored {prefix}*.json with its machine"


def test_find_row_matches_by_keyword_in_dicts_and_bench_rows():
    from fmkt.bench import Row

    dicts = [{"backend": "eager", "precision": "fp32", "variant": "4", "batch": 1, "p50_ms": 2.0},
             {"backend": "eager", "precision": "fp32", "variant": "4", "batch": 64, "p50_ms": 9.0}]
    assert find_row(dicts, batch=64, variant="4", backend="eager", precision="fp32")["p50_ms"] == 9.0
    assert find_row(dicts, backend="eager", batch=64, variant="0") is None
    rows = [Row("eager", "fp32", 1, "4", "ok", p50_ms=3.0), Row("onnxruntime", "fp32", 1, "4", "ok", p50_ms=1.5)]
    assert find_row(rows, variant="4", batch=1, precision="fp32", backend="onnxruntime").p50_ms == 1.5
    assert find_row([{"path": "fast", "captured": False}], path="fast", captured=True) is None


def test_json_and_csv_are_written_whole_with_the_columns_given(tmp_path):
    j = _common.write_json(tmp_path / "sub" / "r.json", {"b": 1, "a": [1, 2]}, indent=1)
    assert j.read_text() == json.dumps({"b": 1, "a": [1, 2]}, indent=1) + "\n"
    c = _common.write_csv(tmp_path / "r.csv", [{"x": 1, "y": None}, {"x": 2}], ["x", "y", "z"])
    assert list(csv.reader(c.open())) == [["x", "y", "z"], ["1", "", ""], ["2", "", ""]]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["r.csv", "r.json", "sub"]  # no temporary left


def test_synthetic_artifact_is_a_random_theta_student_rebuilt_unless_reused(tmp_path):
    from fmkt.artifact import load_artifact

    path = _common.synthetic_artifact(tmp_path / "a", "resnet8", "mlp")
    model, meta = load_artifact(path)
    assert meta["method"] == "theta" and meta["model"]["arch"] == "resnet8" and meta["model"]["encoder"] == "mlp"
    assert meta["dataset"] == {"name": "fashion-mnist-shaped (random weights, latency only)", "num_classes": 10}
    again = _common.synthetic_artifact(tmp_path / "b", "resnet8", "mlp")
    assert (again / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()  # seed 0
    stamp = (path / "fmkt.json").stat().st_mtime_ns
    _common.synthetic_artifact(path, "resnet8", "mlp", reuse=True)
    assert (path / "fmkt.json").stat().st_mtime_ns == stamp


def test_synthetic_dataset_is_registered_data_with_the_facts_given():
    from dataclasses import replace

    from fmkt.data import dataset_info, load_dataset

    info = replace(dataset_info("fashion-mnist"), num_classes=7)
    name = _common.synthetic_dataset(info, 12, 3)
    train, test, got = load_dataset(name)
    assert got == replace(info, name=name, class_names=None)
    assert tuple(train.images.shape) == (12, 1, 28, 28) and len(test.labels) == 3
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) <= 1.0 and int(train.labels.max()) < 7
    assert _common.synthetic_dataset(info, 12, 3) == name and torch.equal(load_dataset(name)[0].images, train.images)


def test_train_speed_times_the_step_engine_prepare_built(tmp_path, monkeypatch):
    """Each row's timed calls are calls of ``engine.prepare(cfg).step`` (the run's own loader, optimiser and step);
    the files keep their names and columns."""
    from benchmarks import train_speed
    from fmkt import engine

    assert train_speed.prepare is engine.prepare
    runs = []

    def spy(*args, **kwargs):
        run = engine.prepare(*args, **kwargs)
        step, run.calls = run.step, []

        def counted(*a):
            run.calls.append(len(a))
            return step(*a)

        run.step = counted
        runs.append(run)
        return run

    monkeypatch.setattr(train_speed, "prepare", spy)
    monkeypatch.setattr(train_speed, "METHOD_ROWS", ["none", "fmkt"])
    assert train_speed.main(["--device", "cpu", "--small", "--batch", "8", "--warmup", "1", "--iters", "2",
                             "--out", str(tmp_path)]) == 0
    assert [r.cfg.method.name for r in runs] == ["none", "fmkt"] * 2  # the FLOP counts, then the timed rows
    assert [len(r.calls) for r in runs] == [1, 1, 3, 3]  # the timed rows: 1 warm-up + 2 timed steps
    assert all(r.cfg.train.fast_path == "off" and r.cfg.data.batch_size == 8 for r in runs)
    doc = json.loads((tmp_path / "train_speed_cpu.json").read_text())
    assert sorted(doc) == ["date", "environment", "iters", "ratios", "rows", "seconds", "setting", "warmup"]
    assert [(r["method"], r["path"], r["kernel"], r["batch"], r["captured"]) for r in doc["rows"]] == [
        ("none", "eager", "torch", 8, False), ("fmkt", "eager", "torch", 8, False)]
    assert all(r["ms_per_step"] > 0 and r["images_per_s"] > 0 and "tflops" in r for r in doc["rows"])
    with open(tmp_path / "train_speed_cpu.csv") as f:
        assert next(csv.reader(f)) == ["method", "path", "kernel", "batch", "ms_per_step", "images_per_s", "tflops",
                                       "peak_bf16_tflops", "captured", "note"]


def test_profile_step_splits_an_fm_kt_step_of_the_prepared_run():
    from benchmarks.profile_step import profile

    res = profile(torch.device("cpu"), 4, 2, small=True)
    assert {"teacher forward", "meta-encoder forward (N steps)", "backward (all pieces)",
            "optimiser step"} <= set(res["parts_ms"])
    assert res["step_ms_instrumented"] > 0 and abs(sum(res["parts_percent"].values()) - 100) < 1
