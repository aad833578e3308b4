"""Loading teachers: our own artifacts, or plain state-dict files (.pt/.pth with weights_only=True, .safetensors).

A state-dict file is loaded strictly into ``arch``: a zoo name or a user's ``pkg.module:factory`` (whose own key
names the file then holds). The CIFAR zoo uses mdistiller/RepDistiller's parameter names, so their published
teachers (``{"model": state_dict, "accuracy": ..., "epoch": ..., "optimizer": ...}``) load as they are; a file
with other names loads through ``key_map``, prefix renames applied after the ``module.`` prefix is dropped.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from torch import nn

from fmkt.artifact import WEIGHTS, is_artifact, load_artifact, weights_sha256
from fmkt.errors import FmktError, first_line
from fmkt.files import sha256_file
from fmkt.models.adapter import unwrap
from fmkt.student import DeployableModel, StudentSpec, build_student


def read_state_dict(path: Path, key_map: dict | None = None) -> dict:
    """A state dict from .safetensors, or from .pt/.pth (plain, or under a 'model'/'state_dict' key beside any
    other entries such as 'epoch', 'accuracy' or 'optimizer'); ``key_map`` renames key prefixes {old: new}."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise FmktError(f"cannot read {path} as safetensors ({exc}).") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        if "Weights only load failed" in str(exc):  # torch's own text is a page long
            raise FmktError(f"cannot read {path} as a PyTorch weights file: it holds Python objects other than "
                            "tensors, which are never unpickled (weights_only=True); save model.state_dict() "
                            "instead.") from None
        first = first_line(exc, None, with_type=False) or type(exc).__name__
        first = first.split(". ")[0].rstrip(".")
        raise FmktError(f"cannot read {path} as a PyTorch weights file ({first[:200]}); it is truncated or not "
                        "a state dict saved with torch.save (read with weights_only=True).") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FmktError(f"{path} does not hold a state dict of tensors (also looked under 'model' and 'state_dict').")
    # Checkpoints saved from DataParallel/DDP prefix every key with 'module.'.
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return map_keys(obj, key_map) if key_map else obj


def map_keys(state: dict, key_map: dict) -> dict:
    """Rename key prefixes: {"old.": "new."} turns "old.x" into "new.x" (the longest matching prefix wins)."""
    prefixes = sorted(key_map, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        old = next((p for p in prefixes if key.startswith(p)), None)
        out[key if old is None else key_map[old] + key[len(old):]] = value
    return out


def teacher_sha256(path: str | Path | None = None, module: nn.Module | None = None) -> str:
    """The one definition of a teacher's sha256: that of the file its weights came from (a teacher artifact's
    ``model.safetensors``, a .pt/.pth or .safetensors file); for a teacher that was never a file (the Python API's
    module) that of the bytes an artifact would hold for it (``fmkt.artifact.weights_sha256``), so the same teacher
    saved as an artifact later hashes the same."""
    if path is not None:
        path = Path(path)
        return sha256_file(path / WEIGHTS if path.is_dir() else path)
    return weights_sha256(module)


def load_teacher(path: str | Path, *, arch: str, num_classes: int, in_channels: int, mean, std,
                 device="cpu", input_size=(32, 32), options: dict | None = None,
                 key_map: dict | None = None, arch_kwargs: dict | None = None) -> tuple[DeployableModel, dict]:
    """Returns (frozen teacher in eval mode, fmkt.json's teacher record {"sha256", "arch", "source", "accuracy"}).

    ``input_size`` (H, W) sizes the dry run of an import-path or timm ``arch``; ``options`` its feature_layer/
    classifier (timm: z1); ``arch_kwargs`` the keyword arguments of its factory (timm: img_size, patch_size, ...).
    """
    path = Path(path)
    if not path.exists():
        raise FmktError(f"teacher {path} does not exist.")
    if path.is_dir():
        model, record = _teacher_artifact(path, in_channels)
    else:
        spec = StudentSpec(arch=arch, num_classes=num_classes, channels=in_channels, size=tuple(input_size),
                           mean=tuple(mean), std=tuple(std), adapter=options or None,
                           arch_kwargs=dict(arch_kwargs or {}))
        model = build_student(spec)
        _load_weights(model, read_state_dict(path, key_map), path, arch, num_classes, in_channels)
        record = {"sha256": teacher_sha256(path), "arch": arch, "source": str(path), "accuracy": None}
    bad = next((k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()),
               None)
    if bad is not None:  # a diverged teacher would only surface later as a NaN loss
        raise FmktError(f"teacher {path} has NaN or Inf weights (first in {bad}); pass a teacher that trained "
                        "without diverging.")
    if model.num_classes != num_classes:
        raise FmktError(f"teacher {path} predicts {model.num_classes} classes but the data has {num_classes}.")
    if model.is_flow:
        raise FmktError(f"teacher {path} is an FM-KT student artifact; pass a plain (trained with `train`) teacher.")
    model.eval().requires_grad_(False)
    return model.to(device), record


def _teacher_artifact(path: Path, in_channels: int) -> tuple[DeployableModel, dict]:
    if not is_artifact(path):
        raise FmktError(f"teacher folder {path} is not an fmkt artifact (no fmkt.json); pass the artifact "
                        "folder or a .pt/.pth/.safetensors weights file.")
    model, meta = load_artifact(path)
    channels = meta["model"]["input"]["channels"]
    if channels != in_channels:
        raise FmktError(f"teacher {path} takes {channels}-channel images but the data has {in_channels} channels.")
    return model, {"sha256": teacher_sha256(path), "arch": meta["model"]["arch"], "source": str(path),
                   "accuracy": (meta.get("metrics") or {}).get("last", {}).get("plain")}  # a plain model's key


def _load_weights(model: DeployableModel, state: dict, path: Path, arch: str, num_classes: int,
                  in_channels: int) -> None:
    """Strict load into the backbone (for an import-path model: the user's module, with its own key names)."""
    try:
        unwrap(model.backbone).load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        raise FmktError(f"teacher weights {path} do not fit {arch} with {num_classes} classes and "
                        f"{in_channels} input channels ({lines[1].strip() if len(lines) > 1 else exc}); "
                        "check --teacher-arch and the dataset.") from None
