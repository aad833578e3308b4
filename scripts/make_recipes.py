"""Write the CIFAR-100 and ImageNet recipes (fmkt/recipes/cifar100_*.yaml, imagenet_*.yaml) from
fmkt.distillers.published.PUBLISHED and PUBLISHED_IMAGENET (and fmkt.distillers.published_deit.PUBLISHED_DEIT).

    python scripts/make_recipes.py           # (re)write them
    python scripts/make_recipes.py --check   # exit 1 if a shipped file differs from what would be written

One recipe per pair and PUBLISHED entry: ``cifar100_<teacher>_<student>.yaml`` for FM-KT (the paper's recipe) and
``cifar100_<teacher>_<student>_<key>.yaml`` for the others ("kd+ls" -> "_kd_ls"). The numbers live in PUBLISHED;
this script adds only what is ours (the dataset, the evaluation batch and cadence, the default teacher's own
training, the output folder). ImageNet recipes are ``imagenet_<teacher>_<student>[_<key>].yaml`` from
PUBLISHED_IMAGENET and IMAGENET_PAIRS, the same way (mobilenet_v1 is written "mobilenetv1" in file names), and
the DeiT row's ``imagenet_deit3_small_deit_tiny[_<key>].yaml`` from fmkt.distillers.published_deit.PUBLISHED_DEIT.
tests/test_recipes.py checks that the shipped files equal what this writes.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's fmkt, whatever is installed
from fmkt.distillers.published import CIFAR100_PAIRS, IMAGENET_PAIRS, PUBLISHED, PUBLISHED_IMAGENET  # noqa: E402
from fmkt.distillers.published_deit import DEIT_PAIRS, PUBLISHED_DEIT  # noqa: E402

RECIPES = ROOT / "fmkt" / "recipes"
FLOW_KEY = "fmkt"  # the paper's own recipe keeps the plain pair name
OURS = {"data": {"name": "cifar100", "eval_batch_size": 512}, "teacher": {"epochs": 240, "lr": 0.05},
        "train": {"eval_every": 5}}
SECTIONS = ("student", "data", "teacher", "method", "optim", "train", "out")
# ImageNet: the `imagefolder` dataset (ROOT/train/CLASS, ROOT/val/CLASS) at 224 x 224. The default teacher (trained
# only when no --teacher is given) gets torchvision's reference budget: 90 epochs at lr 0.1 per 256 images.
OURS_IMAGENET = {"data": {"name": "imagefolder", "image_size": 224, "eval_batch_size": 256},
                 "teacher": {"epochs": 90}, "train": {"eval_every": 5}}
# DeiT (the paper's ViT row): the same folder; the default teacher (only without --teacher) gets DeiT's own budget
OURS_DEIT = {"data": {"name": "imagefolder", "image_size": 224, "eval_batch_size": 256},
             "teacher": {"epochs": 300, "lr": 0.001}, "train": {"eval_every": 5}}
FILE_LABEL = {"mobilenet_v1": "mobilenetv1",  # zoo name -> its spelling in recipe file names
              "timm:deit3_small_patch16_224.fb_in22k_ft_in1k": "deit3_small", "timm:deit_tiny_patch16_224": "deit_tiny"}
# registry -> (its registry, its pairs, its title, the registry's name, our keys)
DATASETS = {"cifar100": (PUBLISHED, CIFAR100_PAIRS, "CIFAR-100", "PUBLISHED", OURS),
            "imagenet": (PUBLISHED_IMAGENET, IMAGENET_PAIRS, "ImageNet-1k", "PUBLISHED_IMAGENET", OURS_IMAGENET),
            "deit": (PUBLISHED_DEIT, DEIT_PAIRS, "ImageNet-1k", "PUBLISHED_DEIT", OURS_DEIT)}
PREFIX = {"deit": "imagenet"}  # a registry whose recipe files take another dataset prefix than its own name
MODULE = {"deit": "published_deit"}  # a registry outside fmkt.distillers.published
NEEDS = {
    "cifar100": "Needs a trained teacher: --teacher PATH (an fmkt artifact, or a mdistiller/RepDistiller .pth with "
                "--teacher-arch). Data: --data-dir pointing at cifar-100-python (or its parent); random crop 32 pad "
                "4 + flip.",
    "imagenet": "Needs a trained teacher: --teacher PATH (an fmkt artifact, or torchvision's weights: "
                "torch.save(torchvision.models.{teacher}(weights='IMAGENET1K_V1').state_dict(), PATH), the "
                "literature's teacher; without one fmkt first trains the teacher itself, for days). Data: --data-dir "
                "ROOT with ROOT/train/CLASS/*.JPEG and ROOT/val/CLASS/*.JPEG (ImageNet-1k's 1000 classes), 224 x 224.",
    "deit": "Needs the teacher: --teacher FILE with timm's key names (.safetensors or .pth of {teacher}, as timm's hub "
            "holds it) or --set teacher.kwargs.pretrained=true where the Hugging Face hub is reachable; without one "
            "fmkt first trains a DeiT3-Small itself, for weeks. Data: --data-dir ROOT with ROOT/train/CLASS/*.JPEG and "
            "ROOT/val/CLASS/*.JPEG (ImageNet-1k's 1000 classes), 224 x 224.",
}


def recipe_name(key: str, teacher: str, student: str, dataset: str = "cifar100") -> str:
    suffix = "" if key == FLOW_KEY else "_" + key.replace("+", "_")
    prefix = PREFIX.get(dataset, dataset)
    return f"{prefix}_{FILE_LABEL.get(teacher, teacher)}_{FILE_LABEL.get(student, student)}{suffix}"


def recipe_config(key: str, teacher: str, student: str, dataset: str = "cifar100") -> dict:
    """The registry's entry for the pair, plus our own keys, as one nested dict in recipe order."""
    registry, ours = DATASETS[dataset][0], DATASETS[dataset][4]
    cfg = registry[key].overrides(teacher, student)
    for section, values in ours.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    if dataset == "imagenet":  # torchvision's lr 0.1 per 256 images, at this recipe's batch
        cfg["teacher"]["lr"] = round(0.1 * cfg["data"]["batch_size"] / 256, 6)
    cfg["data"] = {"name": cfg["data"].pop("name"), **cfg["data"]}
    cfg["out"] = f"runs/{recipe_name(key, teacher, student, dataset)}"
    return {k: cfg[k] for k in SECTIONS}


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _comment(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, 114, break_on_hyphens=False, break_long_words=False)]


