"""`fmkt-cli bench`: rows per backend, precision, batch and K; unavailable backends reported, not crashed on;
JSON, CSV and PNG written with what was measured. Few iterations on a tiny model: plumbing, never speed."""
import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from fmkt.artifact import save_artifact
from fmkt.bench import BenchSettings, Row, _ratios, percentiles, run_bench
from fmkt.cli.app import app
from fmkt.student import StudentSpec, build_student, spec_of

runner = CliRunner()
METRICS = {"last": {"0": 80.0, "1": 81.5, "2": 82.25}, "best": {"0": 80.0, "1": 81.5, "2": 82.25}}


def make_artifact(path, *, theta=True, encoder="conv", metrics=METRICS, method="theta"):
    torch.manual_seed(0)
    model = build_student(StudentSpec(arch="resnet8", num_classes=10, channels=1, size=(8, 8), mean=(0.5,),
                                      std=(0.25,), encoder=encoder, theta_head=theta))
    spec = spec_of(model).to_json()
    info = {"method": method, "dataset": {"name": "synthetic", "num_classes": 10}, "metrics": metrics}
    return save_artifact(path, model, spec, info)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("bench") / "artifact")


def test_cli_writes_json_csv_png_with_the_expected_rows(artifact, tmp_path):
    out = tmp_path / "res" / "b.json"
    result = runner.invoke(app, ["bench", str(artifact), "--backends", "eager,onnxruntime,trt,cudagraph",
                                 "--batch", "1,3", "--steps", "0,1,2", "--iters", "4", "--warmup", "1",
                                 "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "estimate" in result.output and "unavailable" in result.output
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    # 4 backends x 1 precision x (student, theta, K=1, K=2) x 2 batches
    assert len(rows) == 32
    keys = {(r["backend"], r["variant"], r["batch"]) for r in rows}
    assert keys == {(b, v, n) for b in ("eager", "onnxruntime", "trt", "cudagraph")
                    for v in ("student", "0", "1", "2") for n in (1, 3)}
    for r in rows:
        if r["backend"] in ("eager", "onnxruntime"):
            assert r["status"] == "ok", r
            assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
            assert r["throughput"] == pytest.approx(1e3 * r["batch"] / r["mean_ms"], rel=1e-3)
            assert r["iters"] == 4 and r["device_p50_ms"] is None  # CPU: no device time
            assert r["x_student"] == pytest.approx(1.0) if r["variant"] == "student" else r["x_student"] > 0
        else:
            assert r["status"] == "unavailable" and r["reason"], r
        assert r["top1"] == (METRICS["last"].get(r["variant"]))
    assert doc["machine"]["cpu"] and doc["machine"]["cores"] >= 1
    assert doc["versions"]["torch"] == torch.__version__ and "onnxruntime" in doc["versions"]
    assert doc["date"][:4].isdigit() and doc["settings"]["iters"] == 4
    with open(out.with_suffix(".csv")) as f:
        table = list(csv.DictReader(f))
    assert [(r["backend"], r["variant"], int(r["batch"]), r["status"]) for r in table] == \
           [(r["backend"], r["variant"], r["batch"], r["status"]) for r in rows]
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert doc["plot"] == {"written": True, "file": "b.png"}


def test_export_folder_times_its_own_graph_and_the_student(artifact, tmp_path):
    from fmkt.export import run_export

    exported = run_export(artifact, 1, "onnx", out=tmp_path / "exp")
    exported.raise_for_status()
    res = run_bench(exported.out, BenchSettings(backends=["onnxruntime"], batches=[2], iters=3, warmup=1,
                                                device="cpu", out=tmp_path / "e.json"), progress=False)
    assert [(r.variant, r.status) for r in res.rows] == [("student", "ok"), ("1", "ok")]
    assert res.rows[1].top1 == 81.5


def test_plain_student_and_unreachable_k(tmp_path):
    plain = make_artifact(tmp_path / "plain", theta=False, encoder=None, method="kd",
                          metrics={"last": {"plain": 77.0}})
    res = run_bench(plain, BenchSettings(backends=["eager"], batches=[2], steps=[4], iters=2, warmup=0,
                                         device="cpu", out=tmp_path / "p.json"), progress=False)
    assert [(r.variant, r.top1) for r in res.rows] == [("student", 77.0)]
    assert any("no flow steps" in n for n in res.info["notes"])
    flow = make_artifact(tmp_path / "flow", theta=False, method="fmkt")
    res = run_bench(flow, BenchSettings(backends=["eager"], batches=[2], steps=[0, 2], iters=2, warmup=0,
                                        device="cpu", out=tmp_path / "f.json"), progress=False)
    assert [r.variant for r in res.rows] == ["student", "2"]
    assert any("Theta" in n for n in res.info["notes"])
    result = runner.invoke(app, ["bench", str(flow), "--steps", "0", "--device", "cpu"])
    assert result.exit_code == 2 and "none of the steps" in result.output


def test_a_backend_that_breaks_is_a_failed_row_not_a_crash(artifact, tmp_path, monkeypatch):
    import fmkt.bench as bench

    real = bench.Builder.build

    def build(self, backend, precision, variant):
        if backend == "onnxruntime" and variant == "1":
            raise RuntimeError("simulated runtime failure\nsecond line")
        return real(self, backend, precision, variant)

    monkeypatch.setattr(bench.Builder, "build", build)
    res = run_bench(artifact, BenchSettings(backends=["eager", "onnxruntime"], batches=[1], steps=[1],
                                            iters=2, warmup=0, device="cpu", out=tmp_path / "x.json"),
                    progress=False)
    status = {(r.backend, r.variant): (r.status, r.reason) for r in res.rows}
    assert status[("onnxruntime", "1")] == ("failed", "RuntimeError: simulated runtime failure")
    assert status[("eager", "1")][0] == status[("onnxruntime", "student")][0] == "ok"


def test_without_matplotlib_the_png_is_skipped_with_the_reason(artifact, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    res = run_bench(artifact, BenchSettings(backends=["eager"], batches=[1], steps=[1], iters=2, warmup=0,
                                            device="cpu", out=tmp_path / "m.json"), progress=False)
    assert "png" not in res.files and not (tmp_path / "m.png").exists()
    assert res.info["plot"]["written"] is False and "matplotlib" in res.info["plot"]["reason"]
    assert json.loads((tmp_path / "m.json").read_text())["plot"]["written"] is False


def test_percentiles_and_ratios():
    assert percentiles([float(v) for v in range(1, 101)]) == pytest.approx((50.5, 90.1, 99.01))
    rows = [Row("eager", "fp32", 1, "student", "ok", p50_ms=2.0), Row("eager", "fp32", 1, "4", "ok", p50_ms=2.6),
            Row("eager", "fp32", 8, "4", "ok", p50_ms=9.0), Row("trt", "fp32", 1, "4", "unavailable")]
    _ratios(rows)
    assert rows[1].x_student == pytest.approx(1.3)
    assert rows[2].x_student is None and rows[3].x_student is None  # no baseline at that batch / not measured


def test_an_aoti_crash_in_the_child_process_is_a_failed_row(artifact, tmp_path, monkeypatch):
    """AOTInductor compiles and first loads in a child process (a CUDA package load segfaulted torch 2.11 on an
    H100): a child killed by a signal becomes a failed row naming the signal, and the bench goes on."""
    import subprocess

    import fmkt.export.aoti as aoti

    calls = []

    def crash(cmd, **kw):
        calls.append(cmd[cmd.index("fmkt.export.aoti") + 1])  # compile | load
        return subprocess.CompletedProcess(cmd, -11, "", "Fatal Python error: Segmentation fault")

    monkeypatch.setattr(aoti.subprocess, "run", crash)
    res = run_bench(artifact, BenchSettings(backends=["aoti", "eager"], batches=[1], steps=[1], iters=2, warmup=0,
                                            device="cpu", out=tmp_path / "a.json"), progress=False)
    status = {(r.backend, r.variant): (r.status, r.reason) for r in res.rows}
    assert status[("aoti", "1")][0] == "failed" and "signal 11" in status[("aoti", "1")][1]
    assert status[("eager", "1")][0] == "ok" and calls == ["compile", "compile"]


def test_rows_take_host_and_device_percentiles_from_their_own_samples(artifact, tmp_path, monkeypatch):
    """Each row's p50/p90/p99 come from the host latencies and its device_* from the CUDA-event spans: two distinct
    sample lists (fed here by a fake timing loop; the real CUDA loop is checked on the GPU, below)."""
    import fmkt.bench as bench

    host = [float(i) for i in range(1, 101)]  # p50 50.5, p90 90.1, p99 99.01
    device = [i / 10 for i in range(1, 101)]  # a tenth of it

    def fake(runners, images, dev, warmup, iters):
        out = {}
        for v, r in runners.items():
            t = bench.Timed(r)
            t.host, t.device = list(host), list(device)
            out[v] = t
        return out

    monkeypatch.setattr(bench, "time_interleaved", fake)
    res = run_bench(artifact, BenchSettings(backends=["eager"], batches=[2], steps=[1], iters=100, warmup=0,
                                            device="cpu", out=tmp_path / "p.json"), progress=False)
    row = next(r for r in res.rows if r.variant == "1")
    assert (row.p50_ms, row.p90_ms, row.p99_ms) == pytest.approx((50.5, 90.1, 99.01))
    assert (row.device_p50_ms, row.device_p90_ms, row.device_p99_ms) == pytest.approx((5.05, 9.01, 9.901))
    assert row.throughput == pytest.approx(1e3 * 2 / 50.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA (scripts/gpu_check.sh runs it on the GPU)")
def test_cuda_device_time_is_measured_on_the_stream_not_on_the_host():
    """On CUDA, host time is end to end (64 MiB pinned batch copied in, logits copied back) and device time spans
    only the call on the stream. A call that does nothing on a big batch: device ~0, host = the copy; a call
    that keeps the GPU busy ~20 ms: device ~20 ms."""
    from fmkt.bench import Runner, time_interleaved

    class Idle(Runner):
        def run(self, x):
            return x[:1, :1]

    class Busy(Runner):
        def run(self, x):
            torch.cuda._sleep(cycles)
            return x[:1, :1]

    def gpu_ms(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(n)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    gpu_ms(1_000_000)  # warm
    cycles = int(10_000_000 * 20.0 / gpu_ms(10_000_000))  # ~20 ms of GPU time
    expected = sorted(gpu_ms(cycles) for _ in range(3))[1]
    images = torch.rand(64, 1024, 256)  # 64 MiB
    res = time_interleaved({"idle": Idle(), "busy": Busy()}, images, torch.device("cuda"), warmup=2, iters=10)
    idle, busy = res["idle"], res["busy"]
    assert idle.error is None and busy.error is None
    assert percentiles(idle.device)[0] < 0.25 * percentiles(idle.host)[0], (idle.device, idle.host)
    assert 0.8 * expected < percentiles(busy.device)[0] < 1.25 * expected, (expected, busy.device)
    assert percentiles(busy.host)[0] > percentiles(busy.device)[0]
