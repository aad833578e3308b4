"""The CLI end to end on tiny settings: train, distill (each method), eval, resume, info, errors."""
import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from fmkt.cli.app import app
from fmkt.names import ENCODER_NAMES, LOSS_NAMES, METHOD_NAMES, SCHEDULE_NAMES

runner = CliRunner()
TINY = ["--set", "data.train_subset=96", "--set", "data.test_subset=48", "--batch-size", "32",
        "--set", "teacher.arch=resnet8", "--set", "teacher.epochs=1", "--set", "method.train_steps=2"]


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_help_is_fast_and_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for cmd in ("train", "distill", "eval", "info"):
        assert cmd in result.output


def test_distill_help_names_the_choices_without_importing_torch():
    """A user reads --help first: `fmkt-cli distill --help` names every method, loss, encoder and schedule (fmkt.names,
    held equal to the registries by tests/test_registries.py), and prints them without importing torch."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom fmkt.cli.app import app\n"
            "result = CliRunner().invoke(app, ['distill', '--help'])\nprint(result.output)\n"
            "print('torch imported:', 'torch' in sys.modules)\nsys.exit(result.exit_code)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch imported: False" in proc.stdout
    text = " ".join(proc.stdout.replace("\u2502", " ").split())  # the help's box border out, its wrapping undone
    for option, names in [("--method", METHOD_NAMES), ("--loss", LOSS_NAMES), ("--encoder", ENCODER_NAMES),
                          ("--schedule", SCHEDULE_NAMES)]:
        assert option in text and " | ".join(names) in text, (option, text)


def test_train_writes_artifact_metrics_and_config(tmp_path):
    out = tmp_path / "t"
    result = invoke("train", "--model", "resnet8", "--data", "digits", "--epochs", 2, "--out", out, *TINY[:6])
    assert result.exit_code == 0, result.output
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert 0.0 <= metrics[-1]["top1"]["plain"] <= 100.0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["student"] == "resnet8" and cfg["method"]["name"] == "none"
    meta = json.loads((out / "artifact" / "fmkt.json").read_text())
    assert meta["method"] == "none" and meta["model"]["encoder"] is None
    assert meta["metrics"]["last"]["plain"] == pytest.approx(metrics[-1]["top1"]["plain"])
    assert f"{metrics[-1]['top1']['plain']:.2f}" in result.output
    assert (out / "checkpoint.pt").is_file()


@pytest.mark.parametrize("method", ["fmkt", "theta", "ofmkt", "kd", "dkd", "dist", "none"])
def test_distill_each_method(tmp_path, method):
    out = tmp_path / method
    result = invoke("distill", "--method", method, "--student", "resnet8", "--epochs", 1, "--eval-steps", "1,2",
                    "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "artifact" / "fmkt.json").read_text())
    assert meta["method"] == method
    last = meta["metrics"]["last"]
    if method in ("fmkt", "theta", "ofmkt"):
        assert set(last) == ({"1", "2", "0"} if method == "theta" else {"1", "2"})
        assert meta["model"]["encoder"] == "conv"
    else:
        assert set(last) == {"plain"}
    if method in ("fmkt", "theta", "kd", "dkd", "dist"):
        assert len(meta["teacher"]["sha256"]) == 64
        assert "teacher" in result.output
    else:
        assert meta["teacher"] is None
    # the artifact never holds the teacher
    from safetensors import safe_open

    with safe_open(str(out / "artifact" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("teacher") for k in f.keys())
    assert f"{list(last.values())[0]:.2f}" in result.output


def test_distill_options_reach_the_config(tmp_path):
    out = tmp_path / "o"
    result = invoke("distill", "--method", "fmkt", "--loss", "kd", "--encoder", "mlp", "--schedule", "vp",
                    "--train-steps", "1,2", "--eval-steps", "1,3", "--dirac-ratio", "0.5", "--lr", "0.02",
                    "--seed", 3, "--epochs", 1, "--out", out, *TINY[:-2])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    m = cfg["method"]
    assert (m["loss"], m["encoder"], m["schedule"], m["train_steps"], m["eval_steps"], m["dirac_ratio"]) == \
        ("kd", "mlp", "vp", "1,2", [1, 3], 0.5)
    assert cfg["optim"]["lr"] == 0.02 and cfg["train"]["seed"] == 3


def test_teacher_is_cached_between_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FMKT_CACHE", str(tmp_path / "cache"))
    first = invoke("distill", "--epochs", 1, "--out", tmp_path / "a", *TINY)
    assert first.exit_code == 0 and "training resnet8" in first.output
    second = invoke("distill", "--epochs", 1, "--out", tmp_path / "b", *TINY)
    assert second.exit_code == 0 and "reusing resnet8" in second.output


def test_eval_artifact_at_several_k(tmp_path):
    out = tmp_path / "th"
    assert invoke("distill", "--method", "theta", "--epochs", 1, "--out", out, *TINY).exit_code == 0
    result = invoke("eval", out / "artifact", "--steps", "0,1,2,4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data["top1"]) == {"0", "1", "2", "4"} and data["images"] == 360
    table = invoke("eval", out / "artifact", "--steps", "1")
    assert table.exit_code == 0 and "K=1" in table.output


def test_eval_says_why_a_requested_k_was_not_evaluated(tmp_path):
    """K=0 is the theta head: on an fmkt artifact a requested K=0 is named with the reason, not dropped."""
    out = tmp_path / "fm"
    assert invoke("distill", "--method", "fmkt", "--epochs", 1, "--out", out, *TINY).exit_code == 0
    result = invoke("eval", out / "artifact", "--steps", "0,4")
    assert result.exit_code == 0, result.output
    assert "K=4" in result.output and "theta (K=0) was not evaluated" in result.output
    assert "trained with method fmkt" in " ".join(result.output.split())
    data = json.loads(invoke("eval", out / "artifact", "--steps", "0,4", "--json").output)
    assert set(data["top1"]) == {"4"} and set(data["skipped"]) == {"0"} and data["precision"].startswith("fp32")
    quiet = invoke("eval", out / "artifact")  # the default list: what the artifact can run, without notes
    assert quiet.exit_code == 0 and "not evaluated" not in quiet.output and "K=8" in quiet.output
    meta = json.loads((out / "artifact" / "fmkt.json").read_text())
    assert meta["metrics"]["precision"].startswith("fp32") and meta["model"]["default_steps"] == 2


def test_holdout_evaluates_on_training_images_and_says_so(tmp_path):
    """data.holdout (model selection without the test split): the run evaluates on held-out training images and
    fmkt.json says what its metrics were measured on."""
    out = tmp_path / "ho"
    result = invoke("distill", "--epochs", 1, "--out", out, *TINY, "--set", "data.holdout=40")
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "artifact" / "fmkt.json").read_text())
    metrics, teacher = meta["metrics"], meta["teacher"]
    assert metrics["split"].startswith("40 training images held out") and "not the test split" in metrics["split"]
    # the teacher is scored on the student's 40 held-out images (not the 48 test images), and fmkt.json says so
    assert teacher["split"] == metrics["split"] and teacher["images_evaluated"] == metrics["images_evaluated"] == 40
    from fmkt.artifact import load_artifact
    from fmkt.config import build_config
    from fmkt.engine import load_data
    from fmkt.evaluation import evaluate

    held_out = load_data(build_config(str(out / "config.yaml")))[1]
    model, _ = load_artifact(teacher["source"])
    assert teacher["accuracy"] == evaluate(model, held_out, ["plain"], 256, "cpu")["plain"]
    default = invoke("distill", "--epochs", 1, "--out", tmp_path / "d", *TINY)
    meta = json.loads((tmp_path / "d" / "artifact" / "fmkt.json").read_text())
    assert meta["metrics"]["split"] == meta["teacher"]["split"] == "test (48-image subset)"
    assert meta["metrics"]["images_evaluated"] == meta["teacher"]["images_evaluated"] == 48
    assert "images_unreadable" not in meta["metrics"]  # in-memory data: nothing is left out
    assert default.exit_code == 0


def test_nonfinite_loss_names_the_cause(tmp_path, monkeypatch):
    """A NaN loss before any weight update cannot come from the learning rate: the sentence says so (VP +
    feature transfer used to end here with "try a lower --lr")."""
    from fmkt.engine import nonfinite_loss

    first = str(nonfinite_loss(float("nan"), 0, 0, updated=False))
    assert "before any weight update" in first and "learning rate is not the cause" in first
    assert "--lr" not in first
    later = str(nonfinite_loss(float("inf"), 2, 9, updated=True, last_good="runs/x/checkpoint.pt"))
    assert "epoch 3, step 10" in later and "try a lower --lr" in later and "runs/x/checkpoint.pt" in later
    import fmkt.distillers.flow as fm

    monkeypatch.setattr(fm.FMKTDistiller, "forward_train",
                        lambda self, images, labels, progress=0.0: (None, {"loss_kd": images.sum() * float("nan")}))
    result = invoke("distill", "--epochs", 1, "--out", tmp_path / "nan", *TINY)
    assert result.exit_code == 2 and "before any weight update" in result.output


def test_resume_after_interruption_matches_uninterrupted(tmp_path, monkeypatch):
    args = ["distill", "--epochs", 2, *TINY]
    full = invoke(*args, "--out", tmp_path / "full")
    assert full.exit_code == 0, full.output

    import fmkt.engine as engine

    real_evaluate = engine.evaluate
    calls = {"n": 0}

    def crash_on_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(engine, "evaluate", crash_on_second_epoch)
    broken = invoke(*args, "--out", tmp_path / "res")
    assert broken.exit_code == 130
    assert len(read_metrics(tmp_path / "res")) == 1
    monkeypatch.setattr(engine, "evaluate", real_evaluate)
    resumed = invoke(*args, "--out", tmp_path / "res", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "res")
    assert [m["epoch"] for m in b] == [1, 2]
    assert a[-1]["top1"] == b[-1]["top1"]
    assert a[-1]["train_loss"] == pytest.approx(b[-1]["train_loss"], rel=1e-6)


def test_resume_refuses_changed_config(tmp_path):
    out = tmp_path / "r"
    assert invoke("distill", "--epochs", 1, "--out", out, *TINY).exit_code == 0
    result = invoke("distill", "--epochs", 1, "--out", out, "--resume", "--student", "resnet14", *TINY)
    assert result.exit_code == 2
    assert "student" in result.output and "differs" in result.output


@pytest.mark.parametrize("args,match", [
    (["distill", "--student", "resnet9"], "unknown model"),
    (["distill", "--loss", "ce"], "unknown loss"),
    (["distill", "--encoder", "lstm"], "unknown encoder"),
    (["distill", "--schedule", "cosine"], "unknown schedule"),
    (["distill", "--method", "magic"], "unknown method"),
    (["distill", "--eval-steps", ""], "empty"),
    (["distill", "--eval-steps", "1,-2"], ">= 0"),
    (["distill", "--set", "optim.lrr=1"], "unknown config key"),
    (["distill", "--teacher", "/no/such/teacher.pt"], "does not exist"),
    (["distill", "--data", "fashion-mnist", "--data-dir", "/no/such/dir"], "/no/such/dir"),
    (["distill", "--resume", "--out", "/tmp/fmkt-no-such-run-dir"], "does not exist"),
    (["eval", "/no/such/artifact"], "does not exist"),
    (["distill", "--config", "/no/such.yaml"], "does not exist"),
])
def test_bad_input_is_one_sentence_exit_2(args, match):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert "Traceback" not in result.output


def test_info_lists_versions_and_models():
    result = invoke("info", "--models")
    assert result.exit_code == 0, result.output
    for word in ("torch", "onnxruntime", "tensorrt", "resnet32x4", "rectified", "transformer", "digits"):
        assert word in result.output
