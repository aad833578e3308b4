"""The CIFAR-100 teachers of mdistiller/RepDistiller load as they are published.

Their files are ``{"model": state_dict, "accuracy": ..., "epoch": ..., "optimizer": ...}`` for their CIFAR model
definitions. Here such files are written from the *fixture* of mdistiller's parameter names and shapes (never
from our models, so the names tested are theirs), with random weights, and loaded by ``load_teacher`` and by
``fmkt-cli distill --teacher FILE --teacher-arch X``: strictly, and with the logits of the state dict loaded by hand.
"""
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from fmkt.cli.app import app
from fmkt.config import build_config
from fmkt.data import dataset_info
from fmkt.errors import FmktError
from fmkt.files import sha256_file
from fmkt.models import create_model
from fmkt.commands import obtain_teacher
from fmkt.teacher import load_teacher, read_state_dict
from reference_weights import random_state_dict  # tests/reference_weights.py

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHAPES = json.loads((FIXTURES / "mdistiller_param_shapes.json").read_text())
TEACHERS = ["resnet32x4", "resnet56", "resnet110", "wrn_40_2", "vgg13", "shufflenetv2", "mobilenetv2"]
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)  # CIFAR-100's


def mdistiller_state_dict(name: str, seed: int = 0) -> dict:
    """Random weights under mdistiller's names and shapes: He-scaled convs and linears, BN near identity."""
    return random_state_dict(SHAPES[name], seed)


def write_checkpoint(path: Path, sd: dict) -> Path:
    """The layout of RepDistiller's train_teacher.py / mdistiller's checkpoints, non-tensor entries included."""
    torch.save({"epoch": 240, "model": sd, "accuracy": torch.tensor(79.42), "best_acc": 79.42,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005, "momentum": 0.9, "params": [0, 1]}]}},
               path)
    return path


def by_hand(name: str, sd: dict, x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    model = create_model(name, num_classes=100, in_channels=3)
    model.load_state_dict(sd, strict=True)
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.eval()((x - mean) / std)


@pytest.fixture(autouse=True)
def _fixtures_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))


@pytest.mark.parametrize("name", TEACHERS)
def test_published_teacher_loads_strictly_with_the_same_logits(tmp_path, name):
    sd = mdistiller_state_dict(name)
    path = write_checkpoint(tmp_path / "ckpt_epoch_240.pth", sd)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = by_hand(name, sd, x)
    assert torch.isfinite(expected).all() and expected.shape == (2, 100)

    teacher, info = load_teacher(path, arch=name, num_classes=100, in_channels=3, mean=MEAN, std=STD)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), expected, rtol=0, atol=0)
    assert info["sha256"] == sha256_file(path)

    # what `fmkt-cli distill --teacher PATH --teacher-arch NAME --data <100-class 32x32 data>` loads (normalised
    # with that data's statistics)
    data = "custom_nets:tiny_cifar100"
    cfg = build_config(None, [{"teacher": {"path": str(path), "arch": name}, "data": {"name": data},
                               "train": {"device": "cpu"}}])
    cli_teacher, _ = obtain_teacher(cfg, Console(quiet=True))
    info = dataset_info(data)
    with torch.no_grad():
        torch.testing.assert_close(cli_teacher(x), by_hand(name, sd, x, info.mean, info.std), rtol=0, atol=0)


def test_distill_from_a_published_teacher_file(tmp_path):
    path = write_checkpoint(tmp_path / "ckpt_epoch_240.pth", mdistiller_state_dict("resnet56"))
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["distill", "--teacher", str(path), "--teacher-arch", "resnet56", "--student",
                                 "resnet8", "--data", "custom_nets:tiny_cifar100", "--epochs", "1", "--batch-size",
                                 "16", "--set", "method.train_steps=1", "--eval-steps", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "artifact" / "fmkt.json").read_text())
    assert meta["teacher"]["sha256"] == sha256_file(path) and meta["teacher"]["arch"] == "resnet56"


def test_checkpoint_entries_prefixes_and_key_map(tmp_path):
    sd = mdistiller_state_dict("resnet56")
    # DataParallel's 'module.' prefix is dropped; the other entries are ignored
    path = write_checkpoint(tmp_path / "dp.pth", {f"module.{k}": v for k, v in sd.items()})
    assert list(read_state_dict(path)) == list(sd)
    # a checkpoint with other names: refused as it is, loaded through a key map
    renamed = write_checkpoint(tmp_path / "renamed.pth", {k.replace("layer", "stage", 1): v for k, v in sd.items()})
    with pytest.raises(FmktError, match="do not fit resnet56"):
        load_teacher(renamed, arch="resnet56", num_classes=100, in_channels=3, mean=MEAN, std=STD)
    teacher, _ = load_teacher(renamed, arch="resnet56", num_classes=100, in_channels=3, mean=MEAN, std=STD,
                              key_map={"stage": "layer"})
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), by_hand("resnet56", sd, x), rtol=0, atol=0)
