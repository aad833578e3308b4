"""Every number fmkt prints or stores, against an independent computation, in a case where a wrong one shows.

- top-1 per K (``evaluate``, ``fmkt-cli eval``'s table and JSON, fmkt.json's last/best, distill's table): a flow
  student whose K-step predictions really differ, labels chosen so every K (and theta, K=0) has its own top-1,
  the reference taken image by image from the model's own per-K logits;
- the epoch losses of metrics.jsonl: the mean of the per-step losses, by hand;
- bench's latency: a fake clock with known call times (ms, not s), skewed samples (mean != p50) that differ per
  K, batch > 1 (images/s per image, not per batch): the JSON, the CSV, the printed and Markdown tables, and
  benchmarks/latency.py's target lines;
- the export parity report's sentence and table.
scripts/mutation_check.py (block "every number fmkt prints or stores") plants one bug per number here.
"""
import csv
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from fmkt.artifact import save_artifact
from fmkt.cli.app import app
from fmkt.data import ImageTensors
from fmkt.evaluation import eval_keys, evaluate
from fmkt.student import StudentSpec, build_student, spec_of

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
runner = CliRunner()
DATA = "test_numbers:designed_split"  # the import path of this file's data factory (tests/ is put on sys.path)


@pytest.fixture
def here_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def wide_console(monkeypatch):
    """The CLI's stdout console, wide enough that rich wraps no cell."""
    import fmkt.cli.app as cli_app

    monkeypatch.setattr(cli_app, "out_console", Console(width=250))


def table_value(output: str, label: str, column: int = 1) -> str:
    """The cell ``column`` (0 = the label) of the rich-table row whose first cell is ``label``."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if cells and cells[0] == label:
            return cells[column]
    raise AssertionError(f"no row {label!r} in:\n{output}")


# ------------------------------------------------------------------------------------------------ top-1 per K
KEYS = ["1", "2", "4", "0"]  # eval_keys' order for steps 1, 2, 4 on a model with a theta head


def flow_student():
    """resnet8 (1x8x8, 10 classes) with a conv meta-encoder and a theta head, seeded; the encoder's weights are
    scaled up so each K predicts other classes for many images (an untrained encoder barely moves Z1)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_student(StudentSpec(arch="resnet8", num_classes=10, channels=1, size=(8, 8), mean=(0.3,),
                                          std=(0.4,), encoder="conv", theta_head=True))
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.mul_(3.0)
    return model.eval()


def designed_images(n=50):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def reference_predictions(model, images) -> dict:
    """{key: predicted classes}, one image at a time: K >= 1 from the model's own K-step forward, theta (K=0) by
    hand (its head on the pooled feature map)."""
    preds = {}
    for k in KEYS:
        out = []
        for x in images.split(1):
            if k == "0":
                out.append(model.theta_head(model.features(x).mean(dim=(2, 3))))
            else:
                out.append(model(x, steps=int(k)))
        preds[k] = torch.cat(out).argmax(1)
    return preds


def designed_labels(preds) -> torch.Tensor:
    """Image i is labelled with the class one key predicts for it, the keys taking 24, 4, 14 and 8 of the 50
    images, so the accuracies come out different, and not in the order of K (checked by the tests)."""
    owner = ["0"] * 24 + ["1"] * 4 + ["2"] * 14 + ["4"] * 8
    return torch.stack([preds[k][i] for i, k in enumerate(owner)])


def expected_top1(preds, labels) -> dict:
    return {k: 100.0 * int((preds[k] == labels).sum()) / len(labels) for k in KEYS}


class _Named(TensorDataset):
    classes = [str(i) for i in range(10)]


def designed_split():
    """A data factory (``--data test_numbers:designed_split``): the designed images and labels, both splits."""
    model = flow_student()
    images = designed_images()
    ds = _Named(images, designed_labels(reference_predictions(model, images)))
    return ds, ds


