#!/usr/bin/env bash
# Every GPU check of fmkt, each stage time-boxed so one slow stage cannot starve the rest. Install fmkt offline
# (the machine already has torch and triton), then run the stages named in $FMKT_GPU_STAGES (default: all):
#   triton    the Triton training path against the torch path under bf16: one step (loss + every gradient) and
#             20 steps, the fused step on the training shape, images/s of both  -> benchmarks/triton_vs_torch.py
#   fastpath  issue 20's checks: an image folder with 2 workers past the capture; tests/test_capture.py on CUDA
#             (every method x SGD/AdamW x fresh/resumed-from-CPU captured, the LR a resumed graph applies read from
#             the weights, a non-finite replay a no-op, bf16); SIGKILL + --resume of a captured run; the CLI's own
#             images/s captured vs eager -> scripts/gpu_fast_path.py (gpu_fast_path.json)
#   speed     the training-speed table: methods x eager/fast x kernel x batch 128/512 -> benchmarks/train_speed.py
#   numerics  TF32 against the fp32 gate; AOTInductor on CUDA: a plain torch CNN (is a crash torch's?) and
#             `fmkt-cli export --format aoti --device cuda` (a crash must end as one sentence) -> scripts/gpu_numerics.py
#   tests     the CUDA tests: kernels compiled (not interpreted), bf16 estimates on both paths, bench's CUDA timing
#   latency   `fmkt-cli bench` on CUDA for the default distill artifact and a CIFAR-shaped resnet8x4 student
#   kernels   the kernel benchmark (--quick)
#   compiled  latency of torch.compile and AOTInductor on CUDA (resnet8x4, the student alone and K=4)
#   imagenet  what an ImageNet run needs (issue 16): the captured step of resnet34 -> resnet18 at 224 x 224, batch
#             256 (none, kd, fmkt) -> benchmarks/train_speed.py --imagenet; the folder loader's images/s with 1-16
#             workers on this host's CPUs -> benchmarks/loader_speed.py
#   decode    data.decode=gpu (issue 21): batched nvjpeg decode vs CPU decode, the training loader's images/s with
#             CPU workers vs data.decode=gpu, the two paths' pixel difference, what nvjpeg does with CMYK and
#             truncated JPEGs -> scripts/gpu_decode.py (gpu_decode_cuda.json; dry run: --device cpu)
#   detection issue 23: images/s of a detection training step (fasterrcnn_resnet18_fpn, 128 px, batch 8; none, pkd,
#             fmkt with conv and dwconv), eager, and captured as a CUDA graph where torch can (the row says why not)
#             -> benchmarks/detection_speed.py (detection_speed_cuda-*.json; torchvision: the device image has 0.26.0)
# Wheels a machine lacks (e.g. pycocotools for a detection run's mAP, or torchvision 0.26.0 beside a bare torch 2.11)
# travel in .whl/ (git-ignored; carry it), installed first with --target /tmp/site:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl pycocotools
# Results go to $FMKT_BENCH_OUT (default benchmarks/results); each stage prints PASS/FAIL lines, and a summary of
# return codes ends the run.
#   FMKT_GPU_STAGES="triton numerics tests" FMKT_BENCH_OUT=$OUT bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${FMKT_BENCH_OUT:-benchmarks/results}"
PY="${PYTHON:-python}"
BUDGET="${FMKT_GPU_BUDGET:-540}"
STAGES="${FMKT_GPU_STAGES:-fastpath triton tests numerics speed latency kernels compiled imagenet decode detection}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
box() { local cap=$1 l; l=$(left); [ "$l" -lt "$cap" ] && cap=$l; [ "$cap" -lt 20 ] && cap=20; echo "$cap"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }
summary=""
note() { summary="$summary $1=$2"; }

echo "== stack"
"$PY" - <<'PY' || { echo "gpu_check: needs a CUDA GPU with torch and triton importable; stopping."; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "CUDA is not available"
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__}")
PY

echo "== install (offline, no dependencies)"
if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels (torchvision, timm), beside the image's packages
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" || echo "note: the carried wheels did not install"
fi
"$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e . \
    || { echo "gpu_check: pip install -e . failed; stopping."; exit 2; }
missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('pytest', 'numpy', 'yaml', 'typer', 'rich', 'sklearn', 'safetensors', 'onnx', 'onnxruntime', 'matplotlib') if u.find_spec(m) is None))")
[ -n "$missing" ] && echo "note: absent here: $missing (what needs them is skipped or reported)"

if want fastpath; then
    echo "== fastpath: folder + capture with workers, captured-step tests, SIGKILL + resume, the CLI's images/s"
    timeout "$(box 330)" "$PY" scripts/gpu_fast_path.py --out "$OUT" --budget 300 2>&1 | tee "$OUT/gpu_fast_path.log"
    note fastpath "${PIPESTATUS[0]}"
