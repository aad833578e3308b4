"""torchvision detectors by name or import path, teacher weights from a file, and one batch's FPN maps.

``create_detector(name, num_classes, min_size=, max_size=, weights=None)`` builds a torchvision detector with
``weights=None`` and ``weights_backbone=None`` always (nothing is downloaded), so a fresh one has plain
``BatchNorm2d`` and every backbone layer trainable, as torchvision builds an untrained model. With ``weights`` (a
``.safetensors`` or ``.pt``/``.pth`` state dict under torchvision's own key names, read with ``weights_only=True``)
it is a teacher: its BatchNorm layers become ``FrozenBatchNorm2d`` (what torchvision's pretrained detectors use, so
their files, which hold no ``num_batches_tracked``, load as they are, and so does a file saved from a BatchNorm
model) and the weights load strictly; a mismatch is one sentence naming the missing and unexpected keys. A student
started from an ImageNet classifier file (``detection.backbone_weights``) is this fresh detector, changed afterwards
by :mod:`fmkt.detection.backbone`.

FPN levels (an OrderedDict from the detector's ``backbone``; every level has ``backbone.out_channels`` = 256):
ResNet-FPN Faster R-CNN ``'0', '1', '2', '3', 'pool'`` (P2-P6); RetinaNet ``'0', '1', '2', 'p6', 'p7'`` (P3-P7);
MobileNetV3-Large-FPN Faster R-CNN ``'0', '1', 'pool'`` (three levels, the last two at the same stride).
"""
from __future__ import annotations

import difflib
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fmkt.errors import FmktError
from fmkt.import_paths import call_factory, is_import_path


