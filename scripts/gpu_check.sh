#!/usr/bin/env bash
# Every GPU check of fmkt in one run, inside ~9 minutes, each stage time-boxed so one slow stage cannot starve the
# rest: install fmkt offline (the machine already has torch and triton), then
#   1. latency: `fmkt-cli bench` on CUDA for the default distill artifact and a CIFAR-shaped resnet8x4 student
#      (eager, CUDA-graph replay, ONNX Runtime, TensorRT; fp32 and fp16; K in {0, 1, 4}) -> benchmarks/latency.py
#   2. the kernel tests compiled on CUDA (not interpreted)
#   3. the kernel benchmark (--quick)
#   4. latency of torch.compile and AOTInductor on CUDA (resnet8x4, the student alone and K=4)
# Results go to $FMKT_BENCH_OUT (default benchmarks/results); a short table is printed at the end.
#   bash scripts/gpu_check.sh
# Needs runs/distill/artifact (the default `fmkt-cli distill` artifact; made here on the GPU when absent) and
# writes the random-weights resnet8x4 artifact under runs/bench-latency.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${FMKT_BENCH_OUT:-benchmarks/results}"
PY="${PYTHON:-python}"
BUDGET="${FMKT_GPU_BUDGET:-540}"
unset TRITON_INTERPRET
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
box() { local cap=$1 l; l=$(left); [ "$l" -lt "$cap" ] && cap=$l; [ "$cap" -lt 20 ] && cap=20; echo "$cap"; }

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
print(' '.join(m for m in ('pytest', 'numpy', 'yaml', 'typer', 'rich', 'sklearn', 'safetensors', 'onnx', 'onnxruntime', 'matplotlib') if u.find_spec(m) is None))")
[ -n "$missing" ] && echo "note: absent here: $missing (what needs them is skipped or reported)"

echo "== 1. latency (fmkt-cli bench on CUDA)"
timeout "$(box 150)" "$PY" benchmarks/latency.py --device cuda --quick --no-compiled --out "$OUT" 2>&1 | tail -n 60
lat_rc=${PIPESTATUS[0]}

tests_rc=0
echo "== 2. kernel tests on CUDA"
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout "$(box 180)" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 15
    tests_rc=${PIPESTATUS[0]}
else
    echo "pytest is not installed: kernel tests not run"; tests_rc=3
fi

echo "== 3. kernel benchmark"
timeout "$(box 120)" "$PY" benchmarks/kernels.py --out "$OUT" --quick 2>&1 | tail -n 30
bench_rc=${PIPESTATUS[0]}

echo "== 4. latency of torch.compile and AOTInductor (resnet8x4)"
timeout "$(box 200)" "$PY" -m fmkt.cli bench runs/bench-latency/resnet8x4-theta --device cuda \
    --backends compile,aoti --steps 4 --batch 1,64 --warmup 20 --iters 100 \
    --out "$OUT/latency_cuda_resnet8x4_compiled.json" 2>&1 | tail -n 20
comp_rc=${PIPESTATUS[0]}

echo "== summary: latency rc=$lat_rc, kernel tests rc=$tests_rc, kernel benchmark rc=$bench_rc, compiled latency rc=$comp_rc, $(( $(date +%s) - start )) s"
[ "$lat_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$comp_rc" -eq 0 ]
