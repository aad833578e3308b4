"""The student's backbone from an ImageNet classifier file (``detection.backbone_weights``): what torchvision's
``weights_backbone`` does, from a local file instead of a download.

The detector's backbone body (``model.backbone.body``: torchvision's IntermediateLayerGetter over a ResNet, or over a
MobileNetV3's ``features``) takes the classifier's weights under torchvision's key names (``resnet50-0676ba61.pth``,
or a ``.safetensors`` of the same keys; read with ``weights_only=True``). The classifier's head, which the body
lacks (``fc.*`` for a ResNet, ``classifier.*`` for a MobileNet), is ignored; any other missing or unexpected key, or
another shape, is one FmktError sentence. As torchvision builds a detector with ``weights_backbone``: every
BatchNorm of the body becomes a ``FrozenBatchNorm2d`` and only the last ``trainable_layers`` stages train (the
others get ``requires_grad=False``): a ResNet's ``["layer4", "layer3", "layer2", "layer1", "conv1"][:n]`` (with
``bn1`` at 5), a MobileNet's last n of its strided stages (torchvision's ``_resnet_fpn_extractor`` and
``_mobilenet_extractor``). :func:`freeze_backbone` alone is what an artifact's rebuild applies (its spec's
``frozen_backbone_bn`` and ``trainable_backbone_layers``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fmkt.errors import FmktError

RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")  # torchvision's order: the last stage first
HEADS = {"resnet": ("fc.",), "mobilenet": ("classifier.",)}  # the classifier's keys a body has no place for
PREFIX = {"resnet": "", "mobilenet": "features."}  # a body key under the classifier's name
RESNET_DEPTHS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
                 ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}


def backbone_body(detector: nn.Module) -> nn.Module:
    """The detector's backbone body (torchvision's BackboneWithFPN ``.body``), or one sentence saying why not."""
    from fmkt.detection.models import detector_backbone

    body = getattr(detector_backbone(detector), "body", None)
    if not isinstance(body, nn.Module):
        raise FmktError(f"{type(detector).__name__}'s backbone has no .body (torchvision's BackboneWithFPN keeps the "
                        "classifier's layers there), so detection.backbone_weights has nowhere to load an ImageNet "
                        "classifier; build the backbone with torchvision's BackboneWithFPN, or leave the key unset.")
    return body


def body_kind(body: nn.Module) -> str:
    """``resnet`` or ``mobilenet``: the classifier family whose stages the body holds."""
    if isinstance(getattr(body, "conv1", None), nn.Module) and isinstance(getattr(body, "layer1", None), nn.Module):
        return "resnet"
    if any(getattr(block, "_is_cn", False) for block in body.children()):
        return "mobilenet"
    raise FmktError("the detector's backbone body is neither a torchvision ResNet nor a MobileNet feature stack, so "
                    "detection.backbone_weights does not know its stages; leave the key unset for this detector.")


def _mobilenet_stages(body: nn.Module) -> list[int]:
    """torchvision's stage starts: block 0, every strided block (``_is_cn``), and the last block."""
    blocks = list(body.children())
    return [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]


def max_trainable_layers(body: nn.Module) -> int:
    """The most stages that can train: 5 for a ResNet, the stage count for a MobileNet (6 for V3-Large)."""
    return len(RESNET_STAGES) if body_kind(body) == "resnet" else len(_mobilenet_stages(body))


def check_trainable_layers(body: nn.Module, trainable_layers) -> int:
    top = max_trainable_layers(body)
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= top:
        raise FmktError(f"detection.trainable_backbone_layers must be an integer from 0 to {top} (the stages of this "
                        f"{body_kind(body)} body that train, the last first), got {trainable_layers!r}.")
    return trainable_layers


def frozen_parameters(body: nn.Module, trainable_layers: int) -> list[nn.Parameter]:
    """The body's parameters torchvision freezes when only the last ``trainable_layers`` stages train."""
    if body_kind(body) == "resnet":
        train = RESNET_STAGES[:trainable_layers] + (("bn1",) if trainable_layers == 5 else ())
        return [p for name, p in body.named_parameters() if not name.startswith(train)]
    blocks, stages = list(body.children()), _mobilenet_stages(body)
    before = len(blocks) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
    return [p for block in blocks[:before] for p in block.parameters()]


def freeze_backbone(detector: nn.Module, trainable_layers: int) -> nn.Module:
    """In place: the body's BatchNorm as ``FrozenBatchNorm2d`` and its parameters outside the last
    ``trainable_layers`` stages with ``requires_grad=False`` (the module tree an artifact's spec rebuilds)."""
    from fmkt.detection.models import freeze_batchnorm

    body = backbone_body(detector)
    check_trainable_layers(body, trainable_layers)
    freeze_batchnorm(body)
    for p in frozen_parameters(body, trainable_layers):
        p.requires_grad_(False)
    return detector


