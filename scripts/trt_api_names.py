#!/usr/bin/env python
"""List the names of TensorRT's Python API from the real binding wheels, without the TensorRT libraries.

Writes ``tests/fixtures/tensorrt_api_names.json``, the fixture of ``tests/test_tensorrt_api.py`` (which checks
every TensorRT name fmkt's code uses against it, offline).

Why this works: ``tensorrt-cu12-bindings`` (PyPI, ~1.3 MB) holds ``tensorrt_bindings/tensorrt.so``, a pybind11
module. It cannot be imported without libnvinfer, but pybind11 registers every class, method, property, enum
member and keyword argument by a C string (``.def("set_input_shape", ...)``, ``.value("TF32", ...)``,
``py::arg("ignore_mismatch")``), and those strings sit in the ``.rodata`` section of the ELF file. The linker
merges string tails (``"Logger"`` is stored as the tail of ``"ILogger"``, ``"float16"`` of ``"bfloat16"``), so
taking only whole NUL-terminated strings misses names; this script therefore also follows every address the
machine code (x86-64 RIP-relative ``lea``) and the ``R_X86_64_RELATIVE`` relocations point at inside
``.rodata`` and reads the identifier that starts there. Names that ``tensorrt_bindings/__init__.py`` defines in
Python (``volume``, ``nptype``, ``Logger.Severity`` ...) are added from its AST.

Usage::

    python scripts/trt_api_names.py                      # latest 10.x and latest 11.x from PyPI
    python scripts/trt_api_names.py --versions 10.16.1.11 11.4.0.106
    python scripts/trt_api_names.py --wheel a.whl --wheel b.whl   # wheels already on disk
    python scripts/trt_api_names.py --majors 10 11 --out /tmp/names.json

Needs the network (PyPI) unless ``--wheel`` is given; the test that reads the fixture never does.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import io
import json
import re
import shlex
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "tensorrt-cu12-bindings"
# The wheel for the Python this project targets: CPython 3.11 on x86-64 Linux.
PIP_TARGET = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
              "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
              "--platform", "manylinux2014_x86_64"]
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tensorrt_api_names.json"

IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]{1,59}")
# Itanium C++ ABI names that land in .rodata as RTTI (typeinfo) strings: N8nvinfer111BuilderFlagE, FiiE,
# St6vectorImSaImEE ... They are C++ types, not Python API.
MANGLED = re.compile(r"^(_Z|N\d+[a-z]|St\d+[A-Za-z_]|P*F[A-Za-z]*(N\d|St\d|[a-z]+)[A-Za-z0-9_]*E$)")
# Names fmkt uses or is about to use; the script reports which of them a version lacks.
EXPECTED = """set_input_shape execute_async_v3 BuilderFlag TF32 FP16 STRONGLY_TYPED EXPLICIT_BATCH
deserialize_cuda_engine create_execution_context set_tensor_address get_tensor_shape get_tensor_dtype
build_serialized_network create_optimization_profile OnnxParser parse_from_file get_error num_errors
set_memory_pool_limit MemoryPoolType WORKSPACE create_timing_cache set_timing_cache get_timing_cache serialize
Logger WARNING Runtime Builder create_network create_builder_config add_optimization_profile set_shape clear_flag
set_flag get_tensor_profile_shape float32 float16 int32 NetworkDefinitionCreationFlag ignore_mismatch""".split()


# ----------------------------------------------------------------------------------------------------- ELF
def _sections(data: bytes) -> dict[str, tuple[int, int, int]]:
    """{section name: (address, file offset, size)} of a little-endian ELF64 file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = raw[shstrndx][4]
    out = {}
    for name, _type, _flags, addr, offset, size in raw:
        end = data.index(b"\0", strtab + name)
        out[data[strtab + name:end].decode()] = (addr, offset, size)
    return out


