"""The shipped recipes: the CIFAR-100 and ImageNet ones are what scripts/make_recipes.py writes from PUBLISHED and
PUBLISHED_IMAGENET (the authors' published settings, each with its source), and every shipped recipe runs:
`fmkt-cli distill --config NAME` on a tiny dataset of its kind for one epoch of a few steps."""
import dataclasses
import importlib.util
import json
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fmkt.cli.app import app
from fmkt.commands import check_method_names, configure
from fmkt.config import Config, DataConfig, apply_overrides, build_config, recipe_names
from fmkt.data import list_datasets
from fmkt.distillers.published import CIFAR100_PAIRS, IMAGENET_PAIRS, PUBLISHED, PUBLISHED_IMAGENET
from fmkt.models import create_model

ROOT = Path(__file__).resolve().parents[1]
MIRROR = Path("/work/.mirror")


def _script():
    spec = importlib.util.spec_from_file_location("make_recipes", ROOT / "scripts" / "make_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_published_recipes_are_what_the_script_writes():
    expected = _script().expected()
    shipped = {p.name: p.read_text() for pattern in ("cifar100_*.yaml", "imagenet_*.yaml")
               for p in (ROOT / "fmkt" / "recipes").glob(pattern)}
    assert sorted(shipped) == sorted(expected), "run `python scripts/make_recipes.py`"
    stale = [name for name, text in expected.items() if shipped[name] != text]
    assert stale == [], f"edited by hand or PUBLISHED changed: run `python scripts/make_recipes.py` ({stale})"
    for name, text in expected.items():
        assert re.search(r"^# Source: .*(@[0-9a-f]{40}|docs/method\.md)", text, re.M), name


# The published numbers, transcribed once more by hand from the authors' files (see PUBLISHED's sources), so a slip
# in PUBLISHED fails here. Per pair in CIFAR100_PAIRS order: resnet32x4/8x4, wrn_40_2/16_2, resnet56/20, vgg13/8.
WANT = {
    "kd": [dict(ce_weight=0.1, loss_weight=0.9, loss_params={"temperature": 4.0})] * 4,
    "dkd": [dict(ce_weight=1.0, loss_weight=1.0, dkd_warmup_epochs=20.0,
                 loss_params={"alpha": 1.0, "beta": b, "temperature": 4.0}) for b in (8.0, 6.0, 2.0, 6.0)],
    "dist": [dict(ce_weight=1.0, loss_weight=2.0, loss_params={"beta": 1.0, "gamma": 1.0, "tau": 4.0})] * 4,
    "kd+ls": [dict(ce_weight=0.1, loss_weight=9.0, logit_standardization=True, loss_params={"temperature": t})
              for t in (2.0, 2.0, 2.0, 3.0)],
    "dkd+ls": [dict(ce_weight=1.0, loss_weight=1.0, logit_standardization=True, dkd_warmup_epochs=20.0,
                    loss_params={"alpha": w, "beta": b * w, "temperature": t})
               for t, w, b in ((2.0, 9.0, 8.0), (2.0, 12.0, 2.0), (3.0, 18.0, 2.0), (2.0, 15.0, 2.0))],
    "fmkt": [dict(loss="dist", train_steps="8", schedule="rectified",
                  loss_params={"beta": 2.0, "gamma": 2.0, "tau": 1.0})] * 4,
    "fmkt+ls": [dict(loss="dist", train_steps="8", logit_standardization=True)] * 4,
}
SOLVER = {"mdistiller": dict(batch=64, nesterov=False), "fmkt": dict(batch=128, nesterov=True)}


@pytest.mark.parametrize("key", list(PUBLISHED))
def test_published_settings_are_the_authors(key):
    assert set(PUBLISHED) == set(WANT)
    entry = PUBLISHED[key]
    assert set(entry.per_pair) <= set(CIFAR100_PAIRS) and entry.source
    for (teacher, student), want in zip(CIFAR100_PAIRS, WANT[key]):
        cfg = apply_overrides(Config(), entry.overrides(teacher, student))
        check_method_names(cfg.method)
        got = {k: getattr(cfg.method, k) for k in want}
        assert got == want, (key, teacher, student)
        assert cfg.method.logit_standardization is key.endswith("+ls")
        solver = SOLVER["fmkt" if key.startswith("fmkt") else "mdistiller"]
        assert (cfg.data.batch_size, cfg.optim.nesterov) == (solver["batch"], solver["nesterov"])
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum) == (0.05, 5e-4, 0.9)
        assert (cfg.optim.scheduler, cfg.optim.milestones, cfg.optim.gamma) == ("multistep", [150, 180, 210], 0.1)
        assert cfg.train.epochs == 240 and (cfg.teacher.arch, cfg.student) == (teacher, student)


