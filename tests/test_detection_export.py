"""Issue 23, item 5: the detection artifact (round trip, tampering, a wrong spec), its ONNX export with the K flow
steps unrolled and parity on boxes / scores / labels, TensorRT readiness, and bench rows (student, K=0).

A small ResNet-18-FPN Faster R-CNN (64-pixel images, 3 object classes) with random weights; the score threshold is
0, so every image has detections to compare."""
import json

import pytest
import torch

from fmkt.detection.artifact import (build_detector, detector_spec, is_detector_artifact, load_detector_artifact,
                                     save_detector_artifact)
from fmkt.errors import FmktError

NAME, CLASSES, SIZE, STEPS = "fasterrcnn_resnet18_fpn", 4, 64, 2
OPTIONS = dict(box_score_thresh=0.0, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30, box_detections_per_img=10)
LEVELS = ["0", "1", "2", "3", "pool"]


def student(flow: bool = True):
    from fmkt.detection.fpn_flow import FPNFlow, attach_flow, default_level_weights
    from fmkt.detection.models import create_detector, fpn_channels

    torch.manual_seed(0)
    det = create_detector(NAME, CLASSES, min_size=SIZE, max_size=SIZE, **OPTIONS)
    if not flow:
        return det.eval(), detector_spec(NAME, CLASSES, min_size=SIZE, max_size=SIZE, options=OPTIONS)
    fpn = FPNFlow(LEVELS, fpn_channels(det), default_level_weights(det, LEVELS), encoder="conv")
    spec = detector_spec(NAME, CLASSES, min_size=SIZE, max_size=SIZE, flow=fpn, default_steps=STEPS, options=OPTIONS)
    return attach_flow(det, fpn, STEPS).eval(), spec


def images(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, SIZE, SIZE), generator=g)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model, spec = student()
    path = tmp_path_factory.mktemp("det") / "artifact"
    save_detector_artifact(path, model, spec, {"method": "fmkt", "dataset": {"name": None}, "metrics": {}})
    return path, model


def test_round_trip_gives_the_same_detections(artifact):
    path, model = artifact
    loaded, meta = load_detector_artifact(path)
    assert is_detector_artifact(path) and meta["model"]["task"] == "detection"
    assert meta["model"]["flow"]["levels"] == LEVELS and meta["model"]["default_steps"] == STEPS
    assert loaded.backbone.steps == STEPS and not loaded.training
    with torch.no_grad():
        want, got = model(list(images())), loaded(list(images()))
    assert all(len(w["boxes"]) > 0 for w in want)
    for w, g in zip(want, got):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(w[key], g[key]), key


def test_a_tampered_weight_file_is_one_sentence(artifact, tmp_path):
    import shutil

    path, _ = artifact
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(FmktError, match="does not match the sha256"):
        load_detector_artifact(copy)


def test_a_wrong_spec_is_one_sentence(artifact, tmp_path):
    model, spec = student(flow=False)
    with pytest.raises(FmktError, match="does not fit its spec"):
        save_detector_artifact(tmp_path / "a", model, {**spec, "num_classes": 7}, {})
    with pytest.raises(FmktError, match="lacks default_steps"):
        save_detector_artifact(tmp_path / "a", model, {k: v for k, v in spec.items() if k != "default_steps"}, {})
    flowed, fspec = student()
    with pytest.raises(FmktError, match="flow steps but the spec says"):
        save_detector_artifact(tmp_path / "a", flowed, {**fspec, "default_steps": 3}, {})
    path, _ = artifact  # a hand-edited fmkt.json that no longer fits the weights
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(path, bad)
    meta = json.loads((bad / "fmkt.json").read_text())
    meta["model"]["flow"]["weights"] = [6.0, 0.0, 6.0, 6.0, 0.0]
    (bad / "fmkt.json").write_text(json.dumps(meta))
    with pytest.raises(FmktError, match="does not fit the detector in fmkt.json"):
        load_detector_artifact(bad)
    from fmkt.artifact import load_artifact

    with pytest.raises(FmktError, match="detection artifact"):
        load_artifact(path)
    assert not (tmp_path / "a").exists()


