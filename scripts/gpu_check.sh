#!/usr/bin/env bash
# GPU check of fmkt.kernels, inside 8 minutes: install fmkt offline (the machine already has torch and triton),
# run the kernel tests compiled on CUDA (not interpreted), run the benchmark, print a short table.
#   bash scripts/gpu_check.sh            # results go to benchmarks/results (or $FMKT_BENCH_OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${FMKT_BENCH_OUT:-benchmarks/results}"
PY="${PYTHON:-python}"
unset TRITON_INTERPRET
start=$(date +%s)

echo "== stack"
"$PY" - <<'PY' || { echo "gpu_check: needs a CUDA GPU with torch and triton importable; stopping."; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "CUDA is not available"
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__}")
PY

echo "== install (offline, no dependencies)"
"$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e . \
    || { echo "gpu_check: pip install -e . failed; stopping."; exit 2; }
missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('pytest', 'numpy', 'yaml', 'typer', 'rich', 'sklearn', 'safetensors') if u.find_spec(m) is None))")
[ -n "$missing" ] && echo "note: absent here: $missing (tests that need them are skipped)"

tests_rc=0
echo "== kernel tests on CUDA"
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout 270 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 25
    tests_rc=${PIPESTATUS[0]}
else
    echo "pytest is not installed: kernel tests not run"; tests_rc=3
fi

echo "== benchmark"
left=$(( 450 - ($(date +%s) - start) ))
flags=""
[ "$left" -lt 240 ] && flags="--quick"
timeout $(( left > 60 ? left : 60 )) "$PY" benchmarks/kernels.py --out "$OUT" $flags
bench_rc=$?

echo "== summary: tests rc=$tests_rc, benchmark rc=$bench_rc, $(( $(date +%s) - start )) s"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
