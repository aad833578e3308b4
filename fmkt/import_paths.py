"""Import paths: ``pkg.module:factory`` strings that name a user's model or data factory.

They work wherever a zoo model or dataset name works (``--student``, ``--teacher-model``, ``--data``, the
config, ``fmkt.json``). The module is imported with ``importlib`` from ``sys.path`` plus the current folder
(as uvicorn and gunicorn do), so ``fmkt-cli distill --student mynets:small_cnn`` finds ``./mynets.py``.
Every failure (no such module, no such attribute, the factory raising, a wrong return type) is one
sentence in an :class:`FmktError`.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import sys

from fmkt.errors import FmktError, first_line

_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_import_path(name) -> bool:
    """True for anything written like an import path (``a.b:c``); zoo and dataset names never hold a colon, and
    ``timm:NAME`` names a timm model (fmkt.models.timm_backbone), not the module ``timm``."""
    return isinstance(name, str) and ":" in name and not name.startswith("timm:")


def well_formed(path: str) -> bool:
    """``pkg.module:attr`` with identifiers only (a class defined inside a function, ``<locals>``, is not)."""
    return bool(_PATH.match(path))


def resolve(path: str, what: str = "factory"):
    """The object named by ``pkg.module:attr`` (attr may be dotted, e.g. ``Nets.small``)."""
    if not well_formed(path):
        raise FmktError(f"{what} {path!r} is not an import path of the form pkg.module:factory.")
    module_name, attr = path.split(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise FmktError(f"cannot import module {module_name!r} of {what} {path!r}: it is not installed, nor on "
                            "PYTHONPATH, nor in the current folder.") from None
        raise FmktError(f"importing {module_name!r} of {what} {path!r} failed: {exc}.") from None
    except Exception as exc:  # the user's module raised while importing
        raise FmktError(f"importing {module_name!r} of {what} {path!r} failed "
                        f"({first_line(exc, 200).rstrip('.')}).") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FmktError(f"module {module_name!r} has no attribute {attr!r} ({what} {path!r}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FmktError(f"{what} {path!r} is a {type(obj).__name__}, not a callable factory.")
    return obj


def call_factory(path: str, what: str = "factory", **kwargs):
    """Resolve ``path`` and call it with those of ``kwargs`` its signature accepts (all of them for ``**kw``)."""
    fn = resolve(path, what)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass nothing
        params = {}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    try:
        return fn(**kwargs)
    except FmktError:
        raise
    except Exception as exc:
        why = first_line(exc, 200, with_type=False).rstrip(".") or "no message"
        raise FmktError(f"{what} {path!r} raised {type(exc).__name__} ({why}).") from None


def import_path_of(obj) -> str:
    """``module:qualname`` of a class or function (what ``resolve`` reads back)."""
    return f"{obj.__module__}:{obj.__qualname__}"