def _resnet_fpn(depth: str, retina: bool):
    from torchvision.models import resnet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    body = getattr(resnet, depth)(weights=None, norm_layer=nn.BatchNorm2d)
    if retina:  # torchvision's retinanet_resnet50_fpn: P3-P5 from C3-C5, then P6, P7 from P5
        return _resnet_fpn_extractor(body, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return _resnet_fpn_extractor(body, 5)  # P2-P5 + max-pooled P6 ('pool')


def _faster_rcnn(depth: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kwargs) -> nn.Module:
        from torchvision.models.detection import FasterRCNN

        return FasterRCNN(_resnet_fpn(depth, retina=False), num_classes=num_classes, **kwargs)
    return build


def _retinanet(depth: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kwargs) -> nn.Module:
        from torchvision.models.detection import RetinaNet

        return RetinaNet(_resnet_fpn(depth, retina=True), num_classes=num_classes, **kwargs)
    return build


def _mobilenet_v3(num_classes: int, **kwargs) -> nn.Module:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    return fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


#: name -> builder(num_classes, **detector kwargs). ResNet ones are torchvision's builders' bodies (the same module
#: tree and key names as ``fasterrcnn_resnet50_fpn`` / ``retinanet_resnet50_fpn``) with the depth swapped.
DETECTORS: dict[str, Callable[..., nn.Module]] = {
    "fasterrcnn_resnet50_fpn": _faster_rcnn("resnet50"),
    "fasterrcnn_resnet101_fpn": _faster_rcnn("resnet101"),
    "fasterrcnn_resnet18_fpn": _faster_rcnn("resnet18"),
    "fasterrcnn_mobilenet_v3_large_fpn": _mobilenet_v3,
    "retinanet_resnet50_fpn": _retinanet("resnet50"),
    "retinanet_resnet101_fpn": _retinanet("resnet101"),
    "retinanet_resnet18_fpn": _retinanet("resnet18"),
}


def create_detector(name: str, num_classes: int, *, min_size: int, max_size: int, weights=None,
                    **kwargs) -> nn.Module:
    """A detector by registered name or ``pkg.module:factory`` (called with num_classes, min_size, max_size and
    kwargs, those its signature takes); with ``weights`` (a file path) loaded strictly as a frozen-BN teacher.
    ``num_classes`` counts the background (torchvision's convention: 10 object classes -> 11)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise FmktError(f"num_classes must be an integer >= 2 (the object classes plus the background), "
                        f"got {num_classes!r}.")
    opts = dict(min_size=min_size, max_size=max_size, **kwargs)
    if is_import_path(name):
        model = call_factory(name, "detector factory", num_classes=num_classes, **opts)
        if not isinstance(model, nn.Module):
            raise FmktError(f"detector factory {name!r} returned a {type(model).__name__}, not an nn.Module.")
    elif name in DETECTORS:
        model = DETECTORS[name](num_classes, **opts)
    else:
        close = difflib.get_close_matches(name, list(DETECTORS), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise FmktError(f"unknown detector {name!r}; {hint}choose one of {', '.join(DETECTORS)} or give an import "
                        "path pkg.module:factory.")
    if weights is not None:
        freeze_batchnorm(model)
        load_detector_weights(model, weights)
    return model


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` under ``module`` by a ``FrozenBatchNorm2d`` holding its statistics (in place;
    eval-mode outputs are unchanged)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                value = getattr(child, key)
                if value is not None:
                    getattr(frozen, key).copy_(value.detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def load_detector_weights(model: nn.Module, path) -> nn.Module:
    """Load a state-dict file (torchvision's key names) into ``model`` strictly, or one FmktError sentence."""
    from fmkt.teacher import read_state_dict

    path = Path(path)
    if not path.is_file():
        raise FmktError(f"detector weights file {path} does not exist.")
    state = read_state_dict(path)
    own = model.state_dict()  # a BatchNorm model takes its own counters where the file has none
    state = {**{k: v for k, v in own.items() if k.endswith(".num_batches_tracked") and k not in state}, **state}
    missing, unexpected = key_mismatch(model, state)
    if missing or unexpected:
        raise FmktError(f"{path} does not fit the detector: {_few(missing)} missing and {_few(unexpected)} "
                        "unexpected keys; it must be a state dict of this architecture under torchvision's key "
                        "names (model.state_dict()).")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # same keys, other shapes (another num_classes or depth)
        why = str(exc).split("size mismatch for ", 1)[-1].splitlines()[0].strip().rstrip(".")
        raise FmktError(f"{path} does not fit the detector: size mismatch for {why}.") from None
    return model


def key_mismatch(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    """(missing, unexpected) keys of ``state`` against ``model`` (``num_batches_tracked`` is never required:
    FrozenBatchNorm2d has none and drops it on load)."""
    want = set(model.state_dict())
    have = {k for k in state if not (k.endswith(".num_batches_tracked") and k not in want)}
    missing = sorted(k for k in want - have if not k.endswith(".num_batches_tracked"))
    return missing, sorted(have - want)


def _few(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "no"
    shown = ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
    return f"{len(keys)} ({shown})"


def fpn_channels(detector: nn.Module) -> int:
    """The channel count of every FPN level (torchvision's ``backbone.out_channels``; 256 for its FPNs)."""
    channels = getattr(detector_backbone(detector), "out_channels", None)
    if not isinstance(channels, int):
        raise FmktError(f"{type(detector).__name__}'s backbone has no integer out_channels; a torchvision detector "
                        "(GeneralizedRCNN or RetinaNet) with an FPN backbone is needed.")
    return channels


def detector_backbone(detector: nn.Module) -> nn.Module:
    """The detector's own backbone (inside a :class:`fmkt.detection.fpn_flow.RefinedBackbone`, the raw one)."""
    backbone = getattr(detector, "backbone", None)
    if backbone is None:
        raise FmktError(f"{type(detector).__name__} has no backbone; a torchvision detector is needed.")
    return getattr(backbone, "raw", backbone)


def fpn_features(detector: nn.Module, images: list, targets: list | None = None):
    """(ImageList, targets, OrderedDict level -> (B, C, H, W)): the detector's ``transform`` (resize, normalise,
    batch) then its raw backbone, once. Targets are resized with the images (None stays None)."""
    image_list, targets = detector.transform(images, targets)
    feats = detector_backbone(detector)(image_list.tensors)
    if isinstance(feats, torch.Tensor):
        feats = OrderedDict([("0", feats)])
    return image_list, targets, feats
