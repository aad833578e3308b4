"""The ImageNet zoo (resnet18, resnet34, resnet50, mobilenet_v1) holds its references' parameter names and shapes.

The references' names come from fixtures written by ``scripts/torchvision_names.py`` from their authors' own
source files (torchvision's ``torchvision/models/resnet.py`` from the torchvision wheel; mdistiller's
``mdistiller/models/imagenet/mobilenetv1.py``), never from our models. State dicts of exactly those names and
shapes, with random weights, are saved with ``torch.save``, read back with ``weights_only=True`` and loaded
strictly; the logits are checked against a plain functional forward written here from the state dict alone
(torchvision's and mdistiller's forward: strides, shortcut, pools), at 224 x 224 and at 32 x 32, and the ResNets'
against ``torchvision.models``' own, bit for bit.
"""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from fmkt.cli.app import app
from fmkt.files import sha256_file
from fmkt.models import create_model
from fmkt.models.mobilenetv1 import mobilenet_v1
from fmkt.models.resnet_imagenet import resnet18, resnet34, resnet50
from fmkt.teacher import load_teacher
from reference_weights import random_state_dict  # tests/reference_weights.py

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TORCHVISION = json.loads((FIXTURES / "torchvision_resnet_shapes.json").read_text())
MDISTILLER = json.loads((FIXTURES / "mdistiller_mobilenetv1_shapes.json").read_text())
SHAPES = {**{k: v for k, v in TORCHVISION.items() if not k.startswith("_")}, "mobilenet_v1": MDISTILLER["mobilenet_v1"]}
MODELS = ["resnet18", "resnet34", "resnet50", "mobilenet_v1"]
NUM_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "mobilenet_v1": 1024}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's transforms
# MobileNetV1 (Howard et al. 2017, Table 1): stride of the stem conv, then of each of the 13 separable blocks
MOBILENET_STRIDES = [2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


def reference_state_dict(name: str, seed: int = 0, shapes: dict | None = None) -> dict:
    """Random weights under the reference's names and shapes: He-scaled convs and linears, BN near identity."""
    return random_state_dict(shapes or SHAPES[name], seed, bn_weight=0.5)


# ------------------------------------------------------------------ plain forwards, from the state dict alone
def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        False, 0.0, 1e-5)


def _head(x, sd):
    return F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), sd["fc.weight"], sd["fc.bias"])


def _resnet_block(x, sd, p, stride):
    if p + "conv3.weight" in sd:  # Bottleneck, stride on the 3x3 (torchvision's "v1.5")
        out = F.relu(_bn(F.conv2d(x, sd[p + "conv1.weight"]), sd, p + "bn1"))
        out = F.relu(_bn(F.conv2d(out, sd[p + "conv2.weight"], stride=stride, padding=1), sd, p + "bn2"))
        out = _bn(F.conv2d(out, sd[p + "conv3.weight"]), sd, p + "bn3")
    else:  # BasicBlock
        out = F.relu(_bn(F.conv2d(x, sd[p + "conv1.weight"], stride=stride, padding=1), sd, p + "bn1"))
        out = _bn(F.conv2d(out, sd[p + "conv2.weight"], padding=1), sd, p + "bn2")
    if p + "downsample.0.weight" in sd:
        x = _bn(F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride), sd, p + "downsample.1")
    return F.relu(out + x)


