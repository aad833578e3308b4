"""The layout that shows the architecture (DESIGN.md), checked so it stays true.

- Data flows one way: nothing in the core (fmkt/) imports fmkt.export, fmkt.bench or fmkt.cli, except the one lazy
  public name fmkt.export_artifact (fmkt/api.py); export/ and bench/ never import the training engine.
- Stage order as DESIGN.md draws it: the stages are read from its diagram ("Data flows one way"), and a module of a
  stage imports only its own and earlier stages (the one stated exception: the engine's finish writes the artifact);
  the flow's sampler, encoders and schedules, then the deployable student, come before the distiller and its
  losses; kernels import nothing from the engine on. Every core module is placed in the diagram, and every path it
  names exists.
- One builder: DeployableModel( is called in one place outside the tests (fmkt.student.build_student), also counting
  benchmarks/, examples/ and scripts/.
- Small pieces: no function outside kernels/ longer than 60 lines; no product file over 350 lines except the
  model zoo's files; the same limits for scripts/ and benchmarks/.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("fmkt", "export", "bench", "cli", "kernels")
TOOLS = ("scripts", "benchmarks")  # not the product, held to its size limits and its one builder
ALLOWED_UPSTREAM = {("fmkt/api.py", "fmkt.export")}  # export_artifact: the stated lazy exception (DESIGN.md)
# DESIGN.md: "The one import down the flow is the engine's finish writing the artifact with fmkt/artifact.py's own
# writer" (the format's writer beside its reader)
WRITES_DOWN = {("fmkt.engine", "fmkt.artifact")}


def py_files(folder: str) -> list[Path]:
    d = ROOT / folder
    return [p for p in sorted(d.rglob("*.py")) if "__pycache__" not in p.parts] if d.is_dir() else []


def product_files():
    return [p for d in PRODUCT for p in py_files(d)]


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


# ------------------------------------------------------------------------------------------- the diagram's stages
def design_diagram() -> list[str]:
    """The non-empty lines of DESIGN.md's "Data flows one way" diagram."""
    text = (ROOT / "DESIGN.md").read_text()
    block = text.split("## Data flows one way", 1)[1].split("```")[1]
    return [line for line in block.splitlines() if line.strip()]


def design_stages() -> list[list[str]]:
    """The diagram's stages in order, each as its modules (dotted names): its first line and every ``->`` line open
    a stage, indented lines continue it, and the unindented lines after the stages are side modules (the
    composition root, runtime, the API, ...: not stages). Modules: ``fmkt/x.py`` or ``fmkt/x/``, and ``dir/  ->
    fmkt.x`` (export/, bench/)."""
    stages = []
    for i, line in enumerate(design_diagram()):
        if i and not line.lstrip().startswith("->") and not line.startswith(" "):
            break
        if i == 0 or line.lstrip().startswith("->"):
            stages.append([])
        stages[-1] += ["fmkt." + m.replace("/", ".") for m in re.findall(r"\bfmkt/(\w+(?:/\w+)*)(?:\.py\b|/)", line)]
        stages[-1] += re.findall(r"\b\w+/\s+->\s+(fmkt\.\w+)", line)
    return stages


def module_of(path: Path) -> str:
    """The dotted module of a product file (export/, bench/, cli/, kernels/ are installed as fmkt.export, ...)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts = parts if parts[0] == "fmkt" else ["fmkt"] + parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str, stages: list[list[str]]) -> int | None:
    return next((i for i, mods in enumerate(stages) for m in mods if module == m or module.startswith(m + ".")),
                None)


def test_the_diagram_draws_flow_then_the_student_upstream_of_the_distiller():
    stages = design_stages()
    assert all(stages) and len(stages) >= 8, stages
    at = {m: stage_of(m, stages) for m in ("fmkt.config", "fmkt.data", "fmkt.models", "fmkt.flow", "fmkt.student",
                                           "fmkt.losses", "fmkt.distillers", "fmkt.engine", "fmkt.step",
                                           "fmkt.capture", "fmkt.artifact", "fmkt.export", "fmkt.bench")}
    assert at["fmkt.config"] == 0 and at["fmkt.data"] == at["fmkt.models"] == 1, at
    assert at["fmkt.flow"] < at["fmkt.student"] < at["fmkt.distillers"] == at["fmkt.losses"] < at["fmkt.engine"], at
    assert at["fmkt.engine"] == at["fmkt.step"] == at["fmkt.capture"] < at["fmkt.artifact"] < at["fmkt.export"] \
        < at["fmkt.bench"] == len(stages) - 1, at


def test_a_stage_imports_only_its_own_and_earlier_stages():
    """A module of a later stage is never imported by an earlier stage (e.g. fmkt/student.py imports no loss,
    distiller or engine part; a distiller no engine part); the side modules (commands, api, teacher, ...) are
    not stages. Kernels import nothing of the engine's stage or later."""
    stages = design_stages()
    engine = stage_of("fmkt.engine", stages)
    bad = []
    for p in product_files():
        module = module_of(p)
        here = stage_of(module, stages)
        for name in sorted(imports(ast.parse(p.read_text()))):
            there = stage_of(name, stages)
            if there is None or any(module == a and (name == b or name.startswith(b + ".")) for a, b in WRITES_DOWN):
                continue
            if here is not None and there > here:
                bad.append(f"{rel(p)} (stage {here}: {stages[here][0]}) imports {name} (stage {there})")
            if module.startswith("fmkt.kernels") and there >= engine:
                bad.append(f"{rel(p)} (kernels) imports {name} (the engine's stage or later)")
    assert bad == []


def test_design_places_every_core_module_and_names_only_existing_ones():
    """Each module and package of fmkt/ appears in the diagram (a stage or a side module), and each fmkt/ path the
    diagram names exists: a new module is drawn where it belongs, a removed one leaves the page."""
    text = "\n".join(design_diagram())
    named = set(re.findall(r"\b(\w+)\.py\b", text)) | {f"{m}/" for m in re.findall(r"\bfmkt/(\w+)/", text)}
    core = [p.stem for p in (ROOT / "fmkt").glob("*.py") if p.stem != "__init__"]
    core += [f"{p.name}/" for p in (ROOT / "fmkt").iterdir() if (p / "__init__.py").is_file()]
    assert sorted(m for m in core if m not in named) == []
    drawn = re.findall(r"\bfmkt/(\w+(?:/\w+)*(?:\.py\b|/))", text)
    assert sorted(p for p in drawn if not (ROOT / "fmkt" / p).exists()) == []


# ------------------------------------------------------------------------------------------- one builder, small pieces
@pytest.mark.parametrize("folder", PRODUCT + ("benchmarks", "examples", "scripts"))
def test_one_builder_of_the_deployable_model(folder):
    """DeployableModel( is called once outside the tests: in fmkt/student.py (build_student); nowhere else."""
    calls = []
    for p in py_files(folder):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == \
                    "DeployableModel":
                calls.append(f"{rel(p)}:{node.lineno}")
    if folder == "fmkt":
        assert len(calls) == 1 and calls[0].startswith("fmkt/student.py"), calls
    else:
        assert calls == [], calls


@pytest.mark.parametrize("folder", PRODUCT + TOOLS)
def test_functions_are_short_and_files_small(folder):
    long_functions, big_files = [], []
    for p in py_files(folder):
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
