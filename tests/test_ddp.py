"""torchrun DDP on CPU (gloo): 2 processes on digits agree, write one artifact, and match one process.

What is compared, and why not bit for bit: ``data.batch_size`` is the global batch, so 2 ranks x 32 images see
exactly the images of the single process's 64-image batches, the gradients are averaged over both, and all start
from the same seed. The one intended difference is BatchNorm: each rank normalises with the statistics of its
own 32 images (plain per-rank BN, as DDP does by default), so the runs drift apart slowly. Tolerances, measured on
this setting (3 epochs, 768 images; DDP 94.44 % vs one process 95.00 % at K=1, epoch-1 loss 1.851 vs 1.890):
top-1 within 3 points at every K, epoch-1 mean training loss within 5 %.
"""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")

SETTINGS = ["--student", "resnet8", "--epochs", "3", "--batch-size", "64", "--eval-steps", "1,2",
            "--set", "data.train_subset=768", "--set", "data.test_subset=0", "--set", "data.augment=false",
            "--set", "teacher.arch=resnet8", "--set", "teacher.epochs=3", "--set", "method.train_steps=2",
            "--set", "train.threads=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_agree_and_match_one_process(tmp_path):
    # One process first: it also trains the default teacher into the (per-session) cache both runs share.
    single = tmp_path / "single"
    run([sys.executable, "-m", "fmkt.cli", "distill", *SETTINGS, "--out", str(single)], tmp_path)
    ddp = tmp_path / "ddp"
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                "-m", "fmkt.cli", "distill", *SETTINGS, "--out", str(ddp)], tmp_path)

    # every rank reports the same accuracy (test counts are summed across ranks, BN buffers taken from rank 0)
    reported = {int(r): json.loads(acc) for r, acc in re.findall(r"rank (\d)/2 top-1: (\{.*\})", proc.stderr)}
    assert set(reported) == {0, 1}, proc.stderr
    assert reported[0] == reported[1]
    # rank 0 alone wrote: one artifact, one metrics line per epoch, the progress lines once
    assert sorted(p.name for p in tmp_path.rglob("fmkt.json") if "cache" not in str(p)) == ["fmkt.json"] * 2
    assert (ddp / "artifact" / "model.safetensors").is_file()
    assert not [p for p in ddp.rglob(".*")], "temporary files left behind"
    assert proc.stderr.count("epoch 3/3") == 1
    meta = json.loads((ddp / "artifact" / "fmkt.json").read_text())
    assert meta["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert meta["metrics"]["last"] == reported[0]

    a, b = metrics(single), metrics(ddp)
    assert [m["epoch"] for m in b] == [1, 2, 3]
    assert b[-1]["top1"] == reported[0]
    for k in ("1", "2"):
        assert abs(a[-1]["top1"][k] - b[-1]["top1"][k]) <= 3.0, (a[-1]["top1"], b[-1]["top1"])
    assert b[0]["train_loss"] == pytest.approx(a[0]["train_loss"], rel=0.05)
    assert b[-1]["lr"] == a[-1]["lr"]  # same number of optimiser steps per epoch


def test_global_batch_must_divide_over_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "fmkt.cli", "train",
                           "--model", "resnet8", "--epochs", "1", "--batch-size", "33", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert "global batch and must divide evenly over 2 processes" in proc.stderr
    assert not (tmp_path / "o" / "artifact").exists()


def test_two_gloo_processes_on_an_image_folder(tmp_path):
    """--data imagefolder under torchrun: each rank decodes its own shard with its own worker, every rank reports
    the accuracy of the whole val split, rank 0 alone writes the artifact; fmkt.json counts the images evaluated on
    both ranks together (an unreadable val file left out)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from imagefolder_data import make_image_folder  # tests/imagefolder_data.py: real PNG/JPEG digits, 32 x 32

    root = make_image_folder(tmp_path / "images", train_per_class=16, val_per_class=5)
    (root / "val" / "digit_2" / "broken.png").write_bytes(b"\x89PNG but not really")
    out = tmp_path / "ddp"
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "fmkt.cli", "distill",
                "--data", "imagefolder", "--data-dir", str(root), "--method", "none", "--student", "resnet8",
                "--epochs", "1", "--batch-size", "32", "--set", "data.image_size=32", "--set", "data.workers=1",
                "--set", "train.threads=1", "--out", str(out)], tmp_path)
    reported = {int(r): json.loads(acc) for r, acc in re.findall(r"rank (\d)/2 top-1: (\{.*\})", proc.stderr)}
    assert set(reported) == {0, 1} and reported[0] == reported[1], proc.stderr
    meta = json.loads((out / "artifact" / "fmkt.json").read_text())
    assert meta["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert meta["dataset"]["name"] == "imagefolder" and meta["metrics"]["last"] == reported[0]
    assert (meta["metrics"]["images_evaluated"], meta["metrics"]["images_unreadable"]) == (50, 1)
    assert [m["epoch"] for m in metrics(out)] == [1]
    assert len(list(tmp_path.rglob("fmkt.json"))) == 1