def _rodata_targets(data: bytes, secs: dict, rodata: tuple[int, int, int]) -> set[int]:
    """Offsets into .rodata that the code (RIP-relative lea) or a RELATIVE relocation points at."""
    raddr, _roff, rsize = rodata
    targets = set()
    if ".text" in secs and struct.unpack_from("<H", data, 0x12)[0] == 62:  # EM_X86_64
        taddr, toff, tsize = secs[".text"]
        text = data[toff:toff + tsize]
        # lea r64, [rip + disp32]: REX.W (48) or REX.WR (4C), 8D, ModRM with mod=00 rm=101.
        for m in re.finditer(rb"[\x48\x4c]\x8d[\x05\x0d\x15\x1d\x25\x2d\x35\x3d]", text, re.S):
            if m.start() + 7 > len(text):
                continue
            disp, = struct.unpack_from("<i", text, m.start() + 3)
            target = taddr + m.start() + 7 + disp
            if raddr <= target < raddr + rsize:
                targets.add(target - raddr)
    for name in (".rela.dyn",):
        if name in secs:
            _a, off, size = secs[name]
            for i in range(off, off + size - 23, 24):
                _where, info, addend = struct.unpack_from("<QQq", data, i)
                if info & 0xFFFFFFFF == 8 and raddr <= addend < raddr + rsize:  # R_X86_64_RELATIVE
                    targets.add(addend - raddr)
    return targets


def so_names(data: bytes) -> set[str]:
    """Identifier strings of a pybind11 module: whole NUL-terminated identifiers in .rodata, plus identifiers at
    every .rodata address the code or relocations refer to (catches tail-merged strings)."""
    secs = _sections(data)
    rodata = secs[".rodata"]
    ro = data[rodata[1]:rodata[1] + rodata[2]]
    names = {s.decode() for s in ro.split(b"\0") if IDENT.fullmatch(s)}
    for off in _rodata_targets(data, secs, rodata):
        end = ro.find(b"\0", off)
        s = ro[off:end if end >= 0 else len(ro)]
        if IDENT.fullmatch(s):
            names.add(s.decode())
    return {n for n in names if not MANGLED.match(n)}


def init_names(source: str) -> set[str]:
    """Names the package's __init__.py defines in Python: functions, classes, assigned names and attributes."""
    out, deleted = set(), set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Delete):
            deleted |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            for sub in ast.walk(t):
                if isinstance(sub, ast.Name):
                    out.add(sub.id)
                elif isinstance(sub, ast.Attribute):
                    out.add(sub.attr)
    return {n for n in out - deleted if IDENT.fullmatch(n.encode())}


