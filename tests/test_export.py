"""fmkt.export: the unrolled static graph vs PyTorch (ONNX Runtime), static-graph properties, TensorRT readiness,
metadata, FP16, AOTInductor, the TensorRT path and the CLI's error paths. Tiny artifacts built here, no training."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fmkt.artifact import save_artifact  # noqa: E402
from fmkt.cli.app import app  # noqa: E402
from fmkt.errors import FmktError  # noqa: E402
from fmkt.export import GATES, run_export, static_module  # noqa: E402
from fmkt.export import onnx_export as ox  # noqa: E402
from fmkt.export.parity import parity_images  # noqa: E402
from fmkt.export.pipeline import parse_batch  # noqa: E402
from fmkt.export.trt_operators import SUPPORTED_OPS  # noqa: E402
from fmkt.files import sha256_file  # noqa: E402
from fmkt.models import create_model  # noqa: E402
from fmkt.student import DeployableModel, StudentSpec, build_student, spec_of  # noqa: E402

KS = (0, 1, 2, 4, 8)
SIZE = 12  # resnet8 on 12x12 -> a 3x3 map; the transformer's window 2 then pads, so the masked path is exported
ENCODER_PARAMS = {"conv": {}, "dwconv": {}, "mlp": {},
                  "transformer": {"window": 2, "heads": 2, "head_dim": 8}}


def tiny_model(encoder="conv", schedule="rectified", theta=True, transfer="logits", seed=0):
    torch.manual_seed(seed)
    model = build_student(StudentSpec(arch="resnet8", num_classes=4, channels=1, size=(SIZE, SIZE), mean=(0.3,),
                                      std=(0.4,), encoder=encoder, encoder_params=ENCODER_PARAMS.get(encoder) or {},
                                      schedule=schedule, theta_head=theta, transfer=transfer))
    with torch.no_grad():  # non-trivial BN statistics, so normalisation and BN folding are exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def save_tiny(path, model, method="theta", dataset="none-such"):
    return save_artifact(path, model, spec_of(model).to_json(), {"method": method, "dataset": {"name": dataset}})


def onnx_graph(model, steps):
    return ox.cleanup(ox.export_onnx(static_module(model, steps), torch.rand(2, 1, SIZE, SIZE)))


def ops_of(graph):
    return [n.op_type for n in graph.graph.node]


CASES = [("conv", "rectified", "logits"), ("conv", "vp", "logits"), ("conv", "ve", "features"),
         ("dwconv", "rectified", "logits"), ("dwconv", "vp", "features"), ("dwconv", "ve", "logits"),
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


def test_dwconv_exports_its_depthwise_conv_as_a_grouped_conv():
    """The depthwise 3x3 is an ONNX Conv with group = C (TensorRT's Conv takes a group attribute), one per step."""
    model = tiny_model("dwconv")
    channels = model.num_features
    for k in (1, 4):
        graph = onnx_graph(model, k)
        groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in graph.graph.node
                  if n.op_type == "Conv"]
        assert groups.count(channels) == k and set(groups) == {1, channels}, groups
        assert ox.trt_readiness(graph) == []


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
    return save_tiny(tmp_path_factory.mktemp("art") / "artifact", tiny_model("mlp", "vp"))


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


def test_parity_gates_are_the_published_numbers():
    """The gates, pinned as literals (the other tests read them from GATES, so a loosened gate would loosen them
    too), and check_parity fed outputs perturbed just under and just over each gate."""
    from fmkt.export.parity import check_parity

    assert GATES == {"fp32": {"max_abs_diff": 1e-4, "top1_agreement": 1.0},
                     "fp16": {"max_abs_diff": 1e-2, "top1_agreement": 0.99}}
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(200, 3, generator=gen)
    logits = torch.eye(4)[torch.arange(200) % 4] * 5.0 + images[:, :1]  # wide margins: argmax is row % 4
    reference = lambda x: logits[: len(x)]  # noqa: E731
    for precision, gate in (("fp32", 1e-4), ("fp16", 1e-2)):
        for scale, ok in ((0.9, True), (1.1, False)):
            bumped = lambda x, s=scale * gate: logits[: len(x)] + s * (torch.arange(4) == 1)  # noqa: E731
            report = check_parity(reference, bumped, images, [1, 200], precision, "test", "test")
            assert report.passed is ok, (precision, scale, [r.max_abs_diff for r in report.rows])
    # top-1 agreement (read alone: the moved rows also breach the diff gate): fp32 needs every image, fp16 99 %
    # (2 moved argmaxes in 200 are 99.0 %: pass; 3 are 98.5 %: fail)
    for precision, moved, ok in (("fp32", 1, False), ("fp16", 2, True), ("fp16", 3, False)):
        def shifted(x, n=moved):
            out = logits[: len(x)].clone()
            out[:n] = out[:n].roll(1, dims=1)  # each of the first n rows votes for the next class
            return out
        report = check_parity(reference, shifted, images, [200], precision, "test", "test")
        assert report.rows[0].top1_agreement == pytest.approx(1 - moved / 200)
        assert (report.rows[0].top1_agreement >= GATES[precision]["top1_agreement"]) is ok, (precision, moved)


