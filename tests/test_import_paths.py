"""`pkg.module:factory` wherever a zoo name works: --student, --teacher-model (+ --teacher weights), --data, and
eval/export of the artifact, which rebuilds the model from the import path in fmkt.json; bad paths exit 2."""
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fmkt.cli.app import app
from fmkt.errors import FmktError
from fmkt.import_paths import resolve

FIXTURES = Path(__file__).resolve().parent / "fixtures"
runner = CliRunner()
TINY = ["--epochs", "1", "--batch-size", "64", "--set", "method.train_steps=2", "--eval-steps", "1,2",
        "--set", "teacher.epochs=1"]


@pytest.fixture(autouse=True)
def _fixtures_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_distill_eval_export_with_import_paths(tmp_path):
    out = tmp_path / "run"
    r = invoke("distill", "--student", "custom_nets:small_cnn", "--teacher-model", "custom_nets:teacher_cnn",
               "--data", "custom_nets:digits", "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "artifact" / "fmkt.json").read_text())
    assert meta["model"]["arch"] == "custom_nets:small_cnn"
    assert meta["model"]["adapter"] == {"feature_layer": "body", "classifier": "fc"}
    assert meta["dataset"]["name"] == "custom_nets:digits" and meta["teacher"]["arch"] == "custom_nets:teacher_cnn"
    r = invoke("eval", out / "artifact", "--steps", "1,2,4", "--json")
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.output)["top1"]) == {"1", "2", "4"} and json.loads(r.output)["images"] == 128
    r = invoke("export", out / "artifact", "--steps", "2")
    assert r.exit_code == 0, r.output
    parity = json.loads((out / "export-onnx-k2" / "parity.json").read_text())
    assert parity["passed"] and "custom_nets:digits test split" in parity["reports"][0]["data"]
    r = invoke("bench", out / "artifact", "--backends", "eager,onnxruntime", "--batch", "2", "--steps", "1",
               "--iters", "2", "--warmup", "0", "--device", "cpu", "--out", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(x["backend"], x["variant"], x["status"]) for x in rows] == [
        (b, v, "ok") for b in ("eager", "onnxruntime") for v in ("student", "1")]


def test_state_dict_teacher_of_an_import_path(tmp_path):
    torch.manual_seed(0)
    from custom_nets import teacher_cnn

    torch.save({"model": teacher_cnn(10, 1).state_dict(), "epoch": 3}, tmp_path / "t.pth")
    out = tmp_path / "run"
    r = invoke("distill", "--teacher", tmp_path / "t.pth", "--teacher-model", "custom_nets:teacher_cnn",
               "--student", "resnet8", "--data", "custom_nets:digits", "--method", "kd", "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "artifact" / "fmkt.json").read_text())["teacher"]["arch"] == "custom_nets:teacher_cnn"
    r = invoke("distill", "--teacher", tmp_path / "t.pth", "--teacher-model", "custom_nets:small_cnn",
               "--data", "custom_nets:digits", "--method", "kd", "--out", tmp_path / "bad", *TINY)
    assert r.exit_code == 2 and "do not fit custom_nets:small_cnn" in r.output


def test_module_in_the_current_folder_is_found(tmp_path, monkeypatch):
    (tmp_path / "here_nets_7f3.py").write_text("def f(num_classes=3):\n    return num_classes\n")
    monkeypatch.chdir(tmp_path)
    assert resolve("here_nets_7f3:f")() == 3


BAD = [
    (["--student", "no_such_pkg_x.nets:f"], "cannot import module 'no_such_pkg_x.nets'"),
    (["--student", "custom_nets:nope"], "module 'custom_nets' has no attribute 'nope'"),
    (["--student", "custom_nets:NOT_CALLABLE"], "is a int, not a callable factory"),
    (["--student", "custom_nets:raises"], "raised ValueError (this factory always fails)"),
    (["--student", "custom_nets:not_a_module"], "returned int; it must return a torch nn.Module"),
    (["--student", "custom_nets:mlp_head_cnn"], "not global average pooling"),
    (["--student", "custom_nets:a:b"], "is not an import path of the form pkg.module:factory"),
    (["--student", "custom_nets:fixed_ten_classes", "--data", "custom_nets:tiny_cifar100"],
     "returns 10 logits but the data has 100 classes"),
    (["--student", "custom_nets:grey_only", "--data", "custom_nets:tiny_cifar100"],
     "failed on a (3, 32, 32) dry-run batch (RuntimeError"),
    (["--teacher-model", "custom_nets:nope"], "module 'custom_nets' has no attribute 'nope'"),
    (["--teacher-model", "custom_nets:raises", "--teacher-arch", "resnet8"], "disagree"),
    (["--data", "no_such_pkg_x:data"], "cannot import module 'no_such_pkg_x'"),
    (["--data", "custom_nets:raises"], "data factory 'custom_nets:raises' raised ValueError"),
    (["--data", "custom_nets:one_split"], "it must return (train, test) datasets"),
    (["--data", "custom_nets:out_of_range"], "pixel values outside [0, 1]"),
    (["--set", "student_options.layer=x"], "unknown config key 'student_options.layer'"),
]


@pytest.mark.parametrize("args, match", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_import_paths_exit_2_with_one_sentence(tmp_path, args, match):
    base = [] if "--student" in args else ["--student", "custom_nets:small_cnn"]
    data = [] if "--data" in args else ["--data", "custom_nets:digits"]
    r = invoke("distill", *base, *data, *args, "--out", tmp_path / "run", *TINY)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert match in text and text.count("error:") == 1 and "Traceback" not in text
    assert not (tmp_path / "run").exists()


def test_artifact_whose_module_is_gone_says_so(tmp_path):
    out = tmp_path / "run"
    r = invoke("train", "--model", "custom_nets:small_cnn", "--data", "custom_nets:digits", "--out", out,
               "--epochs", "1")
    assert r.exit_code == 0, r.output
    meta_path = out / "artifact" / "fmkt.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["arch"] = "gone_module_x9:small_cnn"
    meta_path.write_text(json.dumps(meta))
    r = invoke("eval", out / "artifact")
    assert r.exit_code == 2 and "cannot import module 'gone_module_x9'" in r.output
    with pytest.raises(FmktError, match="not an import path"):
        resolve("custom_nets:<locals>.f")
