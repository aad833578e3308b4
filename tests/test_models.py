"""The CIFAR model zoo: registry, uniform interface, mdistiller parameter names/shapes and counts."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fmkt.errors import FmktError
from fmkt.models import create_model, list_models, register_model
from fmkt.models import _registry

FIXTURE = Path(__file__).parent / "fixtures" / "mdistiller_param_shapes.json"

ALL_MODELS = [
    "mobilenetv2", "resnet110", "resnet14", "resnet20", "resnet32", "resnet32x4", "resnet44", "resnet56",
    "resnet8", "resnet8x4", "shufflenetv1", "shufflenetv2", "vgg11", "vgg13", "vgg8",
    "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
]
IMAGENET_MODELS = ["mobilenet_v1", "resnet18", "resnet34", "resnet50"]  # tests/test_imagenet_models.py

# Parameter counts (num_classes=100, 3 input channels) of mdistiller's own definitions
# (mdistiller/models/cifar/*.py; vgg* are its cifar_model_dict entries vgg*_bn).
MDISTILLER_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
}


@functools.lru_cache(maxsize=None)
def _model(name: str, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes, in_channels=in_channels).eval()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_interface(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    with torch.no_grad():
        feat = model.forward_features(x)
        out = model(x)
        head = model.forward_head(feat)
    assert feat.ndim == 4
    assert feat.shape[0] == x.shape[0] and feat.shape[1] == model.num_features
    assert out.shape == (x.shape[0], num_classes)
    torch.testing.assert_close(head, out, rtol=0, atol=0)
    assert torch.isfinite(out).all()


# --- registry -------------------------------------------------------------------------------------


def test_list_models_is_sorted_and_complete():
    names = list_models()
    assert names == sorted(names)
    assert names == sorted(ALL_MODELS + IMAGENET_MODELS)


def test_unknown_model_raises_fmkt_error_listing_known_names():
    with pytest.raises(FmktError) as exc:
        create_model("resnet9000")
    msg = str(exc.value)
    assert "resnet9000" in msg
    for name in list_models():
        assert name in msg
    assert msg.count(".") == 1 and msg.endswith(".")  # one sentence


def test_register_model_registers_by_function_name():
    @register_model
    def _tiny_test_net(num_classes: int = 100, in_channels: int = 3, **kwargs) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    try:
        assert "_tiny_test_net" in list_models()
        model = create_model("_tiny_test_net", num_classes=7)
        assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 7)
    finally:
        _registry._MODELS.pop("_tiny_test_net", None)
    assert "_tiny_test_net" not in list_models()


def test_create_model_passes_kwargs():
    plain = create_model("vgg8", num_classes=10, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    with pytest.raises(TypeError):
        create_model("resnet8", no_such_option=1)


# --- uniform interface ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_interface_3x32x32(name):
    model = _model(name)
    _check_interface(model, torch.randn(2, 3, 32, 32), 100)
    clf = model.get_classifier()
    assert isinstance(clf, nn.Linear)
    assert clf.in_features == model.num_features and clf.out_features == 100


@pytest.mark.parametrize("name", ALL_MODELS)
def test_interface_1x8x8(name):
    model = _model(name, num_classes=10, in_channels=1)
    _check_interface(model, torch.randn(2, 1, 8, 8), 10)
    assert model.get_classifier().out_features == 10
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2"])
@pytest.mark.parametrize("size", [28, 11])
def test_interface_odd_sizes(name, size):
    model = _model(name, num_classes=10, in_channels=1)
    _check_interface(model, torch.randn(2, 1, size, size), 10)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "shufflenetv2"])
def test_train_step_at_8x8(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1).train()
    out = model(torch.randn(4, 1, 8, 8))
    nn.functional.cross_entropy(out, torch.randint(0, 10, (4,))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_vgg_head_is_global_average_pool_then_classifier():
    model = _model("vgg13")
    feat = torch.randn(2, model.num_features, 3, 5)
    with torch.no_grad():
        expected = model.get_classifier()(feat.mean(dim=(2, 3)))
        torch.testing.assert_close(model.forward_head(feat), expected)


# --- fidelity to mdistiller -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_param_count_matches_mdistiller(name):
    assert _n_params(_model(name)) == MDISTILLER_PARAMS[name]


def test_headline_param_counts():
    assert round(MDISTILLER_PARAMS["resnet56"] / 1e6, 2) == 0.86
    assert round(MDISTILLER_PARAMS["resnet32x4"] / 1e6, 2) == 7.43
    for name in ["resnet8x4", "resnet32x4", "wrn_40_2", "resnet56", "vgg13"]:
        assert _n_params(_model(name)) == MDISTILLER_PARAMS[name]


def _fixture() -> dict[str, dict[str, list[int]]]:
    data = json.loads(FIXTURE.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


FIXTURE_MODELS = [
    "resnet32x4", "resnet8x4", "resnet56", "resnet110", "resnet20", "wrn_40_2", "wrn_16_2",
    "vgg13", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2",
]


def test_fixture_covers_the_listed_models():
    assert sorted(_fixture()) == sorted(FIXTURE_MODELS)


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_state_dict_matches_mdistiller(name):
    expected = _fixture()[name]
    sd = _model(name).state_dict()
    ours = [(k, list(v.shape)) for k, v in sd.items()]
    assert ours == list(expected.items())  # same keys, same order, same shapes (BN buffers included)
    # a state_dict with mdistiller's keys and shapes loads strictly
    fresh = create_model(name)
    missing, unexpected = fresh.load_state_dict(
        {k: torch.zeros(shape, dtype=sd[k].dtype) for k, shape in expected.items()}, strict=True
    )
    assert not missing and not unexpected
