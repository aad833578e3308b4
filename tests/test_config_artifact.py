"""Typed config (YAML, --set, unknown keys), the student artifact and teacher loading."""
import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from fmkt.artifact import build_model, load_artifact, save_artifact
from fmkt.commands import configure
from fmkt.config import Config, build_config, parse_set, recipe_names
from fmkt.errors import FmktError
from fmkt.models import create_model
from fmkt.student import DeployableModel, StudentSpec, build_student, spec_of
from fmkt.teacher import load_teacher


def test_defaults_are_the_digits_demo():
    cfg = build_config()
    assert cfg.data.name == "digits" and cfg.method.name == "fmkt"
    assert cfg.method.eval_steps == [1, 2, 4, 8]


def test_yaml_file_set_and_shortcut_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"student": "resnet14", "optim": {"lr": 0.2}, "method": {"train_steps": [1, 2]}}))
    cfg = build_config(str(f), [{"optim": {"lr": 0.3}}, parse_set(["optim.lr=0.4", "method.eval_steps=1,3"])])
    assert cfg.student == "resnet14"
    assert cfg.optim.lr == 0.4
    assert cfg.method.train_step_choices() == [1, 2]
    assert cfg.method.eval_steps == [1, 3]


@pytest.mark.parametrize("bad,match", [
    ({"optim": {"lrr": 1}}, "unknown config key 'optim.lrr'"),
    ({"nope": 1}, "unknown config key 'nope'"),
    ({"train": {"epochs": "ten"}}, "train.epochs must be an integer"),
    ({"method": {"name": "magic"}}, "unknown method"),
    ({"method": {"encoder": "rnn"}}, "unknown encoder"),
    ({"method": {"schedule": "cosine"}}, "unknown schedule"),
    ({"method": {"loss": "ce"}}, "unknown loss"),
    ({"method": {"eval_steps": []}}, "eval_steps is empty"),
    ({"method": {"eval_steps": [-1]}}, ">= 0"),
    ({"method": {"dirac_ratio": 2}}, "dirac_ratio"),
    ({"train": {"epochs": 0}}, "train.epochs must be >= 1"),
    ({"method": {"name": "theta", "transfer": "features"}}, "transfer=features works with method fmkt only"),
    ({"method": {"name": "ofmkt", "transfer": "features"}}, "transfer=features works with method fmkt only"),
    ({"method": {"name": "kd", "transfer": "features"}}, "transfer=features works with method fmkt only"),
])
def test_bad_config_is_one_sentence(bad, match):
    with pytest.raises(FmktError, match=match):
        configure(None, [bad])  # types and ranges (fmkt.config), then names and cross-stage facts (commands)


def test_set_needs_key_value():
    with pytest.raises(FmktError, match="key=value"):
        parse_set(["optim.lr"])


def test_shipped_recipes_parse_and_validate():
    names = recipe_names()
    for want in ("digits", "fashion-mnist", "cifar100_resnet32x4_resnet8x4", "cifar100_wrn_40_2_wrn_16_2",
                 "cifar100_resnet56_resnet20", "cifar100_vgg13_vgg8"):
        assert want in names
    for name in names:
        if build_config(name).data.name == "imagefolder":  # needs --data-dir: test_recipes.py gives it a folder
            continue
        if build_config(name).task == "detection":  # needs a COCO --data-dir: tests/test_detection_run.py gives one
            continue
        cfg = configure(name, [])
        assert isinstance(cfg, Config)
    paper = build_config("cifar100_resnet32x4_resnet8x4")
    assert paper.train.epochs == 240 and paper.optim.milestones == [150, 180, 210]
    assert (paper.teacher.arch, paper.student) == ("resnet32x4", "resnet8x4")


def _flow_model(theta=True):
    torch.manual_seed(0)
    return build_student(StudentSpec(arch="resnet8", num_classes=4, channels=1, size=(8, 8), mean=(0.3,),
                                     std=(0.4,), encoder="mlp", schedule="vp", theta_head=theta)).eval()


