"""Every TensorRT name fmkt's code uses exists in the real TensorRT Python bindings of the versions it runs on.

TensorRT cannot be installed here, so the names come from ``tests/fixtures/tensorrt_api_names.json``, which
``scripts/trt_api_names.py`` extracts from the pybind11 module of the ``tensorrt-cu12-bindings`` wheels (one
10.x and one 11.x; see the fixture's ``method``). Offline: this test reads only that file and our sources.

The rule (static, with ``ast``; deliberately simple):

1. Files: every ``.py`` under ``export/``, ``fmkt/``, ``cli/``, ``kernels/``, ``bench/``, ``benchmarks/``.
2. TensorRT scopes: a top-level function or class (or the whole module, for a module-level import) that
   holds an *anchor*: ``import tensorrt [as X]`` whose name is then used as ``X.attr``; ``X = load_tensorrt(...)``
   (our helper that returns the module); or ``X = EngineRunner(...)`` (our wrapper whose ``.runtime``,
   ``.engine`` and ``.context`` are TensorRT objects). Nothing outside these scopes is read, so an unrelated
   ``builder`` or a ``trt`` result row elsewhere is never taken for TensorRT.
3. TensorRT expressions in a scope: a name in ``MODULE_NAMES`` (``trt``, ``tensorrt``, the aliases of rule 2)
   or in ``OBJECT_NAMES`` (the variable names our code gives TensorRT objects: ``builder``, ``network``,
   ``parser``, ``config``, ``profile``, ``cache``, ``engine``, ``context``, ``runtime``, ``logger``,
   ``flag_enum``, ``plan``); an attribute whose own name is one of those (``self.context``, ``e.context``,
   ``self.engine``, ``self.trt``); an attribute, call or subscript of a TensorRT expression.
4. Collected: ``V.name`` for every TensorRT expression ``V`` (so ``trt.Logger.WARNING`` gives ``Logger`` and
   ``WARNING``; ``config.get_timing_cache().serialize`` gives ``get_timing_cache`` and ``serialize``), and the
   keyword names of calls of such attributes (``set_timing_cache(..., ignore_mismatch=False)``). Not collected:
   dunders (``__version__`` is Python's, not the binding's), and our own fields and methods (names assigned as
   ``self.name = ...`` inside the scopes: ``context``, ``engine``, ``input_name`` ...; methods of our classes
   there: ``bind``, ``profile_range`` ...).
5. Where a use runs: all fixture versions, narrowed by each enclosing ``if`` (body or else branch) whose test is
   ``_major(...) <op> N`` (versions by major) or ``hasattr(<TensorRT expression>, "NAME")`` (versions whose
   names hold / lack NAME), combined through ``and`` / ``or`` / ``not``; any other test narrows nothing, so the
   check errs on the strict side. Each collected use must exist in every version where it runs.
6. Each ``hasattr(<TensorRT expression>, "NAME")`` string may be missing from some versions, but must exist in
   at least one (otherwise its branch is dead code).

The fixture lists names, not which class has them: ``config.set_flag`` checks that some class of that version
binds ``set_flag``. It catches renamed and removed API (``execute_async_v2``, ``EXPLICIT_BATCH`` in 11.x,
``BuilderFlag.FP16`` in 11.x), not a method called on the wrong object.
"""
from __future__ import annotations

import ast
import json
import operator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tensorrt_api_names.json"
PRODUCT_DIRS = ("export", "fmkt", "cli", "kernels", "bench", "benchmarks")
MODULE_NAMES = frozenset({"trt", "tensorrt"})
OBJECT_NAMES = frozenset({"builder", "network", "parser", "config", "profile", "cache", "engine", "context",
                          "runtime", "logger", "flag_enum", "plan"})
LOADERS = frozenset({"load_tensorrt"})  # our functions that return the tensorrt module
WRAPPERS = frozenset({"EngineRunner"})  # our classes whose fields are TensorRT objects
OPS = {ast.GtE: operator.ge, ast.Gt: operator.gt, ast.LtE: operator.le, ast.Lt: operator.lt,
       ast.Eq: operator.eq, ast.NotEq: operator.ne}


@lru_cache(maxsize=None)
def fixture() -> dict:
    return json.loads(FIXTURE.read_text())


@lru_cache(maxsize=None)
def names() -> dict[str, frozenset]:
    return {v: frozenset(e["names"]) for v, e in fixture()["versions"].items()}


def major(version: str) -> int:
    return int(version.split(".")[0])


@dataclass(frozen=True)
class Use:
    name: str
    where: str  # path:line
    runs_in: frozenset  # fixture versions where this line runs
    kind: str  # "attr" | "kwarg" | "hasattr"


def _callee(node) -> str | None:
    if isinstance(node, ast.Call):
        f = node.func
        return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    return None