def render(key: str, teacher: str, student: str, dataset: str = "cifar100") -> str:
    """The recipe's text: a comment saying what it is and where its numbers come from, then the YAML."""
    registry, _, title, registry_name, _ = DATASETS[dataset]
    entry = registry[key]
    pair = entry.per_pair.get((teacher, student))
    module = MODULE.get(dataset, "published")
    lines = _comment(f"{title} {teacher} -> {student}, {key} at its authors' published settings "
                     f"(fmkt.distillers.{module}.{registry_name}[{key!r}]). Written by scripts/make_recipes.py: "
                     f"edit {registry_name} and rerun it, not this file.")
    lines += _comment(f"Source: {entry.source}.")
    if pair:
        lines += _comment(f"This pair: {pair.source}.")
    if entry.note:
        lines += _comment(f"Note: {entry.note}.")
    lines += _comment(NEEDS[dataset].format(teacher=teacher))
    for section, value in recipe_config(key, teacher, student, dataset).items():
        if isinstance(value, dict):
            lines.append(f"{section}:")
            lines += [f"  {k}: {_flow(v)}" for k, v in value.items()]
        else:
            lines.append(f"{section}: {_flow(value)}")
    return "\n".join(lines) + "\n"


def expected() -> dict[str, str]:
    """{recipe file name: text} for every entry and pair of each dataset's registry (CIFAR-100, ImageNet)."""
    return {recipe_name(key, t, s, dataset) + ".yaml": render(key, t, s, dataset)
            for dataset, (registry, pairs, *_) in DATASETS.items() for key in registry for t, s in pairs}


def main(argv: list[str]) -> int:
    stale = []
    for name, text in expected().items():
        path = RECIPES / name
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(name)
        if "--check" not in argv:
            path.write_text(text)
    verb = "differ" if "--check" in argv else "written"
    print(f"{len(stale)} recipe(s) {verb}: {', '.join(stale) or 'none'}")
    return 1 if stale and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