def resnet_forward(sd, x):
    """torchvision's ResNet: 7x7/2 conv, BN, ReLU, 3x3/2 max pool, four stages (stride 2 from the second on)."""
    x = F.max_pool2d(F.relu(_bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1")), 3, 2, 1)
    for stage in range(1, 5):
        block = 0
        while f"layer{stage}.{block}.conv1.weight" in sd:
            x = _resnet_block(x, sd, f"layer{stage}.{block}.", 2 if stage > 1 and block == 0 else 1)
            block += 1
    return _head(x, sd)


def mobilenet_forward(sd, x):
    """mdistiller's MobileNetV1: conv-BN-ReLU, then 13 x (depthwise 3x3-BN-ReLU, pointwise 1x1-BN-ReLU)."""
    x = F.relu(_bn(F.conv2d(x, sd["model.0.0.weight"], stride=2, padding=1), sd, "model.0.1"))
    for i, stride in enumerate(MOBILENET_STRIDES[1:], start=1):
        dw = sd[f"model.{i}.0.weight"]
        x = F.relu(_bn(F.conv2d(x, dw, stride=stride, padding=1, groups=dw.shape[0]), sd, f"model.{i}.1"))
        x = F.relu(_bn(F.conv2d(x, sd[f"model.{i}.3.weight"]), sd, f"model.{i}.4"))
    return _head(x, sd)


def by_hand(name, sd, x):
    return (mobilenet_forward if name == "mobilenet_v1" else resnet_forward)(sd, x)


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


# ------------------------------------------------------------------ the fixtures are the references'
def test_fixtures_say_where_they_come_from():
    assert TORCHVISION["_made_by"] == MDISTILLER["_made_by"] == "python scripts/torchvision_names.py"
    assert TORCHVISION["_torchvision_version"].startswith("0.29.1") and len(TORCHVISION["_wheel_sha256"]) == 64
    assert "megvii-research/mdistiller@" in MDISTILLER["_source"]
    # the parameter counts of torchvision's published IMAGENET1K_V1 weights (their weights enums' meta)
    assert TORCHVISION["_num_params"] == {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
    for name, count in TORCHVISION["_num_params"].items():
        params = sum(math.prod(s) for k, s in SHAPES[name].items()
                     if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
        assert params == count, name


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_names_and_shapes_are_the_references(name):
    ours = [(k, list(v.shape)) for k, v in create_model(name, num_classes=1000).state_dict().items()]
    assert ours == list(SHAPES[name].items())  # same keys, same order, same shapes (BN buffers included)


# ------------------------------------------------------------------ a reference state dict loads, same logits
@pytest.mark.parametrize("name", MODELS)
def test_reference_file_loads_strictly_with_the_same_logits(name, tmp_path):
    sd = reference_state_dict(name)
    torch.save(sd, tmp_path / f"{name}.pth")
    loaded = torch.load(tmp_path / f"{name}.pth", map_location="cpu", weights_only=True)
    model = create_model(name, num_classes=1000)
    missing, unexpected = model.load_state_dict(loaded, strict=True)
    assert not missing and not unexpected
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in sd.items())  # every tensor is the one given
    model.eval()
    for size, side in ((224, 7), (32, 1)):
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            feat = model.forward_features(x)
            logits = model(x)
            assert feat.shape == (2, NUM_FEATURES[name], side, side)
            torch.testing.assert_close(model.forward_head(feat), logits, rtol=0, atol=0)
            assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
            _close(logits, by_hand(name, sd, x))


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_logits_are_torchvision_models_own_bit_for_bit(name):
    """The zoo's ResNets are torchvision's: ``torchvision.models.NAME`` and fmkt's, given one state dict (strictly),
    have the same names and shapes (the fixture's too) and the same logits and features, bit for bit."""
    import torchvision

    sd = reference_state_dict(name, seed=3)
    theirs = getattr(torchvision.models, name)(weights=None, num_classes=1000).eval()
    ours = create_model(name, num_classes=1000).eval()
    assert [(k, list(v.shape)) for k, v in theirs.state_dict().items()] == list(SHAPES[name].items())
    for model in (theirs, ours):
        missing, unexpected = model.load_state_dict(sd, strict=True)
        assert not missing and not unexpected
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(4))  # a 3 x 3 last map
    with torch.no_grad():
        want = theirs(x)
        assert torch.equal(ours(x), want)
        trunk = nn.Sequential(*list(theirs.children())[:-2])  # torchvision's modules up to layer4
        assert torch.equal(ours.forward_features(x), trunk(x))
    assert float(want.std()) > 0  # not a constant output that any model would match


@pytest.mark.parametrize("name,factory", [("resnet18", resnet18), ("resnet34", resnet34), ("resnet50", resnet50),
                                          ("mobilenet_v1", mobilenet_v1)])
def test_interface_classes_channels_and_sizes(name, factory):
    model = factory()
    assert model.num_features == NUM_FEATURES[name]
    clf = model.get_classifier()
    assert isinstance(clf, nn.Linear) and (clf.in_features, clf.out_features) == (NUM_FEATURES[name], 1000)
    grey = create_model(name, num_classes=10, in_channels=1).eval()
    assert next(m for m in grey.modules() if isinstance(m, nn.Conv2d)).in_channels == 1
    with torch.no_grad():
        for size in (32, 45):
            out = grey(torch.rand(2, 1, size, size))
            assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_train_step_at_32x32():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10).train()
    F.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.arange(4)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------ torchvision teachers, through fmkt's loader
@pytest.mark.parametrize("layout", ["plain", "ddp"])
def test_torchvision_teacher_file_loads_through_load_teacher(tmp_path, layout):
    """``torch.save(torchvision.models.resnet34(...).state_dict(), "resnet34.pth")``, as it is or as a DDP
    training checkpoint ({"state_dict": {"module." + key: ...}, "epoch": ...})."""
    sd = reference_state_dict("resnet34")
    path = tmp_path / "resnet34.pth"
    torch.save(sd if layout == "plain" else {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 90},
               path)
    size = 224 if layout == "plain" else 64
    teacher, info = load_teacher(path, arch="resnet34", num_classes=1000, in_channels=3, mean=IMAGENET_MEAN,
                                 std=IMAGENET_STD, input_size=(size, size))
    assert info["sha256"] == sha256_file(path) and info["arch"] == "resnet34"
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        _close(teacher(x), resnet_forward(sd, (x - mean) / std))  # raw [0, 1] images in, normalised inside


def test_distill_with_a_torchvision_teacher_file(tmp_path, monkeypatch):
    """``fmkt-cli distill --teacher resnet34.pth --teacher-arch resnet34``: torchvision's names, with the head a
    torchvision resnet34(num_classes=100) has, on 100-class 32x32 data."""
    monkeypatch.syspath_prepend(str(FIXTURES))
    shapes = {**SHAPES["resnet34"], "fc.weight": [100, 512], "fc.bias": [100]}
    path = tmp_path / "resnet34.pth"
    torch.save(reference_state_dict("resnet34", shapes=shapes), path)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["distill", "--teacher", str(path), "--teacher-arch", "resnet34", "--student",
                                 "resnet8", "--data", "custom_nets:tiny_cifar100", "--epochs", "1", "--batch-size",
                                 "16", "--set", "method.train_steps=1", "--eval-steps", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "artifact" / "fmkt.json").read_text())
    assert meta["teacher"]["sha256"] == sha256_file(path) and meta["teacher"]["arch"] == "resnet34"
