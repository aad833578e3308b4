#!/usr/bin/env python
"""The parameter names and shapes of the reference ImageNet models, from their authors' own source files.

Writes the fixtures of ``tests/test_imagenet_models.py`` (which load state dicts of exactly these names and shapes
into fmkt's zoo, strictly, so the names tested are the references', never ours):

- ``tests/fixtures/torchvision_resnet_shapes.json``: torchvision's resnet18, resnet34 and resnet50 with 1000
  classes. ``torchvision/models/resnet.py`` is read from a torchvision wheel (a zip; the wheel is never
  installed: installing it would replace this environment's torch) and executed as the module
  ``torchvision.models.resnet`` with minimal stand-ins for the five torchvision modules it imports
  (``transforms._presets``, ``utils``, ``models._api``, ``models._meta``, ``models._utils``: the weights
  enums, registration decorators and API-usage logging, none of which builds a layer). Its own ``resnet18()`` ...
  then build the models, and ``state_dict()`` gives the names and shapes. Each weights enum's ``num_params``
  (the published checkpoint's parameter count) is recorded beside them as an independent check.
- ``tests/fixtures/mdistiller_mobilenetv1_shapes.json``: mdistiller's ImageNet ``MobileNetV1``
  (``mdistiller/models/imagenet/mobilenetv1.py``, read with ``git show`` from a clone of
  megvii-research/mdistiller; it imports only torch).

Usage::

    python scripts/torchvision_names.py                              # pip download torchvision==0.29.1
    python scripts/torchvision_names.py --wheel torchvision-0.29.1-cp311-cp311-manylinux_2_28_x86_64.whl
    python scripts/torchvision_names.py --mdistiller /path/to/mdistiller/.git --commit a08d46f1

``pip download torchvision==VERSION --no-deps`` needs a package index unless ``--wheel`` is given; the tests that
read the fixtures never do.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
RESNETS = ("resnet18", "resnet34", "resnet50")
MDISTILLER_GIT = Path("/work/.mirror/megvii-research+mdistiller/repo")
MOBILENET_PATH = "mdistiller/models/imagenet/mobilenetv1.py"


def _stub_modules() -> dict[str, types.ModuleType]:
    """Stand-ins for what torchvision/models/resnet.py imports from torchvision: nothing here builds a layer."""

    class Weights:  # torchvision.models._api.Weights: a record of url, transforms and meta
        def __init__(self, url, transforms, meta):
            self.url, self.transforms, self.meta = url, transforms, meta

    class WeightsEnum:  # torchvision's is an Enum; only verify() is called, with weights=None
        @classmethod
        def verify(cls, obj):
            if obj is not None:
                raise ValueError("this script builds the models without weights")
            return obj

    def decorator_factory(*_args, **_kwargs):
        return lambda fn: fn

    mods = {name: types.ModuleType(name) for name in (
        "torchvision", "torchvision.transforms", "torchvision.transforms._presets", "torchvision.utils",
        "torchvision.models", "torchvision.models._api", "torchvision.models._meta", "torchvision.models._utils")}
    for name in ("torchvision", "torchvision.transforms", "torchvision.models"):
        mods[name].__path__ = []  # packages, so resnet.py's relative imports resolve
    mods["torchvision.transforms._presets"].ImageClassification = object
    mods["torchvision.utils"]._log_api_usage_once = lambda obj: None
    api = mods["torchvision.models._api"]
    api.register_model, api.Weights, api.WeightsEnum = decorator_factory, Weights, WeightsEnum
    mods["torchvision.models._meta"]._IMAGENET_CATEGORIES = [f"class{i}" for i in range(1000)]
    utils = mods["torchvision.models._utils"]
    utils.handle_legacy_interface = decorator_factory
    utils._ovewrite_named_param = lambda kwargs, param, value: kwargs.setdefault(param, value)
    return mods


def exec_source(source: str, module_name: str, stubs: dict[str, types.ModuleType]) -> types.ModuleType:
    """Run ``source`` as the module ``module_name`` with ``stubs`` in sys.modules (restored afterwards)."""
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        module = types.ModuleType(module_name)
        module.__package__ = module_name.rpartition(".")[0]
        exec(compile(source, f"<{module_name}>", "exec"), module.__dict__)  # noqa: S102 - the reference source
        return module
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def names_and_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """state_dict key -> shape, in state_dict order (BatchNorm buffers included)."""
    return {key: list(value.shape) for key, value in model.state_dict().items()}


def download_wheel(version: str, folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"torchvision=={version}", "--no-deps", "-d", str(folder)]
    subprocess.run(cmd, check=True)
    return next(folder.glob(f"torchvision-{version}-*.whl"))


def torchvision_fixture(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as z:
        source = z.read("torchvision/models/resnet.py")
        version_py = z.read("torchvision/version.py").decode()
    version = {}
    for line in version_py.splitlines():
        if line.startswith(("__version__", "git_version")):
            key, _, value = line.partition("=")
            version[key.strip()] = value.strip().strip("'\"")
    module = exec_source(source.decode(), "torchvision.models.resnet", _stub_modules())
    out = {
        "_source": "state_dict key -> shape of torchvision's own torchvision/models/resnet.py (resnet18, resnet34, "
                   "resnet50; num_classes=1000, 3 input channels), executed from the wheel below with stand-ins "
                   "for its torchvision imports (scripts/torchvision_names.py)",
        "_made_by": "python scripts/torchvision_names.py",
        "_date": datetime.date.today().isoformat(),
        "_torchvision_version": version.get("__version__"),
        "_torchvision_git_version": version.get("git_version"),
        "_wheel": wheel.name,
        "_wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        "_resnet_py_sha256": hashlib.sha256(source).hexdigest(),
        "_num_params": {},
    }
    for name in RESNETS:
        torch.manual_seed(0)
        model = getattr(module, name)(weights=None, num_classes=1000)
        out[name] = names_and_shapes(model)
        weights = getattr(module, name.replace("resnet", "ResNet") + "_Weights").IMAGENET1K_V1
        out["_num_params"][name] = weights.meta["num_params"]
        assert sum(p.numel() for p in model.parameters()) == weights.meta["num_params"], name
    return out


def mobilenet_fixture(git_dir: Path, commit: str) -> dict:
    full = subprocess.run(["git", "-C", str(git_dir), "rev-parse", commit], check=True, capture_output=True,
                          text=True).stdout.strip()
    source = subprocess.run(["git", "-C", str(git_dir), "show", f"{full}:{MOBILENET_PATH}"], check=True,
                            capture_output=True).stdout
    module = exec_source(source.decode(), "mdistiller_mobilenetv1", {})
    torch.manual_seed(0)
    return {
        "_source": f"state_dict key -> shape of mdistiller's MobileNetV1 (megvii-research/mdistiller@{full}: "
                   f"{MOBILENET_PATH}; 1000 classes, 3 input channels: its fixed values)",
        "_made_by": "python scripts/torchvision_names.py",
        "_date": datetime.date.today().isoformat(),
        "_source_sha256": hashlib.sha256(source).hexdigest(),
        "mobilenet_v1": names_and_shapes(module.MobileNetV1()),
    }


def write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", type=Path, help="a torchvision wheel on disk (default: pip download)")
    parser.add_argument("--version", default="0.29.1", help="torchvision version to pip download")
    parser.add_argument("--mdistiller", type=Path, default=MDISTILLER_GIT, help="git dir of an mdistiller clone")
    parser.add_argument("--commit", default="HEAD", help="mdistiller commit")
    parser.add_argument("--out", type=Path, default=FIXTURES, help="folder of the two fixtures")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(args.version, Path(tmp))
        write(args.out / "torchvision_resnet_shapes.json", torchvision_fixture(wheel))
    write(args.out / "mdistiller_mobilenetv1_shapes.json", mobilenet_fixture(args.mdistiller, args.commit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