def load_backbone_weights(detector: nn.Module, path) -> nn.Module:
    """The body's weights from an ImageNet classifier file (its head ignored), or one FmktError sentence."""
    from fmkt.teacher import read_state_dict

    path = existing(path)
    body = backbone_body(detector)
    fitted = fitted_state(body, read_state_dict(path), path)
    body.load_state_dict({**body.state_dict(), **fitted}, strict=True)  # a BatchNorm body keeps its own counters
    return detector


def existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FmktError(f"detection.backbone_weights {path} does not exist; give an ImageNet classifier's state-dict "
                        "file (torchvision's resnet50-0676ba61.pth, or a .safetensors of the same keys).")
    return path


def with_backbone_weights(detector: nn.Module, path, trainable_layers: int) -> nn.Module:
    """``detector`` as torchvision's ``weights_backbone`` builds it, the weights from ``path`` (in place)."""
    return load_backbone_weights(freeze_backbone(detector, trainable_layers), path)


def fitted_state(body: nn.Module, state: dict, path) -> dict:
    """``state`` (a classifier's, torchvision's names) under the body's key names, every key and shape checked
    (``num_batches_tracked`` is never needed: FrozenBatchNorm2d has none)."""
    kind = body_kind(body)
    own = {k: v for k, v in body.state_dict().items() if not k.endswith(".num_batches_tracked")}
    have = {k for k in state if not k.endswith(".num_batches_tracked") and not k.startswith(HEADS[kind])}
    want = {PREFIX[kind] + k: k for k in own}
    missing, unexpected = sorted(set(want) - have), sorted(have - set(want))
    if missing or unexpected:
        raise FmktError(f"{path} does not fit the detector's backbone ({describe(own)}): {_few(missing)} missing and "
                        f"{_few(unexpected)} unexpected keys; it seems to be {describe(state)}. Give the ImageNet "
                        "classifier of the body's architecture under torchvision's key names.")
    odd = [k for k, name in want.items() if tuple(state[k].shape) != tuple(own[name].shape)]
    if odd:
        k = odd[0]
        raise FmktError(f"{path} does not fit the detector's backbone ({describe(own)}): {len(odd)} keys have other "
                        f"shapes, first {k} ({tuple(state[k].shape)} in the file, {tuple(own[want[k]].shape)} in the "
                        f"body); it seems to be {describe(state)}.")
    return {name: state[k] for k, name in want.items()}


def describe(state) -> str:
    """What a state dict's keys look like: ``a ResNet-50``, ``a MobileNet``, a whole detector's, ..."""
    keys = [k[len("features."):] if k.startswith("features.") else k for k in state]
    if any(k.startswith("backbone.body.") for k in keys):
        return "a whole detector's state dict (backbone.body.* keys), not an ImageNet classifier's"
    if any(k.startswith("layer1.") for k in keys):
        blocks = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        depth = RESNET_DEPTHS.get((blocks, any(".conv3." in k for k in keys)))
        return f"a ResNet-{depth}" if depth else f"a ResNet with {list(blocks)} blocks per stage"
    if keys and all(k.split(".")[0].isdigit() or k.startswith("classifier.") for k in keys):
        return f"a MobileNet-like stack of {len({k.split('.')[0] for k in keys if k[0].isdigit()})} blocks"
    return f"a state dict of {len(keys)} keys ({', '.join(list(state)[:2])}, ...)"


def _few(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "no"
    return f"{len(keys)} ({', '.join(keys[:n])}{f' and {len(keys) - n} more' if len(keys) > n else ''})"


def weights_record(path, trainable_layers: int) -> dict:
    """fmkt.json's ``backbone_weights``: the file's name and sha256, and the stages that trained."""
    from fmkt.files import sha256_file

    path = Path(path)
    return {"name": path.name, "sha256": sha256_file(path), "trainable_layers": trainable_layers}


def check_backbone_weights(name: str, path, trainable_layers, **build) -> None:
    """Up front, nothing allocated: ``name``'s detector (built on the meta device) has a body of known stages,
    ``trainable_layers`` is in range for it, and ``path`` fits it key for key and shape for shape."""
    from fmkt.detection.models import create_detector
    from fmkt.teacher import read_state_dict

    path = existing(path)
    try:
        with torch.device("meta"):
            detector = create_detector(name, 2, **build)
    except (RuntimeError, NotImplementedError):  # a factory that needs real tensors to build
        detector = create_detector(name, 2, **build)
    body = backbone_body(detector)
    check_trainable_layers(body, trainable_layers)
    fitted_state(body, read_state_dict(path), path)
