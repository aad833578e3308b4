"""The student artifact: a folder with ``model.safetensors`` and ``fmkt.json``; never the teacher.

``fmkt.json`` holds everything needed to rebuild and use the model without the training config:
architecture, encoder, schedule, classes, input shape and normalisation, method, train steps, metrics per K,
dataset, fmkt version, sha256 of the weights (verified on load) and of the teacher's weights.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from fmkt import __version__
from fmkt.errors import FmktError, first_line
from fmkt.files import atomic_dir, sha256_file
from fmkt.student import DeployableModel, StudentSpec, build_student

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "fmkt.json"


def build_model(spec: dict, default_steps: int = 1) -> DeployableModel:
    """The model fmkt.json's ``"model"`` describes; ``default_steps`` only for files that predate its key."""
    return build_student(StudentSpec.from_json(spec, default_steps))


def weights_bytes(model: nn.Module) -> bytes:
    """The state dict as the safetensors bytes an artifact holds (deterministic: one metadata key, since
    safetensors writes its metadata map in hash order; the fmkt version is in fmkt.json)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save(state, metadata={"format": "pt"})


def weights_sha256(model: nn.Module) -> str:
    """sha256 of ``weights_bytes(model)``: an artifact's ``weights_sha256``, and the teacher hash of a teacher that
    was never a file (the Python API)."""
    return hashlib.sha256(weights_bytes(model)).hexdigest()


def run_record(method, *, dataset: dict, metrics: dict, teacher: dict | None, **extra) -> dict:
    """What fmkt.json says about the run besides the model: method, loss, training steps, dataset, metrics per K,
    teacher; ``method`` is the config's MethodConfig. The one writer of these keys (engine and Python API)."""
    from fmkt.distillers import METHODS

    flow = METHODS[method.name].flow
    return {"method": method.name, "loss": method.loss if flow else method.name,
            "train_steps": method.train_step_choices(), "dataset": dataset, "metrics": metrics, "teacher": teacher,
            **extra}


def save_artifact(path: str | Path, model: DeployableModel, spec: dict, record: dict) -> Path:
    """Write the artifact folder atomically; ``spec``: fmkt.json's "model"; ``record``: the rest (``run_record``).

    Returns the folder path. The weights' sha256 is recorded so a tampered file is refused on load.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        (tmp / WEIGHTS).write_bytes(weights_bytes(model))
        meta = {
            "format": "fmkt-artifact",
            "format_version": FORMAT_VERSION,
            "fmkt_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": spec,
            **record,
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


def read_weights(path: str | Path, meta: dict, map_location: str | torch.device = "cpu") -> dict:
    """The artifact's state dict, after checking its sha256 against ``meta`` (one sentence when it differs)."""
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise FmktError(f"artifact {path} has no {WEIGHTS}.")
    expected = meta.get("weights_sha256")
    if expected and sha256_file(weights) != expected:
        raise FmktError(f"{weights} does not match the sha256 recorded in {META}; the file was changed or damaged.")
    try:
        return load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise FmktError(f"cannot read {weights} ({exc}).") from None


def load_artifact(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[DeployableModel, dict]:
    """Rebuild the model from ``fmkt.json``, verify the weights' sha256, load them (strict)."""
    path = Path(path)
    meta = read_meta(path)
    if isinstance(meta["model"], dict) and meta["model"].get("task", "classification") != "classification":
        raise FmktError(f"{path} is a {meta['model']['task']} artifact; load it with "
                        "fmkt.detection.artifact.load_detector_artifact.")
    state = read_weights(path, meta, map_location)
    weights = path / WEIGHTS
    # artifacts written before fmkt.json recorded default_steps: the last training N, as the engine set it
    model = build_model(meta["model"], default_steps=(meta.get("train_steps") or [1])[-1])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FmktError(f"{weights} does not fit the architecture in {META} "
                        f"({first_line(exc, None, with_type=False)}).") from None
    return model.eval(), meta


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / META).is_file()
