"""Plant one plausible bug at a time and check that the tests meant for it fail (issue 12's list, plus its items).

    python scripts/mutation_check.py                # every mutation (~3-4 minutes on 2 cores)
    python scripts/mutation_check.py --only dirac   # the mutations whose name contains "dirac"

Each mutation replaces one exact piece of source text (the script stops if the text is not found, so a refactor
that moves the code makes it fail loudly instead of testing nothing), runs the named tests with pytest, and
restores the file whatever happens. A mutation is CAUGHT when at least one of its tests fails. Prints a table and
exits 1 when any mutation survives. CPU only: the CUDA timing mutation is caught on CPU by the fake-timing test
(the real CUDA loop is checked by scripts/gpu_check.sh).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from mutations_early import MUTATIONS as EARLY, Mutation  # scripts/ is on sys.path when this file runs
from mutations_late import MUTATIONS as LATE

ROOT = Path(__file__).resolve().parents[1]
MUTATIONS = EARLY + LATE  # the table: mutations_early.py, mutations_late.py


def run(m: Mutation) -> tuple[bool, str, float]:
    path = ROOT / m.path
    original = path.read_text()
    if original.count(m.old) != 1:
        raise SystemExit(f"mutation {m.name!r}: the text to replace occurs {original.count(m.old)} times in "
                         f"{m.path}; update this script.")
    t0 = time.perf_counter()
    try:
        path.write_text(original.replace(m.old, m.new))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests],
                              cwd=ROOT, capture_output=True, text=True)
    finally:
        path.write_text(original)
    failed = [ln.split(" - ")[0].replace("FAILED ", "") for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
    return proc.returncode != 0, ", ".join(failed) or proc.stdout.strip().splitlines()[-1], time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the mutations whose name contains this text")
    args = ap.parse_args(argv)
    survived = 0
    for m in MUTATIONS:
        if args.only not in m.name:
            continue
        caught, detail, seconds = run(m)
        survived += not caught
        print(f"{'CAUGHT  ' if caught else 'SURVIVED'} {m.name}  ({seconds:.0f} s) -> {detail}", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