def test_artifact_roundtrip_and_tamper_check(tmp_path):
    model = _flow_model()
    spec = spec_of(model).to_json()
    path = save_artifact(tmp_path / "art", model, spec, {"method": "theta", "metrics": {"last": {"1": 50.0}}})
    meta = json.loads((path / "fmkt.json").read_text())
    assert meta["model"]["encoder"] == "mlp" and meta["model"]["schedule"] == "vp"
    assert meta["model"]["input"]["mean"] == pytest.approx([0.3])
    assert len(meta["weights_sha256"]) == 64
    loaded, meta2 = load_artifact(path)
    x = torch.rand(3, 1, 8, 8)
    for k in (0, 1, 4):
        torch.testing.assert_close(loaded(x, steps=k), model(x, steps=k))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary leftovers
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(FmktError, match="sha256"):
        load_artifact(path)


def test_artifact_errors(tmp_path):
    with pytest.raises(FmktError, match="does not exist"):
        load_artifact(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FmktError, match="not an fmkt artifact"):
        load_artifact(tmp_path / "empty")


def _plain_backbone():
    torch.manual_seed(1)
    return create_model("resnet8", num_classes=4, in_channels=1)


@pytest.mark.parametrize("fmt", ["model", "state_dict", "plain", "module", "safetensors"])
def test_teacher_from_state_dict_files(tmp_path, fmt):
    backbone = _plain_backbone()
    sd = backbone.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "t.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "t.pth"
        obj = {"model": sd, "epoch": 3} if fmt == "model" else {"state_dict": sd} if fmt == "state_dict" else \
            {f"module.{k}": v for k, v in sd.items()} if fmt == "module" else sd
        torch.save(obj, path)
    teacher, info = load_teacher(path, arch="resnet8", num_classes=4, in_channels=1, mean=(0.3,), std=(0.4,))
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(teacher(x), backbone.eval()((x - 0.3) / 0.4))
    assert len(info["sha256"]) == 64 and not teacher.training


def test_teacher_artifact_record_has_its_plain_accuracy(tmp_path):
    """A teacher artifact is a plain model: its fmkt.json's top-1 is under "plain" ("1" is an FM-KT K, never there),
    and load_teacher's record carries it."""
    spec = StudentSpec(arch="resnet8", num_classes=4, channels=1, size=(8, 8), mean=(0.3,), std=(0.4,))
    model = build_student(spec)
    path = save_artifact(tmp_path / "teacher", model, spec_of(model).to_json(),
                         {"method": "none", "metrics": {"last": {"plain": 61.25}, "best": {"plain": 62.5}}})
    _, info = load_teacher(path, arch="resnet8", num_classes=4, in_channels=1, mean=(0.3,), std=(0.4,))
    assert info["accuracy"] == 61.25 and info["arch"] == "resnet8"


def test_teacher_bad_files(tmp_path):
    kw = dict(arch="resnet8", num_classes=4, in_channels=1, mean=(0.3,), std=(0.4,))
    with pytest.raises(FmktError, match="does not exist"):
        load_teacher(tmp_path / "nope.pt", **kw)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(FmktError, match="cannot read"):
        load_teacher(junk, **kw)
    lst = tmp_path / "list.pt"
    torch.save([1, 2, 3], lst)
    with pytest.raises(FmktError, match="state dict"):
        load_teacher(lst, **kw)
    other = tmp_path / "other.pt"
    torch.save(create_model("resnet8", num_classes=7, in_channels=1).state_dict(), other)
    with pytest.raises(FmktError, match="do not fit"):
        load_teacher(other, **kw)


