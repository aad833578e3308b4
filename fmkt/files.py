"""Safe file writing and hashing: every file goes to a temporary name, is fsynced, then renamed into place."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fmkt.errors import FmktError


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) or raise one sentence saying why it cannot be used as an output folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FmktError(f"output path {path} exists and is a file; pass a folder path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FmktError(f"cannot create output folder {path} ({exc.strerror}).") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FmktError(f"output folder {path} is not writable; choose another --out.")
    return path


def check_output_dir(path: str | Path) -> None:
    """Refuse, before any work, an --out that is (or lies under) a file or a folder that takes no writes.

    Creates nothing: the nearest existing folder gets a write probe (a temporary folder, removed at once), which
    also catches read-only mounts where root ignores permission bits.
    """
    path = Path(path)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise FmktError(f"output path {path} cannot be used: {probe} exists and is a file; pass a folder path.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fmkt-probe-", dir=probe))
    except OSError as exc:
        raise FmktError(f"output folder {path} is not writable ({probe}: {exc.strerror}); choose another --out.") \
            from None


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete what a killed writer left in ``folder``: atomic_path's ``.NAME.XXXX.tmp`` files (never read, since
    the rename did not happen). Returns what was removed."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = True):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FmktError(f"{path} already exists; pass --force to overwrite it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
