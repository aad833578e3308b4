"""Write the CIFAR-100 recipes (fmkt/recipes/cifar100_*.yaml) from fmkt.distillers.published.PUBLISHED.

    python scripts/make_recipes.py           # (re)write them
    python scripts/make_recipes.py --check   # exit 1 if a shipped file differs from what would be written

One recipe per pair and PUBLISHED entry: ``cifar100_<teacher>_<student>.yaml`` for FM-KT (the paper's recipe) and
``cifar100_<teacher>_<student>_<key>.yaml`` for the others ("kd+ls" -> "_kd_ls"). The numbers live in PUBLISHED;
this script adds only what is ours (the dataset, the evaluation batch and cadence, the default teacher's own
training, the output folder). tests/test_recipes.py checks that the shipped files equal what this writes.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's fmkt, whatever is installed
from fmkt.distillers.published import CIFAR100_PAIRS, PUBLISHED  # noqa: E402

RECIPES = ROOT / "fmkt" / "recipes"
FLOW_KEY = "fmkt"  # the paper's own recipe keeps the plain pair name
OURS = {"data": {"name": "cifar100", "eval_batch_size": 512}, "teacher": {"epochs": 240, "lr": 0.05},
        "train": {"eval_every": 5}}
SECTIONS = ("student", "data", "teacher", "method", "optim", "train", "out")


def recipe_name(key: str, teacher: str, student: str) -> str:
    suffix = "" if key == FLOW_KEY else "_" + key.replace("+", "_")
    return f"cifar100_{teacher}_{student}{suffix}"


def recipe_config(key: str, teacher: str, student: str) -> dict:
    """PUBLISHED[key] for the pair, plus our own keys, as one nested dict in recipe order."""
    cfg = PUBLISHED[key].overrides(teacher, student)
    for section, values in OURS.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    cfg["data"] = {"name": cfg["data"].pop("name"), **cfg["data"]}
    cfg["out"] = f"runs/{recipe_name(key, teacher, student)}"
    return {k: cfg[k] for k in SECTIONS}


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _comment(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, 114, break_on_hyphens=False, break_long_words=False)]


def render(key: str, teacher: str, student: str) -> str:
    """The recipe's text: a comment saying what it is and where its numbers come from, then the YAML."""
    entry = PUBLISHED[key]
    pair = entry.per_pair.get((teacher, student))
    lines = _comment(f"CIFAR-100 {teacher} -> {student}, {key} at its authors' published settings "
                     f"(fmkt.distillers.published.PUBLISHED[{key!r}]). Written by scripts/make_recipes.py: edit "
                     "PUBLISHED and rerun it, not this file.")
    lines += _comment(f"Source: {entry.source}.")
    if pair:
        lines += _comment(f"This pair: {pair.source}.")
    if entry.note:
        lines += _comment(f"Note: {entry.note}.")
    lines += _comment("Needs a trained teacher: --teacher PATH (an fmkt artifact, or a mdistiller/RepDistiller .pth "
                      "with --teacher-arch). Data: --data-dir pointing at cifar-100-python (or its parent); random "
                      "crop 32 pad 4 + flip.")
    for section, value in recipe_config(key, teacher, student).items():
        if isinstance(value, dict):
            lines.append(f"{section}:")
            lines += [f"  {k}: {_flow(v)}" for k, v in value.items()]
        else:
            lines.append(f"{section}: {_flow(value)}")
    return "\n".join(lines) + "\n"


def expected() -> dict[str, str]:
    """{recipe file name: text} for every PUBLISHED entry and CIFAR-100 pair."""
    return {recipe_name(key, t, s) + ".yaml": render(key, t, s) for key in PUBLISHED for t, s in CIFAR100_PAIRS}


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