def _anchors(tree) -> tuple[bool, set[str]]:
    """(is this a TensorRT scope, extra module aliases) for one top-level statement (rule 2)."""
    aliases, wrapped = set(), False
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.asname or a.name for a in node.names if a.name == "tensorrt"}
        elif isinstance(node, ast.Assign) and _callee(node.value) in LOADERS | WRAPPERS:
            if _callee(node.value) in LOADERS:
                aliases |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            wrapped = True
    used = {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    aliases |= imported & used
    return wrapped or bool(aliases), aliases


class _Collector:
    def __init__(self, path: str, aliases: set[str], own_fields: set[str], versions: dict[str, frozenset]):
        self.path, self.modules, self.own, self.versions = path, MODULE_NAMES | aliases, own_fields, versions
        self.all = frozenset(versions)
        self.uses: list[Use] = []

    def is_trt(self, node) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.modules or node.id in OBJECT_NAMES
        if isinstance(node, ast.Attribute):
            return node.attr in OBJECT_NAMES or node.attr in self.modules or self.is_trt(node.value)
        if isinstance(node, ast.Call):
            return self.is_trt(node.func)
        if isinstance(node, ast.Subscript):
            return self.is_trt(node.value)
        return False

    def _hasattr(self, node) -> str | None:
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
                and len(node.args) == 2 and self.is_trt(node.args[0])
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            return node.args[1].value
        return None

    def condition(self, test) -> tuple[frozenset | None, frozenset | None]:
        """(versions where the body runs, versions where the else branch runs); None = no narrowing."""
        name = self._hasattr(test)
        if name is not None:
            yes = frozenset(v for v, ns in self.versions.items() if name in ns)
            return yes, self.all - yes
        if (isinstance(test, ast.Compare) and _callee(test.left) == "_major" and len(test.ops) == 1
                and type(test.ops[0]) in OPS and isinstance(test.comparators[0], ast.Constant)
                and isinstance(test.comparators[0].value, int)):
            op, n = OPS[type(test.ops[0])], test.comparators[0].value
            yes = frozenset(v for v in self.versions if op(major(v), n))
            return yes, self.all - yes
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            yes, no = self.condition(test.operand)
            return no, yes
        if isinstance(test, ast.BoolOp):
            parts = [self.condition(v) for v in test.values]
            yeses, nos = [p[0] for p in parts], [p[1] for p in parts]
            if isinstance(test.op, ast.And):  # body: all hold; else: some fails
                known = [y for y in yeses if y is not None]
                body = frozenset.intersection(*known) if known else None
                other = frozenset.union(*nos) if all(n is not None for n in nos) else None
            else:  # Or: body: some holds; else: all fail
                body = frozenset.union(*yeses) if all(y is not None for y in yeses) else None
                known = [n for n in nos if n is not None]
                other = frozenset.intersection(*known) if known else None
            return body, other
        return None, None

    def visit(self, node, runs_in: frozenset) -> None:
        if isinstance(node, (ast.If, ast.IfExp)):
            yes, no = self.condition(node.test)
            self.visit(node.test, runs_in)
            for child in (node.body if isinstance(node.body, list) else [node.body]):
                self.visit(child, runs_in if yes is None else runs_in & yes)
            for child in (node.orelse if isinstance(node.orelse, list) else [node.orelse]):
                self.visit(child, runs_in if no is None else runs_in & no)
            return
        line = f"{self.path}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and self.is_trt(node.value):
            if not node.attr.startswith("__") and node.attr not in self.own:
                self.uses.append(Use(node.attr, line, runs_in, "attr"))
        elif isinstance(node, ast.Call):
            guarded = self._hasattr(node)
            if guarded is not None:
                self.uses.append(Use(guarded, line, runs_in, "hasattr"))
            if isinstance(node.func, ast.Attribute) and self.is_trt(node.func.value):
                self.uses += [Use(k.arg, line, runs_in, "kwarg") for k in node.keywords if k.arg]
        for child in ast.iter_child_nodes(node):
            self.visit(child, runs_in)


def _scopes(tree) -> tuple[list, set[str]]:
    """The TensorRT scopes of a module (rule 2) and the module aliases they bind."""
    module_level = ast.Module(body=[n for n in tree.body if not isinstance(
        n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))], type_ignores=[])
    imported = {a.asname or a.name for n in module_level.body if isinstance(n, ast.Import)
                for a in n.names if a.name == "tensorrt"}
    used = {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    is_scope, aliases = _anchors(module_level)
    if is_scope or imported & used:
        return [tree], aliases | (imported & used)
    scopes = []
    for node in tree.body:
        is_scope, extra = _anchors(node)
        if is_scope:
            scopes.append(node)
            aliases |= extra
    return scopes, aliases


def own_fields(scopes) -> set[str]:
    """Names our code assigns as ``self.name = ...`` in the scopes, and the methods of our classes there (e.g.
    ``EngineRunner.bind``): ours, not TensorRT's API."""
    fields = {t.attr for s in scopes for n in ast.walk(s) if isinstance(n, (ast.Assign, ast.AnnAssign))
              for tgt in (n.targets if isinstance(n, ast.Assign) else [n.target]) for t in ast.walk(tgt)
              if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    methods = {f.name for s in scopes for c in ast.walk(s) if isinstance(c, ast.ClassDef) for f in c.body
               if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return fields | methods


def collect_source(source, path: str, versions: dict[str, frozenset], own: set[str] = frozenset()) -> list[Use]:
    """The uses in one file (``source``: its text or its ``ast`` tree)."""
    scopes, aliases = _scopes(ast.parse(source) if isinstance(source, str) else source)
    c = _Collector(path, aliases, own | own_fields(scopes), versions)
    for s in scopes:
        c.visit(s, c.all)
    return c.uses


@lru_cache(maxsize=None)
def product_uses() -> tuple[Use, ...]:
    trees = {str(f.relative_to(ROOT)): ast.parse(f.read_text()) for d in PRODUCT_DIRS if (ROOT / d).is_dir()
             for f in sorted((ROOT / d).rglob("*.py")) if "__pycache__" not in f.parts}
    # Our fields are shared across files: bench.py's ``self.engine.context`` is EngineRunner's field.
    own = set().union(*(own_fields(_scopes(tree)[0]) for tree in trees.values()))
    return tuple(u for path, tree in trees.items() for u in collect_source(tree, path, names(), own))


# ------------------------------------------------------------------------------------------------ the fixture
def test_fixture_is_the_real_api():
    doc, ns = fixture(), names()
    assert FIXTURE.stat().st_size < 1_000_000
    assert {10, 11} <= {major(v) for v in ns}, f"the fixture should hold a 10.x and an 11.x: {sorted(ns)}"
    for v, entry in doc["versions"].items():
        assert entry["wheel"].endswith(".whl") and len(entry["sha256"]) == 64
        assert len(ns[v]) > 500, v
        for real in ("set_input_shape", "execute_async_v3", "deserialize_cuda_engine", "OnnxParser", "Logger"):
            assert real in ns[v], (v, real)
        for fake in ("execute_async_v4", "set_input_shapes", "enqueue_v4", "BuilderFlags"):
            assert fake not in ns[v], (v, fake)


@pytest.mark.parametrize("name", ["clear_flag", "TF32", "get_tensor_profile_shape", "set_flag", "BuilderFlag",
                                  "set_input_shape", "get_tensor_shape"])
def test_names_about_to_be_used_exist_in_every_version(name):
    missing = [v for v, ns in names().items() if name not in ns]
    assert not missing, f"{name} is not in TensorRT {missing}"


# ------------------------------------------------------------------------------------------------ our code
def test_every_tensorrt_name_we_use_exists_where_it_runs():
    uses, ns = product_uses(), names()
    found = {u.name for u in uses if u.kind != "hasattr"}
    assert len(found) >= 15, f"the collector found too few TensorRT names to mean anything: {sorted(found)}"
    assert {"set_input_shape", "execute_async_v3", "build_serialized_network", "OnnxParser"} <= found
    bad = [f"{u.where}: {u.name} is used but TensorRT {sorted(v for v in u.runs_in if u.name not in ns[v])} "
           f"has no such name" for u in uses if u.kind != "hasattr" and any(u.name not in ns[v] for v in u.runs_in)]
    assert not bad, "\n".join(bad)


def test_every_hasattr_guard_can_be_true():
    uses, ns = product_uses(), names()
    guards = [u for u in uses if u.kind == "hasattr"]
    assert guards, "expected the version guards of export/tensorrt_engine.py"
    dead = [f"{u.where}: hasattr(..., {u.name!r}) is false in every fixture version ({sorted(ns)}): dead branch"
            for u in guards if not any(u.name in n for n in ns.values())]
    assert not dead, "\n".join(dead)


def test_the_collector_follows_guards_and_version_branches():
    """The rule itself, on a made-up file: version branches and hasattr narrow where a name must exist."""
    versions = {"10.1": frozenset({"a", "b", "Old", "set_flag", "BuilderFlag"}),
                "11.0": frozenset({"a", "b", "New", "set_flag", "BuilderFlag"})}
    src = '''
import tensorrt as trt
def build(x):
    builder = trt.Builder(x)
    if _major(trt) >= 11:
        builder.New(key=1)
    elif hasattr(trt.BuilderFlag, "Old"):
        builder.set_flag(trt.BuilderFlag.Old)
    else:
        builder.Neither()
    if not hasattr(builder, "New"):
        builder.a()
    unrelated.b()
'''
    uses = collect_source(src, "f.py", versions)
    where = {(u.name, u.kind): sorted(u.runs_in) for u in uses}
    assert where[("Builder", "attr")] == ["10.1", "11.0"]
    assert where[("New", "attr")] == ["11.0"] and where[("key", "kwarg")] == ["11.0"]
    assert where[("Old", "attr")] == ["10.1"] and where[("Old", "hasattr")] == ["10.1"]
    assert where[("Neither", "attr")] == []  # runs in no fixture version, so it is not checked
    assert where[("a", "attr")] == ["10.1"]
    assert ("b", "attr") not in where  # `unrelated` is not a TensorRT expression