fi

if want triton; then
    echo "== triton: Triton vs torch training path (bf16 autocast)"
    timeout "$(box 120)" "$PY" benchmarks/triton_vs_torch.py --out "$OUT" 2>&1 | tee "$OUT/triton_vs_torch.log"
    note triton "${PIPESTATUS[0]}"
fi

if want tests; then
    echo "== tests: kernels compiled on CUDA, bf16 estimates, bench CUDA timing"
    if "$PY" -c "import pytest" 2>/dev/null; then
        timeout "$(box 150)" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
            "tests/test_flow.py::test_estimates_stay_exact_under_bf16_autocast_on_cuda" \
            "tests/test_bench.py::test_cuda_device_time_is_measured_on_the_stream_not_on_the_host" 2>&1 \
            | tee "$OUT/gpu_tests.log" | tail -n 25
        note tests "${PIPESTATUS[0]}"
    else
        echo "pytest is not installed: tests not run"; note tests 3
    fi
fi

if want numerics; then
    echo "== numerics: TF32 and AOTInductor on CUDA"
    timeout "$(box 300)" "$PY" scripts/gpu_numerics.py --out "$OUT" --timeout 100 2>&1 | tee "$OUT/gpu_numerics.log"
    note numerics "${PIPESTATUS[0]}"
fi

if want speed; then
    echo "== speed: images/s per method and path"
    timeout "$(box 240)" "$PY" benchmarks/train_speed.py --device cuda --out "$OUT" 2>&1 | grep -v Warning \
        | tee "$OUT/train_speed.log"
    note speed "${PIPESTATUS[0]}"
fi

if want latency; then
    echo "== latency (fmkt-cli bench on CUDA)"
    timeout "$(box 150)" "$PY" benchmarks/latency.py --device cuda --quick --no-compiled --out "$OUT" 2>&1 | tail -n 60
    note latency "${PIPESTATUS[0]}"
fi

if want kernels; then
    echo "== kernel benchmark"
    timeout "$(box 120)" "$PY" benchmarks/kernels.py --out "$OUT" --quick 2>&1 | tail -n 30
    note kernels "${PIPESTATUS[0]}"
fi

if want compiled; then
    echo "== latency of torch.compile and AOTInductor (resnet8x4)"
    timeout "$(box 200)" "$PY" -m fmkt.cli bench runs/bench-latency/resnet8x4-theta --device cuda \
        --backends compile,aoti --steps 4 --batch 1,64 --warmup 20 --iters 100 \
        --out "$OUT/latency_cuda_resnet8x4_compiled.json" 2>&1 | tail -n 20
    note compiled "${PIPESTATUS[0]}"
fi

if want imagenet; then
    echo "== ImageNet: the resnet34 -> resnet18 step at 224 x 224, batch 256, and the loader on this host"
    timeout "$(box 200)" "$PY" benchmarks/train_speed.py --device cuda --imagenet --warmup 4 --iters 10 \
        --out "$OUT" 2>&1 | grep -v Warning | tail -n 12
    note imagenet_step "${PIPESTATUS[0]}"
    workers=$(nproc); list="1"; for w in 4 8 16 32; do [ "$w" -le "$workers" ] && list="$list,$w"; done
    timeout "$(box 150)" "$PY" benchmarks/loader_speed.py --workers "$list" --images 2000 --rss-sizes "" \
        --name gpu-host --out "$OUT" 2>&1 | tail -n 40
    note imagenet_loader "${PIPESTATUS[0]}"
fi

if want decode; then
    echo "== decode: CPU workers vs data.decode=gpu (batched nvjpeg), images/s, agreement, bad JPEGs"
    timeout "$(box 150)" "$PY" scripts/gpu_decode.py --out "$OUT" --images 768 --batch 128 2>&1 \
        | tee "$OUT/gpu_decode.log" | tail -n 70
    note decode "${PIPESTATUS[0]}"
fi

if want detection; then
    echo "== detection: images/s of a detection training step, eager and captured (where torch can capture it)"
    if "$PY" -c "import torchvision" 2>/dev/null; then
        timeout "$(box 240)" "$PY" benchmarks/detection_speed.py --device cuda --out "$OUT" 2>&1 | grep -v Warning \
            | tee "$OUT/detection_speed.log" | tail -n 20
        note detection "${PIPESTATUS[0]}"
    else
        echo "torchvision is not importable here (carry it in .whl/, see the top of this script): detection not run"
        note detection 3
    fi
fi

echo "== summary (return codes):$summary; $(( $(date +%s) - start )) s"
for kv in $summary; do [ "${kv#*=}" -eq 0 ] || exit 1; done
