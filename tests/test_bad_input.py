"""Bad input, table-driven, across train, distill, eval, export and bench: one clear sentence, exit 2, nothing left behind.

Every row runs in its own folder: after the command, the folder holds exactly what the row put there (no artifact, checkpoint,
config or temporary file: nothing half-written).
"""
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fmkt.cli.app import app
from fmkt.models import create_model

runner = CliRunner()
TINY = ["--set", "data.train_subset=64", "--set", "data.test_subset=32", "--batch-size", "32", "--epochs", "1",
        "--set", "method.train_steps=2", "--set", "teacher.arch=resnet8", "--set", "teacher.epochs=1"]


def state_dict(classes=10, channels=1):
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=classes, in_channels=channels).state_dict()


def fake_cifar10(folder: Path, data) -> Path:
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [0] * len(data)}, f)
    return folder


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A real (1-epoch, tiny) digits artifact to break in various ways."""
    out = tmp_path_factory.mktemp("art") / "run"
    result = runner.invoke(app, ["train", "--model", "resnet8", "--data", "digits", "--out", str(out), *TINY[:6]])
    assert result.exit_code == 0, result.output
    return out / "artifact"


def _teacher_pt(d, sd):
    torch.save(sd, d / "teacher.pt")
    return ["--teacher", str(d / "teacher.pt"), "--teacher-arch", "resnet8"]


def _checkpoint(d, data: bytes | None = None, obj=None):
    (d / "run").mkdir()
    if obj is not None:
        torch.save(obj, d / "run" / "checkpoint.pt")
    else:
        (d / "run" / "checkpoint.pt").write_bytes(data)
    return ["--out", str(d / "run"), "--resume"]


def _good_teacher(d):
    return _teacher_pt(d, state_dict())


def _truncated_checkpoint(d, art):
    good = d / "good"
    assert runner.invoke(app, ["distill", "--method", "none", "--out", str(good), *TINY]).exit_code == 0
    data = (good / "checkpoint.pt").read_bytes()
    shutil.rmtree(good)
    return ["distill", "--method", "none", *TINY, *_checkpoint(d, data[: len(data) // 2])]


def _tampered(d, art):
    copy = d / "artifact"
    shutil.copytree(art, copy)
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-5] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(weights))
    return copy


def _bad_json(d, art):
    copy = d / "artifact"
    shutil.copytree(art, copy)
    (copy / "fmkt.json").write_text('{"format": "fmkt-artifact", "model": ')
    return copy


def _unreadable_teacher(d, art):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode, so an unreadable file cannot be made here")
    args = _good_teacher(d)
    os.chmod(d / "teacher.pt", 0)
    return ["distill", *args, *TINY]


def _read_only_out(d, art):
    if os.geteuid() != 0:
        ro = d / "ro"
        ro.mkdir()
        os.chmod(ro, 0o555)
        return ["distill", "--method", "ofmkt", *TINY, "--out", str(ro / "run")]
    # root ignores mode bits; a read-only mount refuses root too
    for candidate in ("/sys", "/proc/sys"):
        try:
            os.mkdir(os.path.join(candidate, "fmkt-probe"))
        except OSError:
            return ["distill", "--method", "ofmkt", *TINY, "--out", f"{candidate}/fmkt-run"]
        os.rmdir(os.path.join(candidate, "fmkt-probe"))
    pytest.skip("running as root with no read-only mount to write into: a read-only folder cannot fail here")


def _wrong_idx_files(d, art):
    (d / "fm").mkdir()
    (d / "fm" / "train.csv").write_text("1,2,3\n")
    return ["distill", "--data", "fashion-mnist", "--data-dir", str(d / "fm"), *_good_teacher(d), *TINY]


def _garbage_idx_files(d, art):
    fm = d / "fm"
    fm.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (fm / name).write_bytes(b"not an idx file at all")
    return ["train", "--model", "resnet8", "--data", "fashion-mnist", "--data-dir", str(fm), "--out", str(d / "o")]


def _image_folder(d, train=None, val=None, garbage=False):
    """d/imgs in the ImageNet layout: {class: file count} per split (default two classes of two), tiny PNGs (or
    files that are not images)."""
    from PIL import Image

    root = d / "imgs"
    for split, classes in [("train", train), ("val", val)]:
        for name, count in (classes if classes is not None else {"a": 2, "b": 2}).items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                if garbage:
                    (root / split / name / f"{i}.jpg").write_bytes(b"not an image")
                else:
                    Image.new("L", (8, 8), 40 * i).save(root / split / name / f"{i}.png")
    return ["--data", "imagefolder", "--data-dir", str(root), "--set", "data.image_size=8", "--set", "data.workers=0"]


def _folder_without_val(d, a):
    args = _image_folder(d)
    shutil.rmtree(d / "imgs" / "val")
    return ["distill", *args, *TINY]


# (id, command builder (folder, artifact) -> argv, words the one sentence must hold)
CASES = [
    ("train-unknown-model", lambda d, a: ["train", "--model", "resnet9", "--out", str(d / "o")], "unknown model"),
    ("distill-unknown-student", lambda d, a: ["distill", "--student", "vgg99", *TINY], "unknown model"),
    ("distill-unknown-loss", lambda d, a: ["distill", "--loss", "ce", *TINY], "unknown loss"),
    ("distill-unknown-encoder", lambda d, a: ["distill", "--encoder", "lstm", *TINY], "unknown encoder"),
    ("distill-unknown-schedule", lambda d, a: ["distill", "--schedule", "cosine", *TINY], "unknown schedule"),
    ("distill-negative-k", lambda d, a: ["distill", "--eval-steps", "1,-2", *TINY], ">= 0"),
    ("distill-empty-eval-steps", lambda d, a: ["distill", "--eval-steps", "", *TINY], "--eval-steps is empty"),
    ("eval-negative-k", lambda d, a: ["eval", str(a), "--steps", "-1"], ">= 0"),
    ("eval-empty-steps", lambda d, a: ["eval", str(a), "--steps", ","], "--steps is empty"),
    ("export-negative-k", lambda d, a: ["export", str(a), "--steps", "-1", "--out", str(d / "x")], "steps"),
    ("distill-missing-teacher", lambda d, a: ["distill", "--teacher", str(d / "nope.pt"), *TINY], "does not exist"),
    ("distill-unreadable-teacher", _unreadable_teacher, "cannot read"),
    ("distill-truncated-teacher", lambda d, a: ["distill", "--teacher", str(_truncate(d)), "--teacher-arch",
                                                "resnet8", *TINY], "cannot read"),
    ("distill-pickle-not-state-dict", lambda d, a: ["distill", *_teacher_pt(d, {"epoch": 3, "note": "hello"}), *TINY],
     "does not hold a state dict"),
    ("distill-pickle-of-an-object", lambda d, a: ["distill", "--teacher", str(_object_pickle(d)), "--teacher-arch",
                                                  "resnet8", *TINY], "weights_only"),
    ("distill-teacher-other-classes", lambda d, a: ["distill", *_teacher_pt(d, state_dict(classes=100)), *TINY],
     "100"),
    ("distill-teacher-artifact-other-channels", lambda d, a: ["distill", "--teacher", str(a), "--data", "cifar10",
                                                              "--data-dir", str(fake_cifar10(d, _cifar(4))), *TINY],
     "3 channels"),
    ("distill-teacher-3-channel-weights", lambda d, a: ["distill", *_teacher_pt(d, state_dict(channels=3)), *TINY],
     "1 input channels"),
    ("distill-teacher-nan-weights", lambda d, a: ["distill", *_teacher_pt(d, _nan_state()), *TINY], "NaN"),
    ("distill-missing-data-dir", lambda d, a: ["distill", "--data", "mnist", "--data-dir", str(d / "none"),
                                               *_good_teacher(d), *TINY], str("none")),
    ("distill-dataset-wrong-files", _wrong_idx_files, "train-images-idx3-ubyte"),
    ("train-dataset-garbage-files", _garbage_idx_files, "train-images-idx3-ubyte"),
    ("train-cifar-wrong-channel-count", lambda d, a: ["train", "--model", "resnet8", "--data", "cifar10", "--data-dir",
                                                      str(fake_cifar10(d, _cifar(4, 2 * 32 * 32))), "--out",
                                                      str(d / "o")], "(N, 3072)"),
    ("train-cifar-nan-pixels", lambda d, a: ["train", "--model", "resnet8", "--data", "cifar10", "--data-dir",
                                             str(fake_cifar10(d, _cifar(4).astype(np.float32) * np.nan)), "--out",
                                             str(d / "o")], "uint8"),
    ("eval-wrong-channels", lambda d, a: ["eval", str(a), "--data", "cifar10", "--data-dir",
                                          str(fake_cifar10(d, _cifar(4)))], "3 channels"),
    ("distill-truncated-checkpoint", _truncated_checkpoint, "damaged"),
    ("train-corrupted-checkpoint", lambda d, a: ["train", "--model", "resnet8", *TINY[:6],
                                                 *_checkpoint(d, os.urandom(4096))], "damaged"),
    ("train-checkpoint-not-a-state", lambda d, a: ["train", "--model", "resnet8", *TINY[:6],
                                                   *_checkpoint(d, obj=[1, 2, 3])], "not an fmkt checkpoint"),
    ("distill-out-is-a-file", lambda d, a: ["distill", "--out", str(_file(d)), *TINY], "is a file"),
    ("train-out-under-a-file", lambda d, a: ["train", "--model", "resnet8", "--out", str(_file(d) / "sub")],
     "is a file"),
    ("distill-read-only-out", _read_only_out, "is not writable"),
    ("eval-missing-artifact", lambda d, a: ["eval", str(d / "nope")], "does not exist"),
    ("eval-folder-not-artifact", lambda d, a: ["eval", str(d)], "is not an fmkt artifact"),
    ("eval-tampered-weights", lambda d, a: ["eval", str(_tampered(d, a))], "sha256"),
    ("eval-damaged-fmkt-json", lambda d, a: ["eval", str(_bad_json(d, a))], "not valid JSON"),
    ("export-missing-artifact", lambda d, a: ["export", str(d / "nope"), "--steps", "0"], "does not exist"),
    ("export-tampered-weights", lambda d, a: ["export", str(_tampered(d, a)), "--steps", "0", "--out",
                                              str(d / "x")], "sha256"),
    ("export-out-is-a-file", lambda d, a: ["export", str(a), "--steps", "0", "--out", str(_file(d))], "exists"),
    ("distill-batch-size-zero", lambda d, a: ["distill", *TINY, "--batch-size", "0"], "data.batch_size"),
    ("distill-config-not-yaml-mapping", lambda d, a: ["distill", "--config", str(_text(d, "c.yaml", "- 1\n- 2\n"))],
     "c.yaml"),
    ("bench-missing-path", lambda d, a: ["bench", str(d / "nope")], "does not exist"),
    ("bench-folder-neither", lambda d, a: ["bench", str(d)], "neither an fmkt artifact"),
    ("bench-tampered-weights", lambda d, a: ["bench", str(_tampered(d, a)), "--iters", "1"], "sha256"),
    ("bench-unknown-backend", lambda d, a: ["bench", str(a), "--backends", "eager,tvm"], "unknown backend 'tvm'"),
    ("bench-batch-zero", lambda d, a: ["bench", str(a), "--batch", "0"], "--batch values must be >= 1"),
    ("bench-batch-not-numbers", lambda d, a: ["bench", str(a), "--batch", "one"], "--batch must be"),
    ("bench-iters-zero", lambda d, a: ["bench", str(a), "--iters", "0"], "--iters must be >= 1"),
    ("bench-precision-fp8", lambda d, a: ["bench", str(a), "--precision", "fp8"], "unknown precision 'fp8'"),
    ("bench-device-bogus", lambda d, a: ["bench", str(a), "--device", "tpu"], "unknown device 'tpu'"),
    *([("bench-cuda-without-a-gpu", lambda d, a: ["bench", str(a), "--device", "cuda"], "no CUDA GPU is visible")]
      if not torch.cuda.is_available() else []),
    ("bench-out-is-a-folder", lambda d, a: ["bench", str(a), "--iters", "1", "--out", str(d)], "is a folder"),
    ("train-imagefolder-without-data-dir", lambda d, a: ["train", "--data", "imagefolder"], "needs --data-dir ROOT"),
    ("train-imagefolder-missing-folder", lambda d, a: ["train", "--data", "imagefolder", "--data-dir",
                                                       str(d / "none")], "does not exist"),
    ("distill-imagefolder-missing-val", _folder_without_val, "val does not exist"),
    ("train-imagefolder-empty-training-class", lambda d, a: ["train", *_image_folder(d, train={"a": 2, "b": 0})],
     "train/b holds no image file"),
    ("train-imagefolder-classes-differ", lambda d, a: ["train", *_image_folder(d, val={"a": 1, "b": 1, "c": 1})],
     "only in val: c"),
    ("distill-imagefolder-no-readable-image", lambda d, a: ["distill", *_image_folder(d, garbage=True), *TINY],
     "reads as an image"),
    ("train-imagefolder-mean-of-one-channel", lambda d, a: ["train", *_image_folder(d), "--set", "data.mean=[0.5]",
                                                            "--set", "data.std=[0.5]"], "one value per channel"),
    # data.image_size now resizes in-memory data (issue 21); a size below 8 is still refused
    ("train-image-size-below-8-on-digits", lambda d, a: ["train", "--set", "data.image_size=4"],
     "data.image_size must be >= 8"),
    ("distill-unknown-timm-model", lambda d, a: ["distill", "--student", "timm:convnext_atoo"],
     "did you mean timm:convnext_atto"),
    ("distill-timm-option-on-a-cnn", lambda d, a: ["distill", "--student", "timm:convnext_atto", "--set",
                                                   "student_options.feature_layer=stem"], "valid keys here: z1"),
    ("train-workers-negative", lambda d, a: ["train", "--set", "data.workers=-1"], "data.workers must be >= 0"),
    ("train-unknown-logger", lambda d, a: ["train", "--set", "train.log=wandb"], "unknown log 'wandb'"),
]


def _cifar(n, width=3 * 32 * 32):
    return np.zeros((n, width), dtype=np.uint8)


def _truncate(d):
    torch.save(state_dict(), d / "t.pt")
    data = (d / "t.pt").read_bytes()
    (d / "t.pt").write_bytes(data[: len(data) // 3])
    return d / "t.pt"


class NotWeights:
    pass


def _object_pickle(d):
    torch.save({"model": NotWeights()}, d / "obj.pt")
    return d / "obj.pt"


def _nan_state():
    sd = state_dict()
    next(v for k, v in sd.items() if k.endswith("weight")).view(-1)[0] = float("nan")
    return sd


def _file(d):
    (d / "a-file").write_text("x")
    return d / "a-file"


def _text(d, name, text):
    (d / name).write_text(text)
    return d / name


def tree(folder: Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")}


@pytest.mark.parametrize("build,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_sentence_exit_2_and_nothing_left(tmp_path, artifact, monkeypatch, build, match):
    case = tmp_path / "case"
    case.mkdir()
    monkeypatch.chdir(case)  # the default --out (runs/...) lands here too
    argv = [str(a) for a in build(case, artifact)]
    if "--out" not in argv and argv[0] in ("train", "distill"):
        argv += ["--out", str(case / "out")]
    before = tree(case)
    art_before = tree(artifact)
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    error = result.output[result.output.index("error:"):] if "error:" in result.output else result.output
    message = " ".join(error.split())
    assert match in message, message
    assert "Traceback" not in result.output
    assert message.startswith("error:") and message.count(". ") <= 1, message  # one sentence (maybe a hint)
    assert tree(case) == before, f"left behind: {sorted(map(str, tree(case) - before))}"
    assert tree(artifact) == art_before


def test_the_table_covers_twenty_cases_over_five_commands():
    assert len(CASES) >= 20
    commands = {c[0].split("-")[0] for c in CASES}
    assert commands == {"train", "distill", "eval", "export", "bench"}


def test_debug_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path / "nope"), "--debug"])
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "FmktError"


def test_first_line_is_the_one_way_to_put_an_exception_in_a_sentence():
    """fmkt.errors.first_line: "Type: the first line" (stripped, cut at limit), "Type" for an empty message, the line
    alone with with_type=False; no product module splits an exception's text by hand again."""
    import re

    from fmkt.errors import first_line

    exc = ValueError("\n  bad value here.\nsecond line")
    assert first_line(exc) == "ValueError: bad value here."
    assert first_line(exc, 3) == "ValueError: bad" and first_line(exc, None, with_type=False) == "bad value here."
    assert first_line(RuntimeError()) == "RuntimeError" and first_line(RuntimeError(""), with_type=False) == ""
    root = Path(__file__).resolve().parents[1]
    copy = re.compile(r"str\(\w+\)(\.strip\(\))?\.(splitlines\(\)|split\(.\\n.\))\[0\]"
                      r"|str\(exc\)\.strip\(\)\.splitlines")
    hits = [str(p.relative_to(root)) for d in ("fmkt", "cli", "export", "bench", "kernels")
            for p in (root / d).rglob("*.py") if copy.search(p.read_text()) and p.name != "errors.py"]
    assert hits == [], hits
