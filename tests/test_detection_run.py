"""Issue 23, the training path: `fmkt-cli distill --task detection` on the Fashion-MNIST canvases trains a detector
with fmkt / pkd / none, reports COCO mAP per epoch (metrics.jsonl, fmkt.json, the printed table), writes a detection
artifact that `fmkt-cli eval` scores the same; the default teacher is trained once and cached; resume equals an
uninterrupted run; two gloo processes agree; the COCO recipes build and step; mistakes are one sentence.

Tiny sizes on a shared 2-core runner: 64-pixel canvases, a ResNet-18-FPN Faster R-CNN with a small box head
(:func:`tiny_rcnn`, an import-path detector), 4-image batches, N = 2 flow steps."""
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fmkt.cli.app import app
from fmkt.detection.coco_eval import KEYS

HERE = Path(__file__).resolve().parent
FASHION = "/usr/share/datasets/fashion-mnist"
pytestmark = pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST is not installed")
TIMING = ("epoch_seconds", "images_per_s")
DETECTOR = "test_detection_run:tiny_rcnn"
RCNN_OWN = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def tiny_rcnn(num_classes, min_size, max_size, **kwargs):
    """fasterrcnn_resnet18_fpn with a 2x2 RoI pool and few proposals (torchvision's 7x7 box head is 12.8 M weights)."""
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    from fmkt.detection.models import DETECTORS

    small = dict(box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 2, 2), box_head=TwoMLPHead(256 * 4, 1024),
                 rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
                 rpn_post_nms_top_n_test=50, box_batch_size_per_image=32, rpn_batch_size_per_image=64)
    return DETECTORS["fasterrcnn_resnet18_fpn"](num_classes, min_size=min_size, max_size=max_size,
                                                **{**small, **kwargs})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(canvases root: 16 training and 6 val 64-pixel canvases, a tiny_rcnn teacher's state-dict file)."""
    from fmkt.detection import make_detection_data

    root = tmp_path_factory.mktemp("detection-run")
    make_detection_data(root / "canvases", train=16, val=6, canvas=64, seed=2)
    torch.manual_seed(1)
    torch.save(tiny_rcnn(11, 64, 64).state_dict(), root / "teacher.pt")
    return root / "canvases", root / "teacher.pt"


@pytest.fixture(autouse=True)
def setting(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(HERE))  # for test_detection_run:tiny_rcnn
    monkeypatch.setenv("FMKT_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # train.threads=1 in an in-process run sets it for the whole process


def base(root, *more, epochs=2):
    return ["distill", "--task", "detection", "--data-dir", root, "--student", DETECTOR, "--teacher-model", DETECTOR,
            "--epochs", epochs, "--batch-size", 4, "--lr", 0.01, "--set", "detection.min_size=64", "--set",
            "detection.max_size=64", "--set", "data.workers=0", "--set", "method.train_steps=2", "--set",
            "train.threads=1", "--set", "detection.eval_batch_size=6", *more]


def invoke(args, out=None):
    return CliRunner().invoke(app, [*map(str, args), *(["--out", str(out)] if out else [])])


def metrics(out, timing=True):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return lines if timing else [{k: v for k, v in m.items() if k not in TIMING} for m in lines]


def meta(out):
    return json.loads((out / "artifact" / "fmkt.json").read_text())


def test_fmkt_trains_reports_map_per_epoch_and_eval_scores_the_artifact_the_same(data, tmp_path):
    root, teacher = data
    out = tmp_path / "fmkt"
    result = invoke(base(root, "--teacher", teacher, "--set", "optim.clip_grad=2.5"), out)
    assert result.exit_code == 0, result.output
    assert "AP50 (%)" in result.output and "student (last)" in result.output and "teacher" in result.output
    lines = metrics(out)
    assert [m["epoch"] for m in lines] == [1, 2] and all(set(m["map"]) == set(KEYS) for m in lines)
    assert all(m["map"]["AP"] is not None and 0.0 <= m["map"]["AP"] <= 100.0 for m in lines)
    assert RCNN_OWN | {f"loss_flow_{k}" for k in "0123"} <= set(lines[0]) and "loss_flow_pool" not in lines[0]
    m = meta(out)
    assert m["model"]["task"] == "detection" and m["model"]["detector"] == DETECTOR and m["model"]["num_classes"] == 11
    assert m["model"]["flow"]["levels"] == ["0", "1", "2", "3", "pool"]
    assert m["model"]["flow"]["weights"] == [6.0, 6.0, 6.0, 6.0, 0.0] and m["model"]["default_steps"] == 4
    assert m["metrics"]["last"] == lines[-1]["map"] and m["metrics"]["images_evaluated"] == 6
    assert m["metrics"]["best"]["AP"] == max(x["map"]["AP"] for x in lines)
    assert m["teacher"]["sha256"] == hashlib.sha256(teacher.read_bytes()).hexdigest()
    assert set(m["teacher"]["map"]) == set(KEYS) and m["dataset"]["num_classes"] == 10
    assert (m["dataset"]["root"], m["dataset"]["split"]) == (str(root.resolve()), "val")
    assert (m["method"], m["loss"], m["train_steps"]) == ("fmkt", "pkd", [2])
    assert m["detach_target"] is False  # the authors' flow unless detection.detach_target says otherwise

    scored = invoke(["eval", out / "artifact", "--steps", "0,4", "--batch-size", 6, "--json"])
    assert scored.exit_code == 0, scored.output
    res = json.loads(scored.output)
    assert list(res["map"]) == ["4"] and res["images"] == 6 and "0" in res["skipped"]
    assert res["map"]["4"] == pytest.approx(m["metrics"]["last"], abs=1e-9)  # the artifact is the evaluated model
    table = invoke(["eval", out / "artifact", "--steps", "1"])
    assert table.exit_code == 0 and "K=1" in table.output and "APm (%)" in table.output, table.output


def test_pkd_with_the_default_teacher_trained_once_and_cached(data, tmp_path):
    root, _ = data
    args = base(root, "--method", "pkd", "--set", "teacher.epochs=1", "--set", "teacher.lr=0.01", epochs=1)
    first = invoke(args, tmp_path / "a")
    assert first.exit_code == 0, first.output
    assert f"training {DETECTOR}" in first.output
    second = invoke(args, tmp_path / "b")
    assert second.exit_code == 0, second.output
    assert f"reusing {DETECTOR}" in second.output
    a, b = meta(tmp_path / "a"), meta(tmp_path / "b")
    assert a["teacher"]["sha256"] == b["teacher"]["sha256"] and a["teacher"]["map"] == b["teacher"]["map"]
    assert metrics(tmp_path / "a", timing=False) == metrics(tmp_path / "b", timing=False)  # the same run, reproduced
    assert RCNN_OWN | {f"loss_pkd_{k}" for k in "0123"} == {k for k in metrics(tmp_path / "a")[0] if k[:5] == "loss_"}
    assert a["model"]["flow"] is None and a["model"]["default_steps"] == 0 and a["level_weights"]["pool"] == 0.0
    scored = invoke(["eval", tmp_path / "a" / "artifact", "--json"])
    assert scored.exit_code == 0 and list(json.loads(scored.output)["map"]) == ["plain"], scored.output


def test_none_through_fmkt_cli_train(data, tmp_path):
    root, _ = data
    out = tmp_path / "none"
    result = invoke(["train", "--set", "task=detection", "--data-dir", root, "--model", DETECTOR, "--epochs", 1,
                     "--batch-size", 4, "--lr", 0.01, "--set", "detection.min_size=64", "--set", "detection.max_size=64",
                     "--set", "data.workers=0", "--set", "train.threads=1"], out)
    assert result.exit_code == 0, result.output
    m = meta(out)
    assert m["method"] == "none" and m["teacher"] is None and m["model"]["flow"] is None
    assert {k for k in metrics(out)[0] if k.startswith("loss_")} == RCNN_OWN


def interrupt_at(monkeypatch, call: int):
    """Raise KeyboardInterrupt (Ctrl-C) in the ``call``-th training step of the next run, before its forward pass."""
    from fmkt.detection.run import Trainable

    real, seen = Trainable.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        seen["n"] += 1
        if seen["n"] == call:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainable, "forward", forward)
    return lambda: monkeypatch.setattr(Trainable, "forward", real)


def test_resume_equals_uninterrupted(data, tmp_path, monkeypatch):
    """2 steps an epoch, a checkpoint after every step; torch's global generator feeds the RPN's and RoI heads'
    samplers, the Dirac ratio and N drawn per iteration, the loader's own generator the flips."""
    root, teacher = data
    args = base(root, "--teacher", teacher, "--set", "method.train_steps=1,2", "--set", "method.dirac_ratio=0.5",
                "--set", "train.checkpoint_every_steps=1", "--batch-size", 8)
    full = invoke(args, tmp_path / "full")
    assert full.exit_code == 0, full.output
    expected, sha = metrics(tmp_path / "full", timing=False), meta(tmp_path / "full")["weights_sha256"]
    for where, call, start in [("mid-epoch", 4, "epoch 2, step 1"), ("epoch boundary", 3, "epoch 2, step 0")]:
        out = tmp_path / where.replace(" ", "-")
        restore = interrupt_at(monkeypatch, call)
        broken = invoke(args, out)
        restore()
        assert broken.exit_code == 130, (where, broken.output)
        assert metrics(out, timing=False) == expected[:1] and not (out / "artifact").exists()
        resumed = invoke([*args, "--resume"], out)
        assert resumed.exit_code == 0, (where, resumed.output)
        assert start in " ".join(resumed.output.split()), (where, resumed.output)
        assert metrics(out, timing=False) == expected, where  # every loss, the lr and the mAP, exactly
        assert meta(out)["weights_sha256"] == sha, where  # bit-identical students


@pytest.mark.parametrize("args, match", [
    (["--task", "segmentation"], "unknown task 'segmentation'"),
    (["--task", "detection", "--method", "none"], "student 'resnet8' is not a detector"),
    (["--task", "detection", "--student", DETECTOR, "--method", "kd"], "unknown name 'kd'|unknown method 'kd'"),
    (["--task", "detection", "--student", DETECTOR, "--method", "none", "--set", "data.train_subset=8"],
     "data.train_subset is a classification key"),
    (["--task", "detection", "--student", DETECTOR, "--method", "none", "--set", "detection.loss=kd"],
     "must compare feature maps"),
])
def test_mistakes_are_one_sentence(args, match, tmp_path):
    result = invoke(["distill", *args], tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert re.search(match, " ".join(result.output.split())), result.output
    assert not (tmp_path / "o").exists()


def test_data_and_weights_mistakes_are_one_sentence(data, tmp_path):
    root, _ = data
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke(base(empty, "--method", "none"), tmp_path / "o")
    assert result.exit_code == 2 and "has no COCO split 'train'" in " ".join(result.output.split()), result.output
    result = invoke(base(root, "--method", "none", "--set", "detection.weights=[6,6,0]"), tmp_path / "o")
    assert result.exit_code == 2 and "5 FPN levels" in " ".join(result.output.split()), result.output
    result = invoke(base(root, "--method", "none", "--resume"), tmp_path / "o")
    assert result.exit_code == 2 and "does not exist" in result.output, result.output


def test_without_a_data_dir_the_canvases_are_made_once_in_the_cache(tmp_path, monkeypatch):
    from rich.console import Console

    from fmkt.commands import checked_info, configure
    from fmkt.detection import canvas
    from fmkt.detection.command import ensure_data

    cfg = configure(None, [{"task": "detection", "student": DETECTOR, "method": {"name": "none"}}])
    info = checked_info(cfg)
    assert info.build and info.root == tmp_path / "cache" / "canvases" and info.name == "canvases"
    made = []
    monkeypatch.setattr(canvas, "make_detection_data", lambda root, **kw: made.append((root, kw)))
    ensure_data(info, Console(quiet=True))
    assert made == [(info.root, {"overwrite": True})]
    with pytest.raises(Exception, match="has splits train and val"):
        configure(None, [{"task": "detection", "student": DETECTOR, "method": {"name": "none"},
                          "detection": {"val_split": "val2017"}}])


def test_the_torch_free_names():
    from fmkt.detection.distiller import METHODS
    from fmkt.names import DETECTION_METHOD_NAMES, TASK_NAMES

    assert DETECTION_METHOD_NAMES == METHODS and TASK_NAMES == ("classification", "detection")
    help_text = " ".join(CliRunner().invoke(app, ["distill", "--help"]).output.split())
    assert "classification | detection" in help_text


@pytest.fixture(scope="module")
def coco_layout(data):
    """A COCO 2017 layout (annotations/instances_{train,val}2017.json, train2017/, val2017/) over the canvases."""
    root = data[0].parent / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / f"{split}2017").symlink_to(data[0] / split)
        (root / "annotations" / f"instances_{split}2017.json").symlink_to(
            data[0] / "annotations" / f"instances_{split}.json")
    return root


@pytest.mark.parametrize("name, weights, lr, clip", [("coco_fasterrcnn_r101_r50", 6.0, 0.02, 2.5),
                                                     ("coco_retinanet_r101_r50", 10.0, 0.01, 0.0)])
def test_coco_recipes_hold_the_published_settings_and_step(name, weights, lr, clip, coco_layout):
    """The recipe checks on a COCO layout, then its detectors (R101 teacher, R50 student, the flow on every
    weighted level) take one training step at 64 pixels."""
    from fmkt.commands import configure
    from fmkt.detection import open_coco
    from fmkt.detection.models import create_detector
    from fmkt.detection.run import build_models
    from fmkt.optim import build_optimizer
    from fmkt.step import train_step

    cfg = configure(name, [{"data": {"dir": str(coco_layout)}}])
    d = cfg.detection
    assert (cfg.task, d.train_split, d.val_split, d.min_size, d.max_size) == ("detection", "train2017", "val2017",
                                                                             800, 1333)
    assert d.weights == [weights] * 4 + [0.0] and (cfg.optim.lr, cfg.optim.clip_grad) == (lr, clip)
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.milestones, cfg.train.epochs) == (0.9, 1e-4,
                                                                                                   [16, 22], 24)
    assert (cfg.data.batch_size, cfg.method.train_steps, cfg.method.dirac_ratio, d.refine_steps) == (16, "1,2,4,8,16",
                                                                                                    1.0, 4)
    assert d.detach_target is False  # the authors' flow
    assert cfg.student.endswith("resnet50_fpn") and cfg.teacher.arch.endswith("resnet101_fpn")
    cfg.detection.min_size = cfg.detection.max_size = 64
    cfg.method.train_steps = "1"
    cfg.student_kwargs = {"box_batch_size_per_image": 16} if "rcnn" in name else {}
    split = open_coco(coco_layout, "train2017")
    teacher = create_detector(cfg.teacher.arch, 11, min_size=64, max_size=64, **cfg.student_kwargs)
    model, spec = build_models(cfg, split.num_classes, teacher, torch.device("cpu"))
    model.train()
    images = torch.rand(2, 3, 64, 64)
    targets = [split.target(i) for i in split.train_indices[:2]]
    opt = build_optimizer(cfg, model.named_parameters())
    losses = train_step(model, opt, None, images, targets, 0.0, clip=cfg.optim.clip_grad)
    assert {f"loss_flow_{k}" for k in spec["flow"]["levels"][:4]} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values()) and spec["flow"]["encoder"] == "dwconv"