# ----------------------------------------------------------------------------------------------------- wheels
def pip_versions() -> list[str]:
    """Every version of the package pip can see for CPython 3.11 / x86-64 Linux (from pip's own error list)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *PIP_TARGET,
                           f"{PACKAGE}==0.0.0.0", "-d", tempfile.gettempdir()], capture_output=True, text=True)
    m = re.search(r"\(from versions: ([^)]*)\)", proc.stdout + proc.stderr)
    if not m:
        raise SystemExit(f"could not list the versions of {PACKAGE}:\n{proc.stderr[-2000:]}")
    return [v.strip() for v in m.group(1).split(",") if v.strip() and v.strip() != "none"]


def _vkey(v: str):
    from packaging.version import Version
    return Version(v)


def latest_per_major(versions: list[str], majors: list[int]) -> list[str]:
    out = []
    for major in majors:
        mine = [v for v in versions if v.split(".")[0] == str(major) and not _vkey(v).is_prerelease]
        if not mine:
            print(f"note: no {PACKAGE} {major}.x release on the index (seen: {', '.join(versions)})")
            continue
        out.append(max(mine, key=_vkey))
    return out


def download(version: str, dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *PIP_TARGET, f"{PACKAGE}=={version}",
                    "-d", str(dest)], check=True, capture_output=True, text=True)
    found = [p for p in dest.glob("*.whl") if f"-{version}-" in p.name]
    if not found:
        raise SystemExit(f"pip downloaded no wheel for {PACKAGE}=={version}")
    return found[0]


def read_wheel(path: Path) -> tuple[str, dict]:
    blob = path.read_bytes()
    names: set[str] = set()
    sources: dict[str, object] = {}
    version = None
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        for info in zf.infolist():
            fn = info.filename
            if fn.endswith(".dist-info/METADATA"):
                m = re.search(r"^Version: (\S+)", zf.read(fn).decode(), re.M)
                version = m.group(1) if m else None
            elif fn.endswith(".so") or ".so." in fn:
                found = so_names(zf.read(fn))
                sources[fn] = f"{len(found)} names (.rodata pybind11 strings)"
                names |= found
        for fn in zf.namelist():
            parts = fn.split("/")
            if len(parts) == 2 and parts[1] == "__init__.py":  # the top-level package, not plugin/
                extra = init_names(zf.read(fn).decode()) - names
                sources[fn] = sorted(extra)
                names |= extra
    if version is None:
        version = path.name.split("-")[1]
    return version, {"wheel": path.name, "sha256": hashlib.sha256(blob).hexdigest(), "sources": sources,
                     "expected_absent": [n for n in EXPECTED if n not in names], "names": sorted(names)}


METHOD = (
    "Each wheel of tensorrt-cu12-bindings (CPython 3.11, manylinux x86-64) is opened as a zip; every .so in it "
    "(only tensorrt_bindings/tensorrt.so, which also binds OnnxParser) is parsed as an ELF64 file. pybind11 "
    "registers classes, methods, properties, enum members and py::arg keyword names as C strings in .rodata, so "
    "the names are: every NUL-terminated string in .rodata that is a whole identifier "
    "([A-Za-z_][A-Za-z0-9_]{1,59}), plus the identifier starting at every .rodata address that an x86-64 "
    "RIP-relative lea in .text or an R_X86_64_RELATIVE relocation points at (this recovers names the linker stored "
    "as the tail of a longer string, e.g. Logger in ILogger, float16 in bfloat16, num_errors in get_num_errors). "
    "C++ RTTI strings (Itanium-mangled: N8nvinfer...E, FiiE, St6vector...) are dropped; .dynstr/.strtab (symbol "
    "names, glibc/CXXABI versions) are never read. Names defined in Python by the package's top-level __init__.py "
    "are added from its AST and listed under sources. Docstring words are not names (docstrings contain spaces). "
    "A name here means the binding registers that string somewhere in the module; it does not say on which "
    "class, so the check is per name, not per class.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", nargs="*", help=f"{PACKAGE} versions to fetch (default: the latest of each major)")
    ap.add_argument("--majors", nargs="*", type=int, default=[10, 11], help="majors for the default (10 11)")
    ap.add_argument("--wheel", action="append", default=[], type=Path, help="a wheel already on disk (repeatable)")
    ap.add_argument("--download-dir", type=Path, help="where pip puts the wheels (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=FIXTURE)
    args = ap.parse_args(argv)

    wheels = list(args.wheel)
    with tempfile.TemporaryDirectory() as tmp:
        dest = args.download_dir or Path(tmp)
        dest.mkdir(parents=True, exist_ok=True)
        if not wheels:
            seen = None
            versions = args.versions
            if not versions:
                seen = pip_versions()
                print(f"{PACKAGE} versions on the index: {', '.join(seen)}")
                versions = latest_per_major(seen, args.majors)
            wheels = [download(v, dest) for v in versions]
        result = {}
        for w in wheels:
            version, entry = read_wheel(w)
            result[version] = entry
            print(f"{version}: {w.name} sha256 {entry['sha256'][:16]}... {len(entry['names'])} names; "
                  f"checked names absent: {entry['expected_absent'] or 'none'}")

    made_by = " ".join(["python", "scripts/trt_api_names.py", *map(shlex.quote, sys.argv[1:] if argv is None
                                                                      else argv)])
    doc = {"made_by": made_by, "date": datetime.date.today().isoformat(), "method": METHOD,
           "package": PACKAGE, "checked_names": EXPECTED,
           "versions": dict(sorted(result.items(), key=lambda kv: _vkey(kv[0])))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1) + "\n"
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(text.encode())} bytes)")
    vs = list(doc["versions"])
    if len(vs) > 1:
        sets = {v: set(doc["versions"][v]["names"]) for v in vs}
        for a, b in zip(vs, vs[1:]):
            print(f"{a} -> {b}: {len(sets[a] - sets[b])} names gone, {len(sets[b] - sets[a])} new")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