# The same for ImageNet, per pair in IMAGENET_PAIRS order: resnet34/18, resnet50/mobilenet_v1 (mdistiller's
# configs/imagenet/{r34_r18,r50_mv1}/{kd,dkd}.yaml and cfg.py; DIST's configs/strategies/distill/resnet_dist.yaml).
WANT_IMAGENET = {
    "kd": [dict(ce_weight=0.5, loss_weight=0.5, loss_params={"temperature": 1.0})] * 2,
    # WARMUP 1 counted from epoch 1 (mdistiller's trainer) is a factor of 1 from the first step: warm-up 0 here
    "dkd": [dict(ce_weight=1.0, loss_weight=1.0, dkd_warmup_epochs=0.0,
                 loss_params={"alpha": 1.0, "beta": b, "temperature": 1.0}) for b in (0.5, 2.0)],
    "dist": [dict(ce_weight=1.0, loss_weight=2.0, loss_params={"beta": 1.0, "gamma": 1.0, "tau": 1.0})] * 2,
    "fmkt": [dict(loss="dist", train_steps="8", schedule="rectified",
                  loss_params={"beta": 2.0, "gamma": 2.0, "tau": 1.0})] * 2,
}
# (batch, lr, Nesterov): mdistiller 512 / 0.2 / no; DIST 32 x 8 GPUs / 0.1 / yes; fmkt: mdistiller's with Nesterov
SOLVER_IMAGENET = {"kd": (512, 0.2, False), "dkd": (512, 0.2, False), "dist": (256, 0.1, True),
                   "fmkt": (512, 0.2, True)}


@pytest.mark.parametrize("key", list(PUBLISHED_IMAGENET))
def test_imagenet_published_settings_are_the_authors(key):
    assert set(PUBLISHED_IMAGENET) == set(WANT_IMAGENET) == set(SOLVER_IMAGENET)
    entry = PUBLISHED_IMAGENET[key]
    assert set(entry.per_pair) <= set(IMAGENET_PAIRS) and entry.source
    for (teacher, student), want in zip(IMAGENET_PAIRS, WANT_IMAGENET[key]):
        cfg = apply_overrides(Config(), entry.overrides(teacher, student))
        check_method_names(cfg.method)
        assert {k: getattr(cfg.method, k) for k in want} == want, (key, teacher, student)
        assert (cfg.data.batch_size, cfg.optim.lr, cfg.optim.nesterov) == SOLVER_IMAGENET[key]
        assert (cfg.optim.name, cfg.optim.weight_decay, cfg.optim.momentum) == ("sgd", 1e-4, 0.9)
        assert (cfg.optim.scheduler, cfg.optim.milestones, cfg.optim.gamma) == ("multistep", [30, 60, 90], 0.1)
        assert cfg.train.epochs == 100 and (cfg.teacher.arch, cfg.student) == (teacher, student)


def _imagenet_missing() -> str | None:
    """What the ImageNet recipes need from the data stage and this checkout lacks (None: nothing)."""
    if "imagefolder" not in list_datasets():
        return "the `imagefolder` dataset is not registered in fmkt.data yet"
    if "image_size" not in {f.name for f in dataclasses.fields(DataConfig)}:
        return "the config key data.image_size does not exist yet"
    return None


def _tiny_image_folder(root: Path) -> Path:
    """ROOT/{train,val}/CLASS/*.png: two classes, one 40x40 RGB image each (what configure opens and scans)."""
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            (root / split / cls).mkdir(parents=True)
            image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / split / cls / "0.png")
    return root


@pytest.mark.parametrize("name", [n for n in recipe_names() if n.startswith("imagenet_") and "_deit" not in n])
def test_imagenet_recipes_parse_and_validate(name, tmp_path):  # the DeiT ones: tests/test_deit_recipe.py
    missing = _imagenet_missing()
    if missing:
        pytest.skip(f"{name}: {missing}")
    # types, ranges and every name against its registry, on a (tiny) folder of the ImageNet layout
    cfg = configure(name, [{"data": {"dir": str(_tiny_image_folder(tmp_path / "imagenet"))}}])
    assert (cfg.data.name, cfg.data.image_size) == ("imagefolder", 224)
    assert (cfg.teacher.arch, cfg.student) in IMAGENET_PAIRS
    assert cfg.train.epochs == 100 and cfg.optim.milestones == [30, 60, 90]
    assert cfg.teacher.lr == pytest.approx(0.1 * cfg.data.batch_size / 256)  # torchvision's lr per image