@pytest.mark.parametrize("detach", [False, True])
def test_detach_target_reaches_the_flow(data, detach):
    from fmkt.commands import configure
    from fmkt.detection.run import build_models

    root, _ = data
    cfg = configure(None, [{"task": "detection", "student": DETECTOR, "teacher": {"arch": DETECTOR},
                            "data": {"dir": str(root)},
                            "detection": {"min_size": 64, "max_size": 64, "detach_target": detach}}])
    model, _ = build_models(cfg, 10, tiny_rcnn(11, 64, 64), torch.device("cpu"))
    assert model.distiller.flow.detach_target is detach


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available in this build")
@pytest.mark.parametrize("method", ["none", "fmkt"])
def test_two_gloo_processes_agree(data, tmp_path, method):
    """torchrun DDP on CPU: each rank trains on its half of every 4-image batch and detects half the val canvases;
    every rank scores the gathered detections to the same mAP; rank 0 alone writes the artifact. With fmkt the
    teacher (a weights file) runs on every rank and the flow modules train under DDP."""
    root, teacher = data
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get(
        "PYTHONPATH", "")]), "FMKT_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "ddp"
    more = ["--teacher", teacher] if method == "fmkt" else []
    args = [str(a) for a in base(root, "--method", method, *more, "--set", "train.threads=1", epochs=1)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "fmkt.cli", *args,
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reported = {int(r): json.loads(v) for r, v in re.findall(r"rank (\d)/2 top-1: (\{.*\})", proc.stderr)}
    assert set(reported) == {0, 1} and reported[0] == reported[1], proc.stderr
    m = meta(out)
    assert m["distributed"] == {"world_size": 2, "backend": "gloo"} and m["metrics"]["last"] == reported[0]
    assert m["metrics"]["images_evaluated"] == 6 and [x["epoch"] for x in metrics(out)] == [1]
    assert len(list(tmp_path.rglob("fmkt.json"))) == 1
    assert (m["model"]["flow"] is not None) == (method == "fmkt")
