"""The student artifact: a folder with ``model.safetensors`` and ``fmkt.json``; never the teacher.

``fmkt.json`` holds everything needed to rebuild and use the model without the training config:
architecture, encoder, schedule, classes, input shape and normalisation, method, train steps, metrics per K,
dataset, fmkt version, sha256 of the weights (verified on load) and of the teacher's weights.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fmkt import __version__
from fmkt.errors import FmktError
from fmkt.io import atomic_dir, sha256_file
from fmkt.adapter import ModuleAdapter, create_backbone
from fmkt.student import DeployableModel

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "fmkt.json"


def model_spec(model: DeployableModel, arch: str, in_channels: int, input_size, encoder_name: str | None,
               encoder_params: dict | None = None, arch_kwargs: dict | None = None) -> dict:
    """The architecture part of fmkt.json: enough to rebuild ``model`` with ``build_model``.

    ``arch`` is a zoo name or an import path ``pkg.module:factory``; for the latter, ``adapter`` records where the
    feature map and the head were found (see fmkt.adapter), and the module must be importable where it is loaded.
    """
    adapter = model.backbone.options if isinstance(model.backbone, ModuleAdapter) else None
    return {
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        **({"adapter": adapter} if adapter is not None else {}),
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "encoder": encoder_name if model.is_flow else None,
        "encoder_params": dict(encoder_params or {}),
        "schedule": model.schedule_name,
        "transfer": model.transfer,
        "theta_head": model.theta_head is not None,
        "default_steps": model.default_steps,  # K when model(x) is called without steps
        "input": {
            "channels": in_channels,
            "size": list(input_size),
            "range": [0.0, 1.0],
            "mean": model.normalize.mean.flatten().tolist(),
            "std": model.normalize.std.flatten().tolist(),
            "normalisation": "inside the model: pass raw images in [0, 1]",
        },
    }


def build_model(spec: dict, default_steps: int = 1) -> DeployableModel:
    """The model ``spec`` describes; ``default_steps`` is used only when the spec predates its own key."""
    backbone = create_backbone(spec["arch"], num_classes=spec["num_classes"], in_channels=spec["input"]["channels"],
                               input_size=spec["input"]["size"], options=spec.get("adapter"),
                               check_head=spec.get("encoder") is not None, **spec.get("arch_kwargs", {}))
    return DeployableModel(
        backbone, spec["input"]["mean"], spec["input"]["std"],
        encoder=spec.get("encoder"), encoder_kwargs=spec.get("encoder_params") or {},
        schedule=spec.get("schedule", "rectified"), theta_head=spec.get("theta_head", False),
        transfer=spec.get("transfer", "logits"), default_steps=int(spec.get("default_steps", default_steps)),
    )


def save_artifact(path: str | Path, model: DeployableModel, spec: dict, info: dict) -> Path:
    """Write the artifact folder atomically; ``info`` adds method, metrics, dataset, teacher sha256, ...

    Returns the folder path. The weights' sha256 is recorded so a tampered file is refused on load.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(path) as tmp:
        # one metadata key: safetensors writes its metadata map in hash order, so two keys would make the bytes
        # (and the sha256) of identical weights differ from run to run; the fmkt version is in fmkt.json
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        meta = {
            "format": "fmkt-artifact",
            "format_version": FORMAT_VERSION,
            "fmkt_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": spec,
            **info,
            "weights_sha256": sha256_file(tmp / WEIGHTS),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return path


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / META
    if not path.exists():
        raise FmktError(f"artifact {path} does not exist.")
    if not path.is_dir() or not meta_path.is_file():
        raise FmktError(f"{path} is not an fmkt artifact: expected a folder holding {META} and {WEIGHTS}.")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FmktError(f"{meta_path} is not valid JSON ({exc}); the artifact is damaged.") from None
    if not isinstance(meta, dict) or meta.get("format") != "fmkt-artifact" or "model" not in meta:
        raise FmktError(f"{meta_path} is not an fmkt artifact description.")
    return meta


def load_artifact(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[DeployableModel, dict]:
    """Rebuild the model from ``fmkt.json``, verify the weights' sha256, load them (strict)."""
    path = Path(path)
    meta = read_meta(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FmktError(f"artifact {path} has no {WEIGHTS}.")
    expected = meta.get("weights_sha256")
    if expected and sha256_file(weights) != expected:
        raise FmktError(f"{weights} does not match the sha256 recorded in {META}; the file was changed or damaged.")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise FmktError(f"cannot read {weights} ({exc}).") from None
    # artifacts written before fmkt.json recorded default_steps: the largest training N, as the engine set it
    model = build_model(meta["model"], default_steps=(meta.get("train_steps") or [1])[-1])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FmktError(f"{weights} does not fit the architecture in {META} ({str(exc).splitlines()[0]}).") from None
    return model.eval(), meta


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / META).is_file()