@pytest.fixture(scope="module")
def designed():
    model = flow_student()
    images = designed_images()
    preds = reference_predictions(model, images)
    labels = designed_labels(preds)
    expected = expected_top1(preds, labels)
    values = [expected[k] for k in ["0", "1", "2", "4"]]
    assert len(set(values)) == len(KEYS) and values != sorted(values) and values != sorted(values, reverse=True), \
        f"the case must give every K its own top-1, not in the order of K: {expected}"
    return SimpleNamespace(model=model, images=images, labels=labels, expected=expected)


@pytest.mark.parametrize("batch", [16, 50])
def test_evaluate_gives_each_k_its_own_top1(designed, batch):
    """50 images in batches of 16 (the last batch holds 2) or one batch: each key's top-1 % is its own, exactly
    the fraction of images its own logits get right, whatever the batching."""
    keys = eval_keys(designed.model, [1, 2, 4])
    assert keys == KEYS  # theta (K=0) is added for a model with a theta head
    got = evaluate(designed.model, ImageTensors(designed.images, designed.labels), keys, batch, torch.device("cpu"))
    assert list(got) == KEYS
    assert got == designed.expected


def test_eval_cli_prints_and_returns_each_k_top1(designed, tmp_path, monkeypatch, here_on_path):
    """`fmkt-cli eval`: --json's top1 and the printed table, K by K, on the designed split (50 images)."""
    model = designed.model
    art = save_artifact(tmp_path / "art", model, spec_of(model).to_json(),
                        {"method": "theta", "dataset": {"name": DATA, "num_classes": 10}, "metrics": {}})
    result = runner.invoke(app, ["eval", str(art), "--steps", "0,1,2,4", "--batch-size", "16", "--device", "cpu",
                                 "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["images"] == 50 and data["dataset"] == DATA
    assert data["top1"] == {k: designed.expected[k] for k in ["0", "1", "2", "4"]}
    wide_console(monkeypatch)
    table = runner.invoke(app, ["eval", str(art), "--steps", "0,1,2,4", "--batch-size", "16", "--device", "cpu"])
    assert table.exit_code == 0, table.output
    assert "50 test images" in table.output
    for k, label in [("0", "theta (K=0)"), ("1", "K=1"), ("2", "K=2"), ("4", "K=4")]:
        assert table_value(table.output, label) == f"{designed.expected[k]:.2f}", (label, table.output)


# ------------------------------------------------------------------------------------------------ a distill run
# 128 images / 32 = 4 steps an epoch; lr 0.2 makes theta's top-1 fall in the last epoch, so best != last for it
DISTILL = ["distill", "--method", "theta", "--student", "resnet8", "--epochs", "3", "--batch-size", "32",
           "--eval-steps", "1,2,4", "--lr", "0.2", "--set", "data.train_subset=128", "--set", "data.test_subset=48",
           "--set", "teacher.arch=resnet8", "--set", "teacher.epochs=1", "--set", "method.train_steps=2",
           "--set", "train.threads=1"]


@torch.no_grad()
def per_image_top1(model, images, labels, keys) -> dict:
    """Top-1 % per key, one image at a time through the model's own forward (K=0: its theta head)."""
    out = {}
    for k in keys:
        pred = torch.cat([model(x) if k == "plain" else model(x, steps=int(k)) for x in images.split(1)]).argmax(1)
        out[k] = 100.0 * int((pred == labels).sum()) / len(labels)
    return out


def test_distill_stores_and_prints_top1_per_k_and_the_epoch_losses(tmp_path, monkeypatch):
    """fmkt.json's metrics (last: the artifact's own per-K top-1 on the test subset, recomputed here; best: the
    maximum over the epochs of metrics.jsonl), the teacher's accuracy, the printed last/best table, and each
    epoch's losses in metrics.jsonl (the mean over the epoch's steps of what each step returned)."""
    import fmkt.engine as engine
    from fmkt.artifact import load_artifact
    from fmkt.data import load_dataset

    steps = []
    real = engine.build_distiller

    def recording(*a, **k):  # every training step's losses, as the distiller returns them
        distiller = real(*a, **k)
        if distiller.teacher is None:  # the default teacher's own training
            return distiller
        forward = distiller.forward_train

        def forward_train(*args, **kwargs):
            logits, losses = forward(*args, **kwargs)
            steps.append({name: float(v.detach()) for name, v in losses.items()})
            return logits, losses

        distiller.forward_train = forward_train
        return distiller

    monkeypatch.setattr(engine, "build_distiller", recording)
    threads = torch.get_num_threads()
    wide_console(monkeypatch)
    out = tmp_path / "d"
    try:
        result = runner.invoke(app, [*DISTILL, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((out / "artifact" / "fmkt.json").read_text())
    keys = ["1", "2", "4", "0"]

    # the epoch losses: per epoch, the mean of the 4 steps' losses, and train_loss their sum
    assert len(steps) == 12
    for epoch, record in enumerate(history):
        mine = steps[4 * epoch:4 * epoch + 4]
        for name in ("loss_ce", "loss_kd", "loss_theta"):
            assert record[name] == pytest.approx(sum(s[name] for s in mine) / 4, rel=1e-9, abs=0), (epoch, name)
        assert record["train_loss"] == pytest.approx(sum(sum(s.values()) for s in mine) / 4, rel=1e-9, abs=0)

    # top-1 per K: the artifact recomputed image by image; best over the epochs
    model, _ = load_artifact(out / "artifact")
    _, test, _ = load_dataset("digits")
    test = test.subset(48, seed=0)
    last = per_image_top1(model, test.images, test.labels, keys)
    assert meta["metrics"]["last"] == last == history[-1]["top1"]
    best = {k: max(h["top1"][k] for h in history) for k in keys}
    assert meta["metrics"]["best"] == best
    assert best != last, "the case must have an epoch better than the last for some K"

    # the teacher's accuracy: its artifact recomputed on the same 48 images
    teacher, _ = load_artifact(meta["teacher"]["source"])
    assert meta["teacher"]["accuracy"] == per_image_top1(teacher, test.images, test.labels, ["plain"])["plain"]

    # the printed table: last and best per K, the teacher's accuracy
    for k, label in [("1", "K=1"), ("2", "K=2"), ("4", "K=4"), ("0", "theta (K=0)")]:
        row = f"student {label}"
        assert table_value(result.output, row, 1) == f"{last[k]:.2f}", result.output
        assert table_value(result.output, row, 2) == f"{best[k]:.2f}", result.output
    assert table_value(result.output, "teacher (resnet8)", 1) == f"{meta['teacher']['accuracy']:.2f}"


# ------------------------------------------------------------------------------------------------ latency
class FakeClock:
    """time.perf_counter for bench.timing: it moves only when a runner runs."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


def test_time_interleaved_reports_each_calls_time_in_ms(monkeypatch):
    """bench's timing loop on a fake clock: every timed call of every variant, in ms, in call order; the prepare
    call and the warm-up calls (1 s each here) are not among them."""
    import fmkt.bench.timing as timing
    from fmkt.bench import Runner, time_interleaved

    clock = FakeClock()
    monkeypatch.setattr(timing, "time", clock)

    class Timed(Runner):
        def __init__(self, seconds):
            self.seconds, self.calls = list(seconds), 0

        def run(self, x):
            self.calls += 1
            clock.now += 1.0 if self.calls <= 3 else self.seconds[self.calls - 4]  # 1 prepare + 2 warm-up
            return x

    fast, slow = [0.001, 0.003, 0.002], [0.25, 0.125, 0.5]
    res = time_interleaved({"fast": Timed(fast), "slow": Timed(slow)}, torch.zeros(2, 1), torch.device("cpu"),
                           warmup=2, iters=3)
    assert res["fast"].host == pytest.approx([1.0, 3.0, 2.0], rel=1e-9)
    assert res["slow"].host == pytest.approx([250.0, 125.0, 500.0], rel=1e-9)
    assert res["fast"].error is None and not res["fast"].device  # CPU: no device time


# host samples (ms) of every variant: base x these (unsorted; mean 2.0 x base, p50 1.0, p90 2.8, p99 9.28 x base,
# by hand: linear interpolation between order statistics, positions 4.5, 8.1 and 8.91 of 0..9)
SHAPE = [10.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
BASE = {"student": 1.0, "0": 1.25, "1": 2.5, "2": 4.0}
LAST = {"0": 80.0, "1": 81.5, "2": 82.25}
BEST = {"0": 90.0, "1": 91.5, "2": 92.25}  # not what bench shows: it shows the last epoch's top-1


def expected_row(variant, batch):
    base = BASE[variant] * batch  # batch 4 takes 4x as long: the same images/s at both batches
    p50, p90, p99, mean = 1.0 * base, 2.8 * base, 9.28 * base, 2.0 * base
    return dict(p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=mean, throughput=1e3 * batch / mean,
                x_student=BASE[variant] / BASE["student"], top1=LAST.get(variant))


def no_plot(rows, info):
    from fmkt.bench import Unavailable

    raise Unavailable("not drawn in this test")


@pytest.fixture
def fake_bench(tmp_path, monkeypatch):
    """A theta artifact and bench's timing loop replaced by the SHAPE samples above."""
    import fmkt.bench as bench
    import fmkt.bench.report as report
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_student(StudentSpec(arch="resnet8", num_classes=10, channels=1, size=(8, 8), mean=(0.5,),
                                          std=(0.25,), encoder="conv", theta_head=True))
    art = save_artifact(tmp_path / "artifact", model, spec_of(model).to_json(),
                        {"method": "theta", "dataset": {"name": "synthetic", "num_classes": 10},
                         "metrics": {"last": LAST, "best": BEST}})

    def fake(runners, images, device, warmup, iters):
        out = {}
        for variant, r in runners.items():
            t = bench.Timed(r)
            t.host = [s * BASE[variant] * images.shape[0] for s in SHAPE]
            out[variant] = t
        return out

    monkeypatch.setattr(bench, "time_interleaved", fake)
    monkeypatch.setattr(report, "plot_bytes", no_plot)  # the PNG is not a number (and matplotlib is slow to load)
    return art


def test_bench_json_csv_and_tables_hold_the_measured_numbers(fake_bench, tmp_path, monkeypatch):
    """`fmkt-cli bench` with known samples: p50/p90/p99 and mean in ms, images/s = batch / mean, x student
    (p50 over the student's p50), the artifact's last top-1 per K: in the JSON, the CSV, the printed table and
    the Markdown table of BENCHMARKS.md."""
    from fmkt.bench import Row, markdown_table

    wide_console(monkeypatch)
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench", str(fake_bench), "--backends", "eager", "--batch", "1,4",
                                 "--steps", "0,1,2", "--iters", "10", "--warmup", "0", "--device", "cpu",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    rows = {(r["variant"], r["batch"]): r for r in doc["rows"]}
    assert set(rows) == {(v, b) for v in BASE for b in (1, 4)}
    with open(out.with_suffix(".csv")) as f:
        table = {(r["variant"], int(r["batch"])): r for r in csv.DictReader(f)}
    for (variant, batch), row in rows.items():
        want = expected_row(variant, batch)
        for key, value in want.items():
            if value is None:
                assert row[key] is None and table[(variant, batch)][key] == "", (variant, batch, key)
                continue
            assert row[key] == pytest.approx(value, rel=1e-6), (variant, batch, key, row)
            assert float(table[(variant, batch)][key]) == pytest.approx(value, rel=1e-6), (variant, batch, key)
        label = {"student": "student", "0": "theta (K=0)"}.get(variant, f"K={variant}")
        cells = [f"{want['p50_ms']:.3f}", f"{want['p90_ms']:.3f}", f"{want['p99_ms']:.3f}",
                 f"{want['throughput']:,.0f}", f"{want['x_student']:.2f}x",
                 "" if want["top1"] is None else f"{want['top1']:.2f}"]
        printed = next([c.strip() for c in re.split(r"[│┃]", line)[1:-1]] for line in result.output.splitlines()
                       if re.search(rf"│ eager\s+│ fp32\s+│\s+{batch} │ {re.escape(label)}\s+│", line))
        assert printed[4:] == cells, (variant, batch, printed)
        md = markdown_table([Row(**{k: v for k, v in row.items() if k != "label"})])
        assert md.splitlines()[2] == f"| eager | fp32 | {batch} | {label} | " + " | ".join(cells) + " |"


def test_latency_script_target_lines(monkeypatch):
    """benchmarks/latency.py's target checks from hand-made rows: the K-step overhead (x student), met or not
    against 1.3x, and the ONNX Runtime speed-up over eager (eager p50 / ORT p50) against 1.5x."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.latency import targets
    from fmkt.bench import Row

    rows = [Row("eager", "fp32", 1, "4", "ok", p50_ms=3.0, x_student=1.25),
            Row("eager", "fp32", 64, "4", "ok", p50_ms=40.0, x_student=1.4),
            Row("eager", "fp32", 1, "0", "ok", p50_ms=2.5, x_student=1.04),
            Row("onnxruntime", "fp32", 1, "4", "ok", p50_ms=1.5, x_student=1.3)]
    assert targets(rows, "cpu") == [
        "K=4 overhead, eager fp32, batch 1: 1.25x the student alone (target <= 1.3x: met)",
        "theta (K=0) overhead, eager fp32, batch 1: 1.04x (target 1.0x)",
        "K=4 overhead, eager fp32, batch 64: 1.40x the student alone (target <= 1.3x: NOT met)",
        "K=4 overhead, onnxruntime fp32, batch 1: 1.30x the student alone (target <= 1.3x: met)",
        "ONNX Runtime CPU vs eager, K=4, batch 1: 2.00x (target >= 1.5x: met)",
    ]


# ------------------------------------------------------------------------------------------------ export parity
def test_parity_rows_sentence_and_table_carry_the_measured_numbers():
    """check_parity on logits perturbed by known amounts (exact in fp32): each row's max abs diff and top-1
    agreement at batches 1, 4 and 8, parity.json's rows, the breach sentence and the printed table."""
    from fmkt.export.parity import check_parity

    reference = torch.eye(5)[torch.arange(8) % 5] * 4.0  # image i: class i % 5
    reference[5, 2] = reference[6, 3] = 4.0 - 2 ** -7  # near ties: a small change moves these two argmaxes
    exported = reference.clone()
    exported[0, 1] += 2 ** -9
    exported[3, 4] += 2 ** -8  # only in batches of 4 and more
    exported[5, 2] += 2 ** -6
    exported[6, 3] += 2 ** -6  # images 5 and 6 now vote for another class
    report = check_parity(lambda x: reference[:len(x)], lambda x: exported[:len(x)], torch.zeros(8, 1), [8, 1, 4],
                          "fp16", "test target", "test data")
    assert [(r.batch, r.max_abs_diff, r.top1_agreement, r.passed) for r in report.rows] == [
        (1, 2 ** -9, 1.0, True), (4, 2 ** -8, 1.0, True), (8, 2 ** -6, 0.75, False)]
    assert report.to_dict()["rows"][2] == {"batch": 8, "max_abs_diff": 2 ** -6, "top1_agreement": 0.75,
                                           "passed": False}
    assert report.breach() == ("test target (fp16) fails parity at batch 8: max abs diff 0.0156 exceeds the 0.01 "
                               "gate by 0.00562 and top-1 agreement 75.00 % is 24.00 points under the 99 % gate")
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(report.table())
    text = console.export_text()
    assert [table_value(text, str(b), 1) for b in (1, 4, 8)] == ["1.953e-03", "3.906e-03", "1.562e-02"]
    assert [table_value(text, str(b), 2) for b in (1, 4, 8)] == ["100.00", "100.00", "75.00"]