@pytest.mark.skipif(not MIRROR.is_dir(), reason="the authors' repositories are not mirrored here")
def test_every_per_pair_source_file_exists_at_its_commit():
    for key, entry in [*PUBLISHED.items(), *PUBLISHED_IMAGENET.items()]:
        for pair in entry.per_pair.values():
            repo, rest = pair.source.split("@", 1)
            commit, path = rest.split(": ", 1)
            git = MIRROR / repo.replace("/", "+") / "repo"
            if not git.is_dir():
                pytest.skip(f"{repo} is not mirrored here")
            found = subprocess.run(["git", "-C", str(git), "cat-file", "-e", f"{commit}:{path.split(' (')[0]}"])
            assert found.returncode == 0, (key, pair.source)


# ------------------------------------------------------------------ every shipped recipe runs
runner = CliRunner()
TINY = ["--epochs", "1", "--batch-size", "8", "--set", "data.train_subset=16", "--set", "data.test_subset=8",
        "--set", "data.eval_batch_size=8", "--set", "method.train_steps=2", "--eval-steps", "1"]  # 2 steps
SPEED = {"method.train_steps", "method.eval_steps"}  # the recipe keys TINY changes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions run fastest on one thread (and do not fight a busy machine's other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cifar100(root: Path) -> Path:
    """The python-pickle layout fmkt reads: cifar-100-python/{train,test,meta}, random 32x32x3 images."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("test", 100)):
        fine = [int(v) for v in np.arange(n) % 100]
        entry = {b"filenames": [f"{split}_{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
                 b"fine_labels": fine, b"coarse_labels": [v // 5 for v in fine],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (folder / split).write_bytes(pickle.dumps(entry))
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return root


def _idx(folder: Path) -> Path:
    """The four IDX files of (Fashion-)MNIST, random 28x28 images."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        for kind, arr in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                          ("labels-idx1", (np.arange(n) % 10).astype(np.uint8))):
            header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            (folder / f"{prefix}-{kind}-ubyte").write_bytes(header + arr.tobytes())
    return folder


def _imagefolder(folder):
    from imagefolder_data import make_image_folder  # tests/imagefolder_data.py: real PNG/JPEG digits, 32 x 32

    return make_image_folder(folder, train_per_class=4, val_per_class=2)


# per dataset a recipe may name: (its data folder or None for a built-in one, classes, channels)
DATASETS = {"cifar100": (_cifar100, 100, 3), "fashion-mnist": (_idx, 10, 1), "digits": (None, 10, 1),
            "imagefolder": (_imagefolder, 10, 3)}
EXTRA = {"imagefolder": ["--set", "data.image_size=32", "--set", "data.workers=0"]}  # 224 x 224 is for real runs
VIT_32 = ["--set", "student_kwargs.img_size=32", "--set", "student_kwargs.patch_size=4"]  # a timm ViT at 32 x 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """{dataset: (data dir or None, a resnet8 teacher's state-dict file)}, made once for every recipe."""
    root, out = tmp_path_factory.mktemp("recipe-data"), {}
    for name, (make, classes, channels) in DATASETS.items():
        torch.manual_seed(0)
        teacher = root / f"{name}-teacher.pt"
        torch.save(create_model("resnet8", num_classes=classes, in_channels=channels).state_dict(), teacher)
        out[name] = (make(root / name) if make else None, teacher)
    return out


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_runs(name, data, tmp_path):
    if name.startswith("imagenet_") and (_imagenet_missing() or "imagefolder" not in DATASETS):
        pytest.skip(f"{name}: {_imagenet_missing() or 'no tiny imagefolder in DATASETS to run it on yet'}")
    recipe = build_config(name)
    if recipe.task == "detection":
        pytest.skip(f"{name}: a detection recipe, run on a tiny COCO layout by tests/test_detection_run.py")
    assert recipe.data.name in DATASETS, f"recipe {name}: add a tiny {recipe.data.name} folder to DATASETS"
    data_dir, teacher = data[recipe.data.name]
    out = tmp_path / "run"
    args = ["distill", "--config", name, "--out", out, "--teacher", teacher, "--teacher-arch", "resnet8", *TINY]
    args += EXTRA.get(recipe.data.name, [])
    if recipe.student.startswith("timm:"):
        args += VIT_32  # the per-image keys stay on (tests/test_deit_pipeline.py)
    result = runner.invoke(app, [str(a) for a in args + (["--data-dir", data_dir] if data_dir else [])])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    want = {k: v for k, v in recipe.method.__dict__.items() if f"method.{k}" not in SPEED}
    assert {k: resolved["method"][k] for k in want} == want  # the recipe's settings are what ran
    assert (resolved["student"], resolved["optim"]) == (recipe.student, recipe.optim.__dict__)
    meta = json.loads((out / "artifact" / "fmkt.json").read_text())
    assert meta["method"] == recipe.method.name
