"""EXPORT_FORMATS and BENCH_BACKENDS: every entry has what it promises, and a new format or backend is one entry plus
its module: a fake one registered here (nothing else touched) is checked, written, planned, built and timed through
run_export / run_bench and the CLI. The registries are torch-free, so `--help` lists them without importing torch."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fmkt.bench import BENCH_BACKENDS, BenchBackend, BenchSettings, Runner, run_bench
from fmkt.bench.backends import DEVICES, backends_help, default_backends
from fmkt.cli.app import app
from fmkt.export import EXPORT_FORMATS, GATES, PRECISIONS, ExportFormat, run_export
from fmkt.export import formats
from fmkt.export import onnx_export as ox
from test_bench import make_artifact

runner = CliRunner()
CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("registry") / "artifact")


def has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------- what entries promise
def test_one_list_of_precisions_and_a_gate_for_each():
    import fmkt.bench as bench
    import fmkt.bench.plan as plan
    import fmkt.export.pipeline as pipeline

    assert PRECISIONS == ("fp32", "fp16") and set(GATES) == set(PRECISIONS)
    assert bench.PRECISIONS is plan.PRECISIONS is pipeline.PRECISIONS is formats.PRECISIONS
    for module in (plan, pipeline):
        assert not hasattr(module, "BACKENDS") and not hasattr(module, "FORMATS") and not hasattr(module, "BUILD_COST")


@pytest.mark.parametrize("name", list(EXPORT_FORMATS))
def test_every_export_format_has_what_its_entry_promises(name):
    f = EXPORT_FORMATS[name]
    assert f.name == name and f.summary and f.files and f.parity
    assert all(file.startswith("model.") or file == "timing.cache" for file in f.files)
    assert callable(f.writer()) and f.writer().__name__ == "write_export"
    assert f.refused(CPU) is None  # every format can be made for the CPU here
    for module in f.needs:
        assert isinstance(module, str) and "." not in module
    assert not (f.opset and f.on_device), "an ONNX graph is traced on the CPU; a compiled one takes no opset"


@pytest.mark.parametrize("name", list(BENCH_BACKENDS))
def test_every_bench_backend_has_what_its_entry_promises(name, monkeypatch):
    b = BENCH_BACKENDS[name]
    assert b.name == name and b.summary and callable(formats.resolve(b.build))
    assert set(b.default_on) <= set(DEVICES) and set(b.build_cost) <= set(DEVICES)
    assert all(isinstance(v, float) and v >= 0 for v in b.build_cost.values())
    assert b.cleanup is None or callable(formats.resolve(b.cleanup))
    assert b.refusal is None or callable(formats.resolve(b.refusal))
    if b.needs_cuda:  # what it needs is what it says when it is missing
        assert b.unavailable(CPU) == b.needs_cuda
    else:
        assert b.unavailable(CPU) is None or isinstance(b.unavailable(CPU), str)
    for module, reason in b.needs:
        monkeypatch.setitem(sys.modules, module, None)  # import fails
        assert b.unavailable(torch.device("cuda")) == reason
        monkeypatch.delitem(sys.modules, module)


def test_nothing_dispatches_on_a_format_or_backend_name():
    """No `if fmt == "aoti"` / `backend == "compile"` left in export/, bench/ or cli/: what differs is in the entry."""
    found = []
    for p in [*(ROOT / "export").glob("*.py"), *(ROOT / "bench").glob("*.py"), ROOT / "cli" / "app.py"]:
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            parts = list(ast.walk(node))
            named = {n.value for n in parts if isinstance(n, ast.Constant)} & {*EXPORT_FORMATS, *BENCH_BACKENDS}
            if named and any(isinstance(n, ast.Name) and n.id in ("fmt", "backend", "target") for n in parts):
                found.append(f"{p.relative_to(ROOT)}:{node.lineno} {sorted(named)}")
    assert found == []


def test_the_cli_help_names_the_registries_without_importing_torch():
    """`fmkt-cli export --help` and `bench --help` list the formats, backends (with their defaults) and precisions
    from the registries themselves, which import no torch (so no copy of their names is kept for --help)."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom fmkt.cli.app import app\n"
            "for cmd in ('export', 'bench'):\n"
            "    result = CliRunner().invoke(app, [cmd, '--help'])\n    print(result.output)\n"
            "    assert result.exit_code == 0\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch imported: False" in proc.stdout
    text = " ".join(proc.stdout.replace("\u2502", " ").split())  # the help's box border out, its wrapping undone
    assert default_backends("cpu") == ["eager", "onnxruntime"]
    assert default_backends("cuda") == ["eager", "cudagraph", "onnxruntime", "trt"]
    assert backends_help() == ("Comma list of eager, compile, cudagraph, onnxruntime, trt, aoti. Default: "
                               "eager,onnxruntime on CPU; eager,cudagraph,onnxruntime,trt on CUDA.")
    for line in ("onnx | trt | aoti", "fp32 | fp16 (float32 input and output kept).", "aoti: compile for auto | cpu",
                 backends_help(), "fp32 and/or fp16, e.g. fp32,fp16."):
        assert line in text, (line, text)


@pytest.mark.skipif(not (has("onnx") and has("onnxruntime")), reason="needs the export extra")
def test_an_onnx_export_writes_the_files_and_checks_the_runtimes_its_entry_names(artifact, tmp_path):
    entry = EXPORT_FORMATS["onnx"]
    result = run_export(artifact, 1, "onnx", out=tmp_path / "o")
    result.raise_for_status()
    written = {p.name for p in (tmp_path / "o").iterdir()}
    assert written == set(entry.files) | {"export.json", "parity.json"}
    assert [r.target.split()[0] for r in result.reports] == list(entry.parity)