def test_parity_compares_the_exported_graph_not_pytorch(artifact, tmp_path, monkeypatch):
    """A graph whose logits are off by 2e-4 (twice the fp32 gate) must fail export: parity runs the ONNX graph
    in ONNX Runtime, never PyTorch against itself."""
    real = ox.ort_run
    monkeypatch.setattr(ox, "ort_run", lambda session, x: real(session, x) + 2e-4)
    result = run_export(artifact, 1, "onnx", out=tmp_path / "e")
    assert not result.passed
    assert 1.9e-4 < result.reports[0].rows[0].max_abs_diff < 2.1e-4


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
    art = save_tiny(tmp_path / "artifact", model, method="fmkt")
    result = run_export(art, 1, "aoti", batch="1:4:8", device="cpu")
    result.raise_for_status()
    package = result.out / "model.pt2"
    assert package.is_file() and json.loads((result.out / "export.json").read_text())["steps"] == 1
    loaded = torch._inductor.aoti_load_package(str(package))
    for b in (1, 3):
        x = torch.rand(b, 1, SIZE, SIZE)
        assert (loaded(x) - model(x, steps=1)).abs().max().item() <= 1e-4


class _FakeTrt:
    """Just enough of the tensorrt module for build_engine and EngineRunner.bind, recording the calls made."""

    __version__ = "10.16.1"

    def __init__(self):
        self.calls = []
        fake = self

        class Enum:
            def __init__(self, **members):
                self.__dict__.update(members)

        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level=0: None})
        self.NetworkDefinitionCreationFlag = Enum(STRONGLY_TYPED=5)
        self.BuilderFlag = Enum(TF32=7, FP16=0)
        self.MemoryPoolType = Enum(WORKSPACE=0)

        class Config:
            def set_memory_pool_limit(self, *a):
                pass

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag))

            def clear_flag(self, flag):
                fake.calls.append(("clear_flag", flag))

            def add_optimization_profile(self, p):
                pass

            def create_timing_cache(self, seed):
                return b"cache"

            def set_timing_cache(self, cache, ignore_mismatch):
                pass

            def get_timing_cache(self):
                return type("C", (), {"serialize": lambda s: b"cache"})()

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return type("P", (), {"set_shape": lambda s, *a: None})()

            def build_serialized_network(self, network, config):
                return b"plan"

        self.Builder = Builder
        self.OnnxParser = type("Parser", (), {"__init__": lambda s, n, l: None, "parse_from_file": lambda s, p: True,
                                              "num_errors": 0})


@pytest.mark.parametrize("precision,cleared", [("fp32", True), ("fp16", False)])
def test_tensorrt_fp32_engine_is_built_without_tf32(tmp_path, monkeypatch, precision, cleared):
    """TensorRT allows TF32 by default (~1e-3 error against the 1e-4 fp32 gate): fp32 engines clear the flag and
    export.json says so."""
    import fmkt.export.tensorrt_engine as te

    trt = _FakeTrt()
    monkeypatch.setattr(te, "load_tensorrt", lambda path: trt)
    monkeypatch.setattr(te.torch.cuda, "get_device_name", lambda *a: "fake GPU")
    (tmp_path / "m.onnx").write_bytes(b"")
    facts = te.build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", tmp_path / "t.cache", (1, 8, 8), (1, 2, 4),
                            precision)
    assert (("clear_flag", 7) in trt.calls) is cleared and facts["tf32"] is (not cleared)


def _fake_engine_runner():
    """An EngineRunner over fakes: an engine for (1, 8, 8) images in batches of 1 to 32, whose context refuses any
    other shape as TensorRT does (set_input_shape returns False)."""
    from fmkt.export.tensorrt_engine import EngineRunner

    class Context:
        def set_input_shape(self, name, shape):
            return 1 <= shape[0] <= 32 and tuple(shape[1:]) == (1, 8, 8)

        def get_tensor_shape(self, name):
            raise AssertionError("not reached for a refused batch")

    class Engine:
        def get_tensor_profile_shape(self, name, profile):
            return [(1, 1, 8, 8), (8, 1, 8, 8), (32, 1, 8, 8)]

    runner = object.__new__(EngineRunner)
    runner.engine, runner.context, runner.input_name, runner.output_name = Engine(), Context(), "images", "logits"
    runner.in_dtype, runner.out_dtype = torch.float32, torch.float32
    return runner