def test_build_model_from_spec_matches():
    model = _flow_model(theta=False)
    spec = spec_of(model).to_json()
    rebuilt = build_model(spec)
    assert set(rebuilt.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("transfer", ["logits", "features"])
def test_reloaded_artifact_runs_like_the_trained_model(tmp_path, transfer):
    """fmkt.json records what the model needs to run as it did: default_steps (model(x) with no steps ran K=1
    after a reload while the trained model ran K=N) and the transfer (logits average the step estimates,
    features pool the end state: a reload that ignored it would give other logits)."""
    torch.manual_seed(0)
    model = build_student(StudentSpec(arch="resnet8", num_classes=4, channels=1, size=(8, 8), mean=(0.3,),
                                      std=(0.4,), encoder="conv", schedule="vp", theta_head=True, transfer=transfer,
                                      default_steps=4)).eval()
    spec = spec_of(model).to_json()
    assert spec["default_steps"] == 4 and spec["transfer"] == transfer
    path = save_artifact(tmp_path / "art", model, spec, {"method": "theta", "train_steps": [4]})
    loaded, _ = load_artifact(path)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x)) and torch.equal(model(x), model(x, steps=4))
        assert not torch.allclose(model(x, steps=1), model(x, steps=4))  # K matters, so the default is tested
        for k in (0, 1, 2, 3, 4, 8):
            assert torch.equal(loaded(x, steps=k), model(x, steps=k)), k
        other = DeployableModel(create_model("resnet8", num_classes=4, in_channels=1), (0.3,), (0.4,),
                                encoder="conv", schedule="vp", theta_head=True, default_steps=4,
                                transfer="logits" if transfer == "features" else "features")
        other.load_state_dict(model.state_dict())
        assert not torch.allclose(other.eval()(x), model(x))  # the transfer changes the output: it is tested


def test_artifact_without_default_steps_runs_its_last_training_n(tmp_path):
    """Artifacts written before fmkt.json recorded default_steps run the last training N, as the engine set it."""
    model = _flow_model(theta=False)
    model.default_steps = 8
    spec = spec_of(model).to_json()
    del spec["default_steps"]
    path = save_artifact(tmp_path / "old", model, spec, {"method": "fmkt", "train_steps": [1, 2, 8]})
    loaded, _ = load_artifact(path)
    assert loaded.default_steps == 8


def test_on_and_off_stay_words_for_string_keys(tmp_path):
    """`--set train.fast_path=on` (README's spelling): YAML 1.1 reads on/off as booleans, which a string key
    refused as 'True'; a bool key still takes them."""
    cfg = build_config(None, [parse_set(["train.fast_path=on", "train.amp=off"])])
    assert cfg.train.fast_path == "on" and cfg.train.amp is False
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  fast_path: off\n")
    assert build_config(str(f), []).train.fast_path == "off"


def test_eval_feeds_the_artifact_the_size_it_was_trained_at(tmp_path):
    """An artifact trained on resized in-memory data (data.image_size) is evaluated on the same resized images:
    `fmkt-cli eval` gives what the reloaded model gives on them (it used to feed the native 8 x 8 digits)."""
    from typer.testing import CliRunner

    from fmkt.cli.app import app
    from fmkt.data import load_dataset

    out = tmp_path / "run"
    runner = CliRunner()
    trained = runner.invoke(app, [str(a) for a in [
        "distill", "--out", out, "--epochs", 1, "--set", "data.image_size=16", "--set", "data.train_subset=96",
        "--batch-size", 32, "--set", "teacher.arch=resnet8", "--set", "teacher.epochs=1", "--set",
        "method.train_steps=2", "--eval-steps", "1"]])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["eval", str(out / "artifact"), "--steps", "1", "--json"])
    assert result.exit_code == 0, result.output
    model, _ = load_artifact(out / "artifact")
    _, test, _ = load_dataset("digits", image_size=16)
    with torch.no_grad():
        correct = (model.eval()(test.images, steps=1).argmax(1) == test.labels).float().mean().item()
    assert json.loads(result.output)["top1"]["1"] == pytest.approx(100 * correct)