def test_one_onnx_export_sequence_for_export_and_bench(artifact, tmp_path, monkeypatch):
    """export, cleanup, fp16: written once (onnx_export.onnx_graph), used by fmkt-cli export and by bench."""
    pytest.importorskip("onnxruntime")
    calls, real = [], ox.onnx_graph
    monkeypatch.setattr(ox, "onnx_graph", lambda *a, **k: calls.append(a[2:] + tuple(k.values())) or real(*a, **k))
    run_export(artifact, 1, "onnx", out=tmp_path / "e").raise_for_status()
    assert calls == [("fp32", 17)]
    res = run_bench(artifact, BenchSettings(backends=["onnxruntime"], batches=[2], steps=[1], iters=1, warmup=0,
                                            device="cpu", out=tmp_path / "b.json"), progress=False)
    assert [r.status for r in res.rows] == ["ok", "ok"] and calls[1:] == [("fp32",), ("fp32",)]  # student, K=1


# ------------------------------------------------------------------------------- one entry plus its module
def write_fake(job) -> list:
    """A format's module, as a new one would write it: its file, its export.json key, its parity."""
    (job.tmp / "model.fake").write_text(f"K={job.steps} {job.precision} on {job.device.type}")
    job.meta["fake"] = {"opset": job.opset}
    job.files["fake"] = "model.fake"
    return [job.parity(lambda x: job.module(x), "fake runtime")]


def test_a_new_export_format_is_one_entry_plus_its_module(artifact, tmp_path, monkeypatch):
    seen = []
    fake = ExportFormat("fake", write_fake, ("model.fake",), ("fake",), "a test format", on_device=True,
                        refusal=lambda device: seen.append(device.type))
    monkeypatch.setitem(EXPORT_FORMATS, "fake", fake)
    result = run_export(artifact, 2, "fake", out=tmp_path / "f", device="cpu")
    result.raise_for_status()
    assert seen == ["cpu"] and result.passed and result.reports[0].target == "fake runtime"
    meta = json.loads((tmp_path / "f" / "export.json").read_text())
    assert meta["target"] == "fake" and meta["fake"] == {"opset": None} and meta["opset"] is None
    assert meta["files"] == {"fake": "model.fake", "metadata": "export.json", "parity": "parity.json"}
    assert (tmp_path / "f" / "model.fake").read_text() == "K=2 fp32 on cpu"
    cli = runner.invoke(app, ["export", str(artifact), "--steps", "1", "--format", "fake", "--opset", "17",
                              "--out", str(tmp_path / "g")])
    assert cli.exit_code == 2 and "--opset only applies to the onnx and trt formats" in cli.output
    cli = runner.invoke(app, ["export", str(artifact), "--steps", "1", "--format", "fake", "--precision", "fp16",
                              "--out", str(tmp_path / "g")])
    assert cli.exit_code == 0, cli.output
    assert json.loads((tmp_path / "g" / "export.json").read_text())["precision"] == "fp16"
    refused = ExportFormat("fake", write_fake, ("model.fake",), ("fake",), refusal=lambda device: "not here")
    monkeypatch.setitem(EXPORT_FORMATS, "fake", refused)
    cli = runner.invoke(app, ["export", str(artifact), "--steps", "1", "--format", "fake",
                              "--out", str(tmp_path / "h")])
    assert cli.exit_code == 2 and "not here." in cli.output and not (tmp_path / "h").exists()


class FakeRunner(Runner):
    def __init__(self, module):
        self.module = module

    def run(self, x):
        return self.module(x)


def build_fake(builder, precision: str, variant: str) -> Runner:
    """A backend's module, as a new one would write it: a Runner for the variant from what the Builder hands it."""
    return FakeRunner(builder.module(variant, precision))


def test_a_new_bench_backend_is_one_entry_plus_its_module(artifact, tmp_path, monkeypatch):
    import fmkt.bench as bench

    freed = []
    fake = BenchBackend("fake", build_fake, "a test backend", default_on=("cpu",), build_cost={"cpu": 1000.0},
                        cleanup=lambda: freed.append(True))
    monkeypatch.setitem(BENCH_BACKENDS, "fake", fake)
    assert default_backends("cpu") == ["eager", "onnxruntime", "fake"]
    settings = BenchSettings(backends=["fake"], batches=[1, 2], steps=[1], iters=2, warmup=0, device="cpu",
                             out=tmp_path / "f.json")
    res = run_bench(artifact, settings, progress=False)
    assert [(r.backend, r.variant, r.batch, r.status) for r in res.rows] == [
        ("fake", v, b, "ok") for v in ("student", "1") for b in (1, 2)]
    assert res.estimate_s >= 2 * 1000.0 and freed == [True]  # its build cost per variant; its cleanup once
    doc = json.loads((tmp_path / "f.json").read_text())
    assert {r["backend"] for r in doc["rows"]} == {"fake"}
    needs = BenchBackend("fake", build_fake, needs_cuda="the fake backend needs --device cuda")
    monkeypatch.setitem(BENCH_BACKENDS, "fake", needs)
    assert bench.quick_unavailable("fake", CPU) == "the fake backend needs --device cuda"
    cli = runner.invoke(app, ["bench", str(artifact), "--backends", "fake,eager", "--batch", "1", "--steps", "1",
                              "--iters", "1", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path / "c.json")])
    assert cli.exit_code == 0, cli.output
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert {(r["backend"], r["status"], r["reason"]) for r in rows if r["backend"] == "fake"} == {
        ("fake", "unavailable", "the fake backend needs --device cuda")}
    monkeypatch.delitem(BENCH_BACKENDS, "fake")
    cli = runner.invoke(app, ["bench", str(artifact), "--backends", "fake", "--device", "cpu"])
    assert cli.exit_code == 2 and "unknown backend 'fake'" in cli.output
