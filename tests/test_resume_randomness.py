"""Resume equals uninterrupted under every source of randomness a distill run draws from, interrupted mid-epoch
(right after a lost step) and at an epoch boundary: the same metrics.jsonl (losses, lr, top-1 per K) and
bit-identical weights.

Sources: the loader's augmentation (digits: random crop, from the loader's own generator), the Dirac ratio's
permutation (method.dirac_ratio < 1) and N drawn per iteration (method.train_steps with several values), both
from torch's global generator, dropout in a student (an import-path model; no zoo model uses dropout), Mixup/CutMix
(data.mixup, data.cutmix: timm's draws from a generator seeded per batch, fmkt.mixing); and
the default teacher's training: a run interrupted while its teacher trains reruns to the same teacher and the
same student. The image folder's worker loader is covered by tests/test_imagefolder.py
(test_resume_mid_epoch_matches_an_uninterrupted_run) and SIGKILL by tests/test_resume_crash.py.
"""
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fmkt.cli.app import app

HERE = Path(__file__).resolve().parent
TIMING = ("epoch_seconds", "images_per_s")
# 128 images / 32 = 4 steps an epoch, a checkpoint after step 2 and at the end of each epoch
BASE = ["distill", "--student", "resnet8", "--epochs", "2", "--batch-size", "32", "--eval-steps", "1,2",
        "--set", "data.train_subset=128", "--set", "data.test_subset=48", "--set", "teacher.arch=resnet8",
        "--set", "teacher.epochs=1", "--set", "method.train_steps=2", "--set", "train.threads=1",
        "--set", "train.checkpoint_every_steps=2"]
SOURCES = {
    "augmentation": [],
    "dirac ratio": ["--set", "method.dirac_ratio=0.5"],
    "N drawn per iteration": ["--set", "method.train_steps=1,2,4"],
    "dropout": ["--student", "test_resume_randomness:dropout_cnn"],
    "mixup and cutmix": ["--set", "data.mixup=0.8", "--set", "data.cutmix=1.0"],
}
# (where, the distillation step that raises before it runs (1-based), where the resume starts)
INTERRUPTIONS = [("mid-epoch", 8, "epoch 2, step 2"),  # epoch 2's third step was done, and is lost
                 ("epoch boundary", 6, "epoch 2, step 0")]  # epoch 2's first step was done, and is lost


class DropoutCNN(nn.Module):
    """conv-bn-relu, dropout, conv-bn-relu, pool, linear: a student whose every training step draws a mask."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.body(x)).flatten(1))


def dropout_cnn(num_classes=10, in_channels=1):
    return DropoutCNN(num_classes, in_channels)


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # for test_resume_randomness:dropout_cnn
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # train.threads=1 in an in-process run sets it for the whole process


def invoke(args, out):
    return CliRunner().invoke(app, [*map(str, args), "--out", str(out)])


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights_sha(out):
    return json.loads((out / "artifact" / "fmkt.json").read_text())["weights_sha256"]


def interrupt_at(monkeypatch, call: int, teacher: bool = False):
    """Raise KeyboardInterrupt (what Ctrl-C raises) in the ``call``-th training step of the distillation
    (``teacher``: of the default teacher's own training) of the next run, before its forward pass. Returns the
    function that takes the interruption away."""
    import fmkt.engine as engine

    real, seen = engine.build_distiller, {"n": 0}

    def build(*a, **k):
        distiller = real(*a, **k)
        if (distiller.teacher is None) != teacher:
            return distiller
        forward = distiller.forward_train

        def forward_train(*args, **kwargs):
            seen["n"] += 1
            if seen["n"] == call:
                raise KeyboardInterrupt
            return forward(*args, **kwargs)

        distiller.forward_train = forward_train
        return distiller

    monkeypatch.setattr(engine, "build_distiller", build)
    return lambda: monkeypatch.setattr(engine, "build_distiller", real)


@pytest.mark.parametrize("source", list(SOURCES))
def test_resume_equals_uninterrupted(source, tmp_path, monkeypatch, one_thread):
    args = [*BASE, *SOURCES[source]]
    full = invoke(args, tmp_path / "full")
    assert full.exit_code == 0, full.output
    expected, sha = metrics(tmp_path / "full"), weights_sha(tmp_path / "full")
    assert [m["epoch"] for m in expected] == [1, 2]
    for where, call, start in INTERRUPTIONS:
        out = tmp_path / where.replace(" ", "-")
        restore = interrupt_at(monkeypatch, call)
        broken = invoke(args, out)
        restore()
        assert broken.exit_code == 130, (where, broken.output)
        assert metrics(out) == expected[:1] and not (out / "artifact").exists()
        resumed = invoke([*args, "--resume"], out)
        assert resumed.exit_code == 0, (where, resumed.output)
        assert f"{start}" in " ".join(resumed.output.split()), (where, resumed.output)
        assert metrics(out) == expected, (source, where)  # every loss, the lr and top-1 per K, exactly
        assert weights_sha(out) == sha, (source, where)  # bit-identical students


def test_a_run_interrupted_while_its_teacher_trains_reruns_to_the_same_teacher_and_student(tmp_path, monkeypatch,
                                                                                           one_thread):
    """The default teacher is trained with train.seed: interrupted mid-training (its cache then holds no
    teacher), the rerun trains it again to the same weights, and the student comes out the same too; another
    seed gets a teacher of its own."""
    args = [*BASE, "--set", "teacher.epochs=2"]
    monkeypatch.setenv("FMKT_CACHE", str(tmp_path / "cache-a"))
    full = invoke(args, tmp_path / "full")
    assert full.exit_code == 0, full.output

    monkeypatch.setenv("FMKT_CACHE", str(tmp_path / "cache-b"))
    restore = interrupt_at(monkeypatch, 6, teacher=True)  # the teacher's epoch 2, second step
    broken = invoke(args, tmp_path / "rerun")
    restore()
    assert broken.exit_code == 130, broken.output
    assert not list((tmp_path / "cache-b").rglob("fmkt.json"))  # no teacher was cached
    rerun = invoke(args, tmp_path / "rerun")
    assert rerun.exit_code == 0, rerun.output
    assert "training resnet8" in rerun.output  # trained again, not taken from a cache
    teacher = [json.loads((tmp_path / r / "artifact" / "fmkt.json").read_text())["teacher"] for r in ("full", "rerun")]
    assert teacher[0]["sha256"] == teacher[1]["sha256"] and teacher[0]["accuracy"] == teacher[1]["accuracy"]
    assert metrics(tmp_path / "rerun") == metrics(tmp_path / "full")
    assert weights_sha(tmp_path / "rerun") == weights_sha(tmp_path / "full")

    other = invoke([*args, "--seed", "1"], tmp_path / "seed1")  # cache-b holds the seed-0 teacher
    assert other.exit_code == 0, other.output
    assert "training resnet8" in other.output
    seed1 = json.loads((tmp_path / "seed1" / "artifact" / "fmkt.json").read_text())["teacher"]
    assert seed1["sha256"] != teacher[0]["sha256"]