def test_tensorrt_batch_outside_the_profile_is_one_sentence():
    """set_input_shape only returns False for a batch outside the optimization profile; the runner names the range
    instead of failing later in an obscure way."""
    runner = _fake_engine_runner()
    assert runner.profile_range() == (1, 32)
    with pytest.raises(FmktError, match=r"batches of 1 to 32 images .* not 64; rebuild it with") as batch:
        runner.bind(torch.zeros(64, 1, 8, 8))
    assert "(C, H, W)" not in str(batch.value)  # the image shape is right: only the batch is named


def test_tensorrt_image_shape_other_than_the_engines_is_named():
    """set_input_shape also returns False for images of another (C, H, W): the sentence names the shape the engine
    takes, not the batch range (the batch is in it); both when both are wrong."""
    runner = _fake_engine_runner()
    for shape in [(4, 3, 8, 8), (4, 1, 16, 8)]:
        with pytest.raises(FmktError) as image:
            runner.bind(torch.zeros(shape))
        message = str(image.value)
        assert f"images of shape (C, H, W) = (1, 8, 8), not {shape[1:]}" in message, message
        assert "batches of" not in message and "input size and channels" in message
    with pytest.raises(FmktError, match=r"\(C, H, W\) = \(1, 8, 8\), not \(3, 8, 8\) and takes batches of 1 to 32 "
                                        r"images .* not 64; pass images .* and rebuild it with"):
        runner.bind(torch.zeros(64, 3, 8, 8))


def test_aoti_on_cuda_with_a_crashing_torch_is_refused_in_one_sentence(artifact, tmp_path, monkeypatch):
    """torch 2.11 segfaults loading any AOTInductor CUDA package (a plain CNN too, on an H100): export refuses up
    front, before a minute of compiling, and says what to use instead; FMKT_AOTI_CUDA=1 lifts the guard."""
    import fmkt.export.aoti as aoti
    import fmkt.export.pipeline as pipeline

    monkeypatch.setattr(aoti.torch, "__version__", "2.11.0+cu130")
    monkeypatch.setattr(pipeline, "resolve_device", lambda name: torch.device("cuda"))
    with pytest.raises(FmktError, match=r"crash the process that loads them with torch 2\.11\.0.*--format onnx"):
        run_export(artifact, 1, "aoti", device="cuda", out=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert aoti.cuda_refusal(torch.device("cpu")) is None
    monkeypatch.setenv("FMKT_AOTI_CUDA", "1")
    assert aoti.cuda_refusal(torch.device("cuda")) is None
    monkeypatch.setattr(aoti.torch, "__version__", "2.13.0")
    monkeypatch.delenv("FMKT_AOTI_CUDA")
    assert aoti.cuda_refusal(torch.device("cuda")) is None


def test_an_aoti_child_that_dies_is_one_sentence_naming_the_signal_and_the_phase(artifact, tmp_path, monkeypatch):
    """The compile, load and parity run happen in a child process: a segfault there (as torch 2.11 does on CUDA)
    ends the export with exit 2 and one sentence, never a dead fmkt-cli."""
    import subprocess

    import fmkt.export.aoti as aoti

    def crash(cmd, **kw):
        assert cmd[1:4] == ["-X", "faulthandler", "-m"] and cmd[5] == "validate"
        return subprocess.CompletedProcess(cmd, -11, "fmkt-aoti: compiled\n",
                                           "warnings.warn(\nFatal Python error: Segmentation fault\n")

    monkeypatch.setattr(aoti.subprocess, "run", crash)
    result = runner.invoke(app, ["export", str(artifact), "--steps", "1", "--format", "aoti", "--device", "cpu",
                                 "--out", str(tmp_path / "a")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "signal 11 (SIGSEGV) while loading the compiled package (Fatal Python error: Segmentation fault)" in text
    assert "warnings.warn" not in text and "Traceback" not in text and not (tmp_path / "a").exists()


def test_onnxruntime_cuda_fp32_turns_tf32_off(monkeypatch):
    """ONNX Runtime's CUDA provider allows TF32 by default: fp32 sessions (export parity, bench) ask for use_tf32=0,
    fp16 ones keep the default."""
    assert ox.cuda_provider_options("fp32") == {"use_tf32": "0"} and ox.cuda_provider_options("fp16") == {}
    seen = {}

    class Session:
        def __init__(self, model, opts, providers):
            seen["providers"] = providers

    monkeypatch.setattr(ox.require("onnxruntime"), "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ox.require("onnxruntime"), "InferenceSession", Session)
    ox.ort_session(b"", "fp32")
    assert seen["providers"] == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
