"""fmkt.export: the unrolled static graph vs PyTorch (ONNX Runtime), static-graph properties, TensorRT readiness,
metadata, FP16, AOTInductor, the TensorRT path and the CLI's error paths. Tiny artifacts built here, no training."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fmkt.artifact import model_spec, save_artifact  # noqa: E402
from fmkt.cli.app import app  # noqa: E402
from fmkt.errors import FmktError  # noqa: E402
from fmkt.export import GATES, run_export, static_module  # noqa: E402
from fmkt.export import onnx_export as ox  # noqa: E402
from fmkt.export.parity import parity_images  # noqa: E402
from fmkt.export.pipeline import parse_batch  # noqa: E402
from fmkt.export.trt_operators import SUPPORTED_OPS  # noqa: E402
from fmkt.io import sha256_file  # noqa: E402
from fmkt.models import create_model  # noqa: E402
from fmkt.student import DeployableModel  # noqa: E402

KS = (0, 1, 2, 4, 8)
SIZE = 12  # resnet8 on 12x12 -> a 3x3 map; the transformer's window 2 then pads, so the masked path is exported
ENCODER_PARAMS = {"conv": {}, "mlp": {}, "transformer": {"window": 2, "heads": 2, "head_dim": 8}}


def tiny_model(encoder="conv", schedule="rectified", theta=True, transfer="logits", seed=0):
    torch.manual_seed(seed)
    backbone = create_model("resnet8", num_classes=4, in_channels=1)
    model = DeployableModel(backbone, [0.3], [0.4], encoder=encoder, schedule=schedule, theta_head=theta,
                            transfer=transfer, encoder_kwargs=ENCODER_PARAMS.get(encoder) or {})
    with torch.no_grad():  # non-trivial BN statistics, so normalisation and BN folding are exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def save_tiny(path, model, encoder, method="theta", dataset="none-such"):
    spec = model_spec(model, "resnet8", 1, (SIZE, SIZE), encoder, ENCODER_PARAMS.get(encoder) or {})
    return save_artifact(path, model, spec, {"method": method, "dataset": {"name": dataset}})


def onnx_graph(model, steps):
    return ox.cleanup(ox.export_onnx(static_module(model, steps), torch.rand(2, 1, SIZE, SIZE)))


def ops_of(graph):
    return [n.op_type for n in graph.graph.node]


CASES = [("conv", "rectified", "logits"), ("conv", "vp", "logits"), ("conv", "ve", "features"),
         ("mlp", "rectified", "features"), ("mlp", "vp", "logits"), ("mlp", "ve", "logits"),
         ("transformer", "rectified", "logits"), ("transformer", "vp", "features"), ("transformer", "ve", "logits")]


@pytest.mark.parametrize("encoder,schedule,transfer", CASES)
def test_onnx_parity_static_graph_and_trt_readiness(encoder, schedule, transfer):
    """Every encoder x schedule (both transfers covered), K in {0, 1, 2, 4, 8}, batch 1 and 5."""
    model = tiny_model(encoder, schedule, transfer=transfer)
    x = torch.rand(5, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    nodes = {}
    for k in KS:
        graph = onnx_graph(model, k)
        session = ox.ort_session(graph.SerializeToString())
        for b in (1, 5):
            ref = model(x[:b], steps=k).detach()
            got = ox.ort_run(session, x[:b])
            assert got.shape == (b, 4)
            assert (got - ref).abs().max().item() <= GATES["fp32"]["max_abs_diff"], (k, b)
            assert torch.equal(got.argmax(1), ref.argmax(1))
        ops = ops_of(graph)
        assert not {"Loop", "If", "Scan"} & set(ops)
        # the time embeddings are constants: no sinusoid and no time-MLP Gemm left, only the classifier's
        assert not {"Sin", "Cos"} & set(ops) and ops.count("Gemm") == 1
        assert ox.trt_readiness(graph) == [], (k, ox.trt_readiness(graph)[:3])
        assert set(ops) <= SUPPORTED_OPS
        nodes[k] = len(ops)
    # linear growth in K: about the same number of nodes per extra step (the folder may share a node or two)
    per_step = [(nodes[2] - nodes[1]) / 1, (nodes[4] - nodes[2]) / 2, (nodes[8] - nodes[4]) / 4]
    assert min(per_step) > 0 and max(per_step) - min(per_step) <= 0.05 * max(per_step), nodes


def test_time_embeddings_are_precomputed_constants():
    model = tiny_model("conv", "vp")
    module = static_module(model, 4)
    t = torch.tensor([c.t for c in model.schedule.steps(4)])
    assert torch.allclose(module.time_embed.table, model.time_embed(t).detach())
    assert [round(c.t, 6) for c in module.constants] == [1.0, 0.75, 0.5, 0.25]


def test_trt_readiness_flags_what_tensorrt_cannot_build():
    graph = onnx_graph(tiny_model("conv"), 1)
    bad = onnx.ModelProto()
    bad.CopyFrom(graph)
    bad.graph.node[0].op_type = "Hardmax"  # marked N in TensorRT's matrix
    assert any("Hardmax" in p for p in ox.trt_readiness(bad))
    dyn = onnx.ModelProto()
    dyn.CopyFrom(graph)
    dyn.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    dyn.graph.input[0].type.tensor_type.shape.dim[2].ClearField("dim_value")
    del dyn.graph.value_info[:]
    assert any("dynamic dimension other than the batch" in p for p in ox.trt_readiness(dyn))


def test_plain_student_exports_at_k0_and_refuses_steps():
    torch.manual_seed(0)
    model = DeployableModel(create_model("resnet8", num_classes=4, in_channels=1), [0.3], [0.4]).eval()
    graph = onnx_graph(model, 0)
    x = torch.rand(3, 1, SIZE, SIZE)
    got = ox.ort_run(ox.ort_session(graph.SerializeToString()), x)
    assert (got - model(x).detach()).abs().max().item() <= 1e-4
    with pytest.raises(FmktError, match="plain student.*--steps 0"):
        static_module(model, 2, "kd")


def test_k0_needs_theta_head():
    with pytest.raises(FmktError, match="FM-KT\\^Theta"):
        static_module(tiny_model("conv", theta=False), 0)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("art") / "artifact", tiny_model("mlp", "vp"), "mlp")


runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["export", *[str(a) for a in args]])


def test_cli_onnx_writes_model_metadata_and_parity(artifact, tmp_path):
    out = tmp_path / "e"
    result = invoke(artifact, "--steps", 4, "--format", "onnx", "--out", out)
    assert result.exit_code == 0, result.output
    assert "max abs diff" in result.output and "pass" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx", "parity.json"]
    meta = json.loads((out / "export.json").read_text())
    graph = onnx.load(str(out / "model.onnx"))
    inside = ox.read_metadata(graph)
    assert {k: v for k, v in meta.items() if k not in ("parity", "files")} == inside
    props = {p.key: p.value for p in graph.metadata_props}
    assert props["steps"] == "4" and props["schedule"] == "vp" and props["encoder"] == "mlp"
    assert meta["source"]["weights_sha256"] == sha256_file(artifact / "model.safetensors")
    assert meta["input"]["shape"] == ["batch", 1, SIZE, SIZE] and "raw images in [0, 1]" in meta["input"]["normalisation"]
    assert meta["num_classes"] == 4 and meta["precision"] == "fp32" and meta["tensorrt_readiness"]["ready"]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and [r["batch"] for r in parity["reports"][0]["rows"]] == [1, 64]
    assert "seeded random" in parity["reports"][0]["data"]  # the artifact's dataset cannot be loaded
    # an existing output is not overwritten without --force
    again = invoke(artifact, "--steps", 4, "--out", out)
    assert again.exit_code == 2 and "--force" in again.output
    assert invoke(artifact, "--steps", 4, "--out", out, "--force").exit_code == 0


def test_default_output_folder_and_fp16(artifact):
    result = run_export(artifact, 2, "onnx", precision="fp16", batch="1:4:8")
    assert result.out == artifact.parent / "export-onnx-k2-fp16"
    assert result.passed and result.reports[0].rows[-1].batch == 8
    graph = onnx.load(str(result.out / "model.onnx"))
    elem = onnx.TensorProto
    assert graph.graph.input[0].type.tensor_type.elem_type == elem.FLOAT
    assert graph.graph.output[0].type.tensor_type.elem_type == elem.FLOAT
    assert any(i.data_type == elem.FLOAT16 for i in graph.graph.initializer)
    assert not any(i.data_type == elem.FLOAT and np.prod(i.dims) > 16 for i in graph.graph.initializer)
    assert ox.trt_readiness(graph) == []
    row = result.reports[0].rows[-1]
    assert row.max_abs_diff <= 1e-2 and row.top1_agreement >= 0.99


def test_parity_breach_exits_1_and_says_by_how_much(artifact, tmp_path, monkeypatch):
    monkeypatch.setitem(GATES, "fp32", {"max_abs_diff": -1.0, "top1_agreement": 1.0})
    result = invoke(artifact, "--steps", 1, "--out", tmp_path / "e")
    assert result.exit_code == 1
    assert "exceeds the -1 gate by" in result.output and "FAIL" in result.output


def _tensorrt_ready():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_tensorrt_ready(), reason="TensorRT and a GPU are present: the engine path runs instead")
def test_trt_without_tensorrt_exits_2_and_keeps_the_onnx(artifact, tmp_path):
    out = tmp_path / "t"
    result = invoke(artifact, "--steps", 2, "--format", "trt", "--out", out)
    assert result.exit_code == 2
    assert "no engine was built" in result.output and "model.onnx" in result.output
    assert (out / "model.onnx").is_file() and (out / "export.json").is_file()
    assert json.loads((out / "export.json").read_text())["tensorrt"]["built"] is False


@pytest.mark.skipif(not _tensorrt_ready(), reason="needs TensorRT (pip install tensorrt) and a CUDA GPU; "
                                                   "absent here, readiness is proven by the ONNX checks above")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trt_engine_parity(artifact, tmp_path, precision):
    out = tmp_path / "t"
    result = run_export(artifact, 2, "trt", precision=precision, batch="1:8:64", out=out)
    result.raise_for_status()
    assert (out / "model.plan").is_file() and (out / "timing.cache").is_file()
    assert result.reports[-1].target.startswith("TensorRT") and result.passed
    again = run_export(artifact, 2, "trt", precision=precision, batch="1:8:64", out=out, force=True)
    assert again.meta["tensorrt"]["timing_cache_reused"]


@pytest.mark.parametrize("args,match", [
    (["--steps", -1], "--steps must be an integer >= 0"),
    (["--steps", 2, "--format", "tflite"], "unknown format 'tflite'"),
    (["--steps", 2, "--precision", "int8"], "unknown precision"),
    (["--steps", 2, "--batch", "8:4:2"], "MIN:OPT:MAX"),
    (["--steps", 2, "--opset", 99], "outside the supported range"),
])
def test_cli_error_paths_are_one_sentence_exit_2(artifact, tmp_path, args, match):
    result = invoke(artifact, *args, "--out", tmp_path / "e")
    assert result.exit_code == 2, result.output
    assert match in result.output and "Traceback" not in result.output
    assert not (tmp_path / "e").exists()


def test_bad_artifact_exit_2(tmp_path):
    result = invoke(tmp_path / "missing", "--steps", 1)
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "notart").mkdir()
    result = invoke(tmp_path / "notart", "--steps", 1)
    assert result.exit_code == 2 and "is not an fmkt artifact" in result.output


def test_parse_batch_and_parity_images_from_the_dataset():
    assert parse_batch("1:32:128") == (1, 32, 128) and parse_batch("8") == (8, 8, 8)
    meta = {"model": {"input": {"channels": 1, "size": [8, 8]}}, "dataset": {"name": "digits"}}
    images, source = parity_images(meta, 16)
    assert images.shape == (16, 1, 8, 8) and "digits test split" in source
    assert 0.0 <= images.min().item() and images.max().item() <= 1.0


@pytest.mark.slow
def test_aoti_round_trip(tmp_path):
    """torch.export + AOTInductor package on CPU (about 30-60 s of compile on 2 cores)."""
    model = tiny_model("conv", "rectified", theta=False)
    art = save_tiny(tmp_path / "artifact", model, "conv", method="fmkt")
    result = run_export(art, 1, "aoti", batch="1:4:8", device="cpu")
    result.raise_for_status()
    package = result.out / "model.pt2"
    assert package.is_file() and json.loads((result.out / "export.json").read_text())["steps"] == 1
    loaded = torch._inductor.aoti_load_package(str(package))
    for b in (1, 3):
        x = torch.rand(b, 1, SIZE, SIZE)
        assert (loaded(x) - model(x, steps=1)).abs().max().item() <= 1e-4