def test_the_plain_detector_round_trips(tmp_path):
    model, spec = student(flow=False)
    save_detector_artifact(tmp_path / "plain", model, spec, {"method": "none"})
    loaded, meta = load_detector_artifact(tmp_path / "plain")
    assert meta["model"]["flow"] is None and meta["model"]["default_steps"] == 0
    assert type(loaded.backbone) is type(build_detector(spec).backbone)
    with torch.no_grad():
        assert torch.equal(model(list(images(1)))[0]["boxes"], loaded(list(images(1)))[0]["boxes"])


# --- export: ONNX with the K steps unrolled, parity, readiness --------------------------------------------------

@pytest.fixture(scope="module")
def exported(artifact, tmp_path_factory):
    from fmkt.export import run_export

    path, _ = artifact
    result = run_export(path, None, "onnx", out=tmp_path_factory.mktemp("exp") / "onnx")
    return result


def test_onnx_export_passes_parity_with_the_artifacts_k(exported):
    import onnx

    from fmkt.export.detection_parity import GATES

    assert exported.passed, exported.reports[0].breach()
    meta = json.loads((exported.out / "export.json").read_text())
    assert meta["steps"] == STEPS and meta["task"] == "detection" and "K=2" in meta["graph"]
    assert meta["batch"]["max"] == 1 and meta["input"]["shape"] == [1, 3, SIZE, SIZE] and meta["opset"] >= 11
    assert {"format", "target", "graph", "steps", "input", "output", "batch", "opset", "source", "parity", "files",
            "graph_summary", "tensorrt_readiness"} <= set(meta)
    parity = json.loads((exported.out / "parity.json").read_text())
    report = parity["reports"][0]
    assert parity["passed"] and {"target", "precision", "data", "gate", "passed", "rows"} <= set(report)
    assert report["gate"] == GATES["fp32"] and "canvases" in report["data"]
    totals = report["totals"]
    assert totals["reference"] == totals["matched"] > 0 and totals["max_box_diff_px"] < 1e-3
    graph = onnx.load(str(exported.out / "model.onnx"), load_external_data=False)
    assert [o.name for o in graph.graph.output] == ["boxes", "scores", "labels"]
    assert json.loads({p.key: p.value for p in graph.metadata_props}["steps"]) == STEPS


def test_the_k_flow_steps_are_unrolled_into_the_graph(exported, artifact):
    """Each weighted level's meta-encoder runs K times: 4 levels x K x its convolutions, no Loop."""
    import onnx
    from torch import nn

    flow = artifact[1].backbone.flow
    per_call = sum(isinstance(m, nn.Conv2d) for m in next(iter(flow.flows.values())).encoder.modules())
    graph = onnx.load(str(exported.out / "model.onnx"), load_external_data=False)
    convs = [n for n in graph.graph.node if n.op_type == "Conv" and "/backbone/encoder/" in n.name]
    assert len(flow.flows) == 4 and per_call >= 1 and len(convs) == 4 * STEPS * per_call
    assert "Loop" not in exported.meta["graph_summary"]["ops"]


