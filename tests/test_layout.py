"""The layout that shows the architecture (DESIGN.md), checked so it stays true.

- Data flows one way: nothing in the core (fmkt/) imports fmkt.export, fmkt.bench or fmkt.cli, except the one lazy
  public name fmkt.export_artifact (fmkt/api.py); export/ and bench/ never import the training engine.
- One builder: DeployableModel( is called in one place outside the tests (fmkt.student.build_student).
- Small pieces: no function outside kernels/ longer than 60 lines; no product file over 350 lines except the
  model zoo's files.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("fmkt", "export", "bench", "cli", "kernels")
ALLOWED_UPSTREAM = {("fmkt/api.py", "fmkt.export")}  # export_artifact: the stated lazy exception (DESIGN.md)


def product_files():
    return [p for d in PRODUCT if (ROOT / d).is_dir() for p in sorted((ROOT / d).rglob("*.py"))
            if "__pycache__" not in p.parts]


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def imports(tree) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_imports_flow_one_way():
    bad = []
    for p in product_files():
        names = imports(ast.parse(p.read_text()))
        if p.parts[len(ROOT.parts)] == "fmkt":
            for up in ("fmkt.export", "fmkt.bench", "fmkt.cli"):
                if any(n == up or n.startswith(up + ".") for n in names) and (rel(p), up) not in ALLOWED_UPSTREAM:
                    bad.append(f"{rel(p)} imports {up}")
        if p.parts[len(ROOT.parts)] in ("export", "bench"):
            for down in ("fmkt.engine", "fmkt.commands", "fmkt.checkpoint"):
                if any(n == down or n.startswith(down + ".") for n in names):
                    bad.append(f"{rel(p)} imports the training stack ({down})")
    assert bad == []


def test_one_builder_of_the_deployable_model():
    calls = []
    for d in PRODUCT + ("benchmarks", "examples"):
        for p in sorted((ROOT / d).rglob("*.py")) if (ROOT / d).is_dir() else []:
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == \
                        "DeployableModel":
                    calls.append(f"{rel(p)}:{node.lineno}")
    assert len(calls) == 1 and calls[0].startswith("fmkt/student.py"), calls


def test_functions_are_short_and_files_small():
    long_functions, big_files = [], []
    for p in product_files():
        text = p.read_text()
        if not p.parts[len(ROOT.parts)] == "kernels":
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                    long_functions.append(f"{rel(p)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
        if "models" not in p.parts and len(text.splitlines()) > 350:
            big_files.append(f"{rel(p)} ({len(text.splitlines())} lines)")
    assert long_functions == [] and big_files == [], (long_functions, big_files)


@pytest.mark.parametrize("module", ["fmkt.config", "fmkt.runtime", "fmkt.files"])
def test_upstream_modules_import_no_later_stage(module):
    """config parses, runtime and files serve every stage: none of them imports a stage (data, models, flow,
    distillers, engine, artifact, export, bench, cli)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    stages = ("fmkt.data", "fmkt.models", "fmkt.flow", "fmkt.distillers", "fmkt.engine", "fmkt.artifact",
              "fmkt.student", "fmkt.commands", "fmkt.export", "fmkt.bench", "fmkt.cli")
    names = imports(ast.parse(path.read_text()))
    assert not [n for n in names if n.startswith(stages)], names


def test_capture_names_no_method():
    """One step body: fmkt/capture.py decides from what each method says of itself (its distiller's
    capture_refusal / steady_from, through the METHODS entry the engine hands it), so no method's name, loss or
    option appears in it, and it imports no distiller or loss."""
    from fmkt.distillers import METHODS
    from fmkt.losses import LOSSES

    tree = ast.parse((ROOT / "fmkt" / "capture.py").read_text())
    constants = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    identifiers = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    options = {"dirac_ratio", "dkd_warmup_epochs", "train_steps", "train_step_choices", "loss_params", "encoder"}
    named = (constants & (set(METHODS) | set(LOSSES))) | (identifiers & (options | set(METHODS) | set(LOSSES)))
    named |= {m for m in imports(tree) if m.startswith(("fmkt.distillers", "fmkt.losses"))}
    assert named == set(), named
