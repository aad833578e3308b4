"""Crash and resume: SIGKILL mid-epoch then --resume equals an uninterrupted run; a non-finite loss keeps the
last good checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from fmkt.cli.app import app

# 480 images / 32 = 15 steps per epoch, a checkpoint every 2 steps; one thread keeps CPU results bit-identical
ARGS = ["distill", "--student", "resnet8", "--epochs", "3", "--batch-size", "32", "--eval-steps", "1,2",
        "--set", "data.train_subset=480", "--set", "data.test_subset=96", "--set", "teacher.arch=resnet8",
        "--set", "teacher.epochs=1", "--set", "method.train_steps=2", "--set", "train.threads=1",
        "--set", "train.checkpoint_every_steps=2"]
TIMING = ("epoch_seconds", "images_per_s")


def cli(*args):
    return [sys.executable, "-m", "fmkt.cli", *map(str, args)]


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def read_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return None


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}  # wide: rich wraps no path
    full = tmp_path / "full"
    done = subprocess.run(cli(*ARGS, "--out", full), capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "crash"
    proc = subprocess.Popen(cli(*ARGS, "--out", out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    ckpt_path, seen = out / "checkpoint.pt", None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt_path.is_file():
                ckpt = read_checkpoint(ckpt_path)
                # kill in the second epoch, right after a mid-epoch (every-2-steps) checkpoint
                if ckpt is not None and ckpt["epoch"] == 1 and ckpt["step_in_epoch"] > 0:
                    os.kill(proc.pid, signal.SIGKILL)
                    seen = ckpt["step_in_epoch"]
                    break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and seen is None:
            proc.kill()
        proc.wait(timeout=30)
    assert seen is not None, f"no mid-epoch checkpoint before the run ended: {proc.stderr.read()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "artifact").exists()
    assert len(metrics(out)) == 1  # epoch 1 finished, epoch 2 was cut
    ckpt = read_checkpoint(ckpt_path)
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] >= seen  # intact: atomic writes leave no torn file

    resumed = subprocess.run(cli(*ARGS, "--out", out, "--resume"), capture_output=True, text=True, env=env,
                             timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {ckpt_path}: epoch 2, step {ckpt['step_in_epoch']}" in resumed.stderr
    assert metrics(out) == metrics(full)  # every epoch: losses, lr and top-1 per K, exactly
    a = json.loads((full / "artifact" / "fmkt.json").read_text())
    b = json.loads((out / "artifact" / "fmkt.json").read_text())
    assert a["weights_sha256"] == b["weights_sha256"]  # bit-identical students
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import fmkt.engine as engine

    runner = CliRunner()
    args = [a.replace("480", "192") for a in ARGS]  # 6 steps per epoch
    out = tmp_path / "nan"
    real_build = engine.build_distiller
    calls = {"n": 0}

    def poisoned(*a, **k):
        distiller = real_build(*a, **k)
        if distiller.teacher is None:  # the default teacher's own training: leave it alone
            return distiller
        forward = distiller.forward_train

        def forward_train(images, labels, progress=0.0):
            calls["n"] += 1
            logits, losses = forward(images, labels, progress)
            if calls["n"] == 6 + 3:  # epoch 2, step 3
                losses["loss_ce"] = losses["loss_ce"] * float("nan")
            return logits, losses

        distiller.forward_train = forward_train
        return distiller

    monkeypatch.setattr(engine, "build_distiller", poisoned)
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "the loss became nan at epoch 2, step 3; stopped." in message
    assert f"The last good checkpoint is {out / 'checkpoint.pt'}" in message
    assert "Traceback" not in result.output
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 2)  # the step-2 checkpoint, not overwritten
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "artifact").exists()
    assert len(metrics(out)) == 1

    monkeypatch.setattr(engine, "build_distiller", real_build)
    again = runner.invoke(app, [*args, "--out", str(out), "--resume"])
    assert again.exit_code == 0, again.output
    assert [m["epoch"] for m in metrics(out)] == [1, 2, 3]
    assert (out / "artifact" / "fmkt.json").is_file()


def test_non_finite_loss_from_a_huge_lr_stops_cleanly(tmp_path):
    out = tmp_path / "lr"
    result = CliRunner().invoke(app, [*[a.replace("480", "192") for a in ARGS], "--out", str(out),
                                      "--set", "optim.lr=1e12"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "the loss became" in message and "at epoch" in message and ", step " in message
    assert not (out / "artifact").exists()


@pytest.mark.parametrize("change,key", [(["--student", "resnet14"], "student"),
                                        (["--method", "kd"], "method.name"),
                                        (["--set", "data.train_subset=96"], "data.train_subset")])
def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path, change, key):
    runner = CliRunner()
    args = ["distill", "--student", "resnet8", "--epochs", "1", "--batch-size", "32", "--set", "data.train_subset=64",
            "--set", "data.test_subset=32", "--set", "teacher.arch=resnet8", "--set", "teacher.epochs=1",
            "--set", "method.train_steps=2", "--out", str(tmp_path / "r")]
    assert runner.invoke(app, args).exit_code == 0
    before = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    result = runner.invoke(app, [*args, *change, "--resume"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "--resume refused: the configuration differs from the checkpoint's in" in message
    assert key in message.split("checkpoint's in")[1]
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == before


def test_a_killed_writers_temporary_file_is_cleared_on_resume(tmp_path):
    """SIGKILL can land while a checkpoint is being written: the temporary file it leaves is never read (the
    rename did not happen) and the next run in that folder removes it."""
    from fmkt.files import remove_stale_temporaries

    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"torn")
    (tmp_path / "checkpoint.pt").write_bytes(b"kept")
    (tmp_path / ".hidden-but-ours-not").write_text("kept")
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".checkpoint.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-but-ours-not", "checkpoint.pt"]


def test_a_checkpoint_older_than_a_config_key_still_resumes():
    """A checkpoint written before a config key existed lacks it: the key counts as its default, so the resume is
    not refused, while a real change still is."""
    from fmkt.checkpoint import config_diff
    from fmkt.config import Config

    new = Config().to_dict()
    old = Config().to_dict()
    del old["method"]["logit_standardization"], old["data"]["holdout"], old["train"]["fast_path"]
    assert config_diff(old, new) == []
    new["method"]["logit_standardization"] = True
    assert config_diff(old, new) == ["method.logit_standardization"]
