"""GPU checks of issue 12 that are not unit tests: TF32 against the fp32 gate, and AOTInductor crash isolation.

    python scripts/gpu_numerics.py --out DIR          # on a CUDA GPU, ~2-4 minutes (two AOTI compiles)

1. TF32: a CIFAR-shaped FM-KT student (resnet8x4, conv encoder, K = 4, random weights) on 32x32 images, CUDA fp32
   logits against CPU fp32 logits, with PyTorch's default flags (cuDNN convolutions may use TF32) and inside
   ``fmkt.runtime.strict_fp32`` (what evaluation, export validation and bench fp32 now use). The fp32 parity gate is
   1e-4: PASS when strict fp32 is within it.
2. AOTInductor on CUDA, plain torch: a minimal CNN (conv-BN-ReLU-pool-linear, no fmkt code) compiled and run in a
   child process. If it dies by a signal, the crash is torch's, not our graph's.
3. AOTInductor on CUDA through fmkt: ``fmkt-cli export ART --steps 4 --format aoti --device cuda`` in a child. PASS
   when the CLI itself ends normally: exit 0 (parity passed) or exit 2 with one sentence (a crash isolated in the
   compile child); FAIL when the CLI process dies (exit >= 128 or by a signal).
Prints PASS/FAIL lines; writes OUT/gpu_numerics.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

PLAIN_CNN = r"""
import sys, torch
from torch import nn
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(), nn.Linear(32, 10)).cuda().eval()
x = torch.rand(4, 3, 32, 32, device="cuda")
dim = torch.export.Dim("batch", min=1, max=64)
with torch.no_grad():
    ep = torch.export.export(net, (x,), dynamic_shapes=({0: dim},))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=sys.argv[1])
    print("compiled", flush=True)
    runner = torch._inductor.aoti_load_package(path)
    print("loaded", flush=True)
    out = runner(x)
    torch.cuda.synchronize()
print("ran", float((out - net(x)).abs().max()), flush=True)
"""


def make_artifact(path: Path) -> Path:
    from fmkt.artifact import save_artifact
    from fmkt.student import StudentSpec, build_student, spec_of

    torch.manual_seed(0)
    spec = StudentSpec(arch="resnet8x4", num_classes=100, channels=3, size=(32, 32), mean=(0.507, 0.487, 0.441),
                       std=(0.267, 0.256, 0.276), encoder="conv", default_steps=4)
    model = build_student(spec).eval()  # the one builder, as every artifact's model is made
    return save_artifact(path, model, spec_of(model).to_json(),
                         {"method": "fmkt", "dataset": {"name": "synthetic"}, "train_steps": [4]})


def tf32_check(artifact: Path) -> dict:
    from fmkt.artifact import load_artifact
    from fmkt.runtime import strict_fp32

    model, _ = load_artifact(artifact)
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x, steps=4)
        gpu = model.cuda()
        default = (gpu(x.cuda(), steps=4).cpu() - ref).abs().max().item()
        with strict_fp32():
            strict = (gpu(x.cuda(), steps=4).cpu() - ref).abs().max().item()
    flags = {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
             "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    return {"default_flags": flags, "max_abs_diff_default": default, "max_abs_diff_strict_fp32": strict,
            "gate": 1e-4, "pass": strict <= 1e-4}


def child(cmd: list[str], timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, (proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired as exc:
        rc, text = None, f"timed out after {timeout:.0f} s; {(exc.stdout or b'')[-300:]!r}"
    tail = [ln for ln in text.strip().splitlines() if ln.strip()][-6:]
    return {"returncode": rc, "seconds": round(time.perf_counter() - t0, 1), "tail": tail}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per AOTI child")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="fmkt-gpu-") as tmp:
        art = make_artifact(Path(tmp) / "artifact")
        res["tf32"] = tf32_check(art)
        t = res["tf32"]
        print(f"{'PASS' if t['pass'] else 'FAIL'} tf32: CUDA fp32 vs CPU fp32 logits (resnet8x4, K=4): max |diff| "
              f"{t['max_abs_diff_default']:.2e} with torch's default flags {t['default_flags']}, "
              f"{t['max_abs_diff_strict_fp32']:.2e} in strict fp32 (gate 1e-4)", flush=True)
        plain = child([sys.executable, "-c", PLAIN_CNN, str(Path(tmp) / "plain.pt2")], args.timeout)
        plain["crashed"] = plain["returncode"] is not None and plain["returncode"] < 0
        res["aoti_plain_cnn"] = plain
        print(f"{'INFO'} aoti plain torch CNN on CUDA: return code {plain['returncode']} in {plain['seconds']} s "
              f"({'crashed by a signal: a torch bug, not ours' if plain['crashed'] else 'no crash'}); "
              f"last lines: {plain['tail'][-2:]}", flush=True)
        cli = child([sys.executable, "-m", "fmkt.cli", "export", str(art), "--steps", "4", "--format", "aoti",
                     "--device", "cuda", "--batch", "1:8:32", "--out", str(Path(tmp) / "aoti")], 2 * args.timeout)
        rc = cli["returncode"]
        cli["pass"] = rc in (0, 2)
        res["aoti_fmkt_export"] = cli
        print(f"{'PASS' if cli['pass'] else 'FAIL'} fmkt-cli export --format aoti --device cuda: exit {rc} in "
              f"{cli['seconds']} s ({'parity passed' if rc == 0 else 'one sentence, crash isolated' if rc == 2 else 'the CLI died'}); "
              f"last lines: {cli['tail'][-3:]}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_numerics.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0 if (res["tf32"]["pass"] and cli["pass"]) else 1


if __name__ == "__main__":
    sys.exit(main())