def test_readiness_lists_the_ops_and_which_tensorrt_lacks(exported):
    ready = exported.meta["tensorrt_readiness"]
    assert ready["ready"] and ready["problems"] == [] and ready["unsupported_ops"] == []
    for op in ("RoiAlign", "NonMaxSuppression", "TopK", "Conv"):  # NMS sits in an If's branch: counted
        assert ready["ops"][op]["tensorrt"] == "8.5", op
    from onnx import TensorProto, helper

    from fmkt.export.detection import readiness

    branch = lambda name, op: helper.make_graph([helper.make_node(op, ["x"], ["y"])], name, [],  # noqa: E731
                                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch("a", "Identity"), else_branch=branch("b", "Warp"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    report = readiness(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert not report["ready"] and report["unsupported_ops"] == ["Warp"] and report["control_flow"] == ["If"]


def test_a_planted_difference_fails_parity(artifact, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fmkt.cli.app import app
    from fmkt.export import detection

    real = detection.ort_detect

    def shifted(session, x):  # a box edge 0.05 px off: five times the gate
        boxes, scores, labels = real(session, x)
        return boxes + torch.tensor([0.05, 0.0, 0.0, 0.0]), scores, labels
    monkeypatch.setattr(detection, "ort_detect", shifted)
    result = CliRunner().invoke(app, ["export", str(artifact[0]), "--out", str(tmp_path / "e")])
    assert result.exit_code == 1, result.output
    assert "max box diff 0.05" in " ".join(result.output.split())
    assert json.loads((tmp_path / "e" / "parity.json").read_text())["passed"] is False


def test_parity_gates_catch_labels_scores_and_lost_detections():
    from fmkt.export.detection_parity import check_detection_parity

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]])
    ref = (boxes, torch.tensor([0.9, 0.8]), torch.tensor([1, 2]))
    x = torch.zeros(2, 3, 4, 4)
    cases = {"same": (ref, True), "labels": ((boxes, ref[1], torch.tensor([2, 1])), False),
             "score": ((boxes, ref[1] + 1e-3, ref[2]), False), "lost": ((boxes[:1], ref[1][:1], ref[2][:1]), False),
             "noise": ((boxes + 1e-4, ref[1] + 1e-6, ref[2]), True)}
    for name, (out, ok) in cases.items():
        report = check_detection_parity(lambda _: ref, lambda _: out, x, "fp32", "fake", "two images")
        assert report.passed is ok, (name, report.breach())
        assert bool(report.breach()) is not ok


def test_detection_export_refusals(artifact, tmp_path):
    from fmkt.export import run_export

    path, _ = artifact
    for kwargs, match in [({"fmt": "trt"}, "does not take detection"), ({"precision": "fp16"}, "fp32 only"),
                          ({"batch": "1:4:8"}, "fixed at 1"), ({"steps": -1}, "integer >= 0")]:
        with pytest.raises(FmktError, match=match):
            run_export(path, kwargs.pop("steps", None), out=tmp_path / "x", **kwargs)
    model, spec = student(flow=False)
    save_detector_artifact(tmp_path / "plain", model, spec, {"method": "none"})
    with pytest.raises(FmktError, match="no FPN flow"):
        run_export(tmp_path / "plain", 2, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    from fmkt.bench.detection import load_teacher
    from fmkt.bench.plan import Source

    with pytest.raises(FmktError, match="detection artifact"):
        load_teacher(Source(tmp_path, None, {"model": {}}), tmp_path / "plain")  # a classification source
    with pytest.raises(FmktError, match="must be JSON"):
        save_detector_artifact(tmp_path / "y", model, {**spec, "options": {"box_head": object()}}, {})


def test_parity_images_come_from_the_recorded_dataset(tmp_path):
    from fmkt.detection.canvas import make_detection_data
    from fmkt.export.detection_parity import parity_images

    make_detection_data(tmp_path / "coco", train=1, val=3, canvas=96)
    images, data = parity_images({"dataset": {"root": str(tmp_path / "coco")}}, SIZE)
    assert images.shape == (3, 3, SIZE, SIZE) and "val split, first 3 images" in data
    assert 0.0 <= images.min() and images.max() <= 1.0
    images, data = parity_images({"dataset": {"root": str(tmp_path / "none")}}, SIZE, count=2)
    assert images.shape == (2, 3, SIZE, SIZE) and "canvases" in data


# --- bench -------------------------------------------------------------------------------------------------------

def test_bench_times_the_student_at_k_and_k0_next_to_the_teacher(exported, tmp_path):
    from fmkt.bench import BenchSettings, run_bench
    from fmkt.bench.report import CSV_FIELDS

    model, spec = student(flow=False)  # a stand-in teacher: the plain detector as an artifact
    save_detector_artifact(tmp_path / "teacher", model, spec, {"method": "none"})
    settings = BenchSettings(backends=["eager", "onnxruntime"], batches=[1, 2], warmup=1, iters=2, device="cpu",
                             out=tmp_path / "b.json", teacher=tmp_path / "teacher")
    result = run_bench(exported.out, settings, progress=False)
    ok = {(r.backend, r.variant, r.batch) for r in result.rows if r.status == "ok"}
    for backend in ("eager", "onnxruntime"):
        assert {(backend, v, 1) for v in ("student", str(STEPS), "teacher")} <= ok
    assert ("eager", "student", 2) in ok
    two = [r for r in result.rows if r.backend == "onnxruntime" and r.batch == 2]
    assert two and all(r.status == "unavailable" and "batch 1" in r.reason for r in two)
    k = next(r for r in result.rows if r.backend == "eager" and r.variant == str(STEPS) and r.batch == 1)
    assert k.x_student is not None and k.top1 is None
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["model"]["task"] == "detection" and doc["settings"]["variants"] == ["student", str(STEPS), "teacher"]
    assert (tmp_path / "b.csv").read_text().splitlines()[0].split(",") == CSV_FIELDS
