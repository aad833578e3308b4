"""fmkt.kernels against their pure-torch twins: outputs and gradients, fp32 and fp16, odd shapes, poisoned outputs.

With CUDA (scripts/gpu_check.sh) every test runs here, compiled on the GPU, plus bf16. Without a GPU the kernels
run in Triton's interpreter, on CPU tensors. Triton reads TRITON_INTERPRET when a kernel is decorated, and
also for its own library functions when Triton is first imported, which other tests do (``fmkt-cli info``), so
it cannot be switched on inside this process: ``test_kernels_interpreted_in_subprocess`` reruns this file in a
child process with TRITON_INTERPRET=1, where the kernel tests are defined and run. The rest of the suite never
sees the variable.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fmkt.kernels as kernels
from fmkt.distillers import build_distiller
from fmkt.errors import FmktError
from fmkt.flow.encoders import MLPEncoder, TimeEmbedding
from fmkt.flow.sampler import euler_step_reference, run_sampler
from fmkt.flow.schedules import build_schedule
from fmkt.models import create_model
from fmkt.student import DeployableModel

CUDA = torch.cuda.is_available()
INNER = os.environ.get("FMKT_KERNEL_TESTS") == "interpreted"  # the child process of the subprocess test
RUN_KERNELS_HERE = CUDA or INNER


def _defined_if(condition: bool):
    """Keep a test only where it can run (a None attribute is not collected, so nothing shows as skipped)."""
    return (lambda fn: fn) if condition else (lambda fn: None)


kernel_test = _defined_if(RUN_KERNELS_HERE)  # runs a kernel: on the GPU, or in the interpreted child process
host_test = _defined_if(not INNER)  # needs no kernel: in the parent process only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# (atol, rtol) of a kernel in this dtype against the fp32 reference on the same (rounded) inputs.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# The whole sampler keeps its state in fp32 but feeds the matmuls in the storage dtype, K steps in a row.
SAMPLER_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}
TINY = ["--set", "data.train_subset=96", "--set", "data.test_subset=48", "--batch-size", "32",
        "--set", "teacher.arch=resnet8", "--set", "teacher.epochs=1", "--set", "method.train_steps=2"]


def cli(*args):
    """Invoke fmkt-cli in process (skipped where the CLI's dependencies are absent, e.g. a bare GPU image)."""
    for mod in ("typer", "rich", "yaml", "sklearn", "safetensors"):
        pytest.importorskip(mod)
    from typer.testing import CliRunner

    from fmkt.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def ops():
    """The kernel modules (compiled for CUDA, or interpreted in the child process), with the device to use."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (pip install -e '.[kernels]')")
    with pytest.MonkeyPatch.context() as mp:
        if CUDA:
            mp.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 compares exact math on both sides
            mp.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        es = importlib.import_module("fmkt.kernels.euler_step")
        ms = importlib.import_module("fmkt.kernels.mlp_sampler")
        assert es.INTERPRETED == (not CUDA)
        yield SimpleNamespace(es=es, ms=ms, device=torch.device("cuda" if CUDA else "cpu"))


@pytest.fixture
def poisoned(ops, monkeypatch):
    """Every buffer the kernels' host code allocates starts as NaN, so an element a kernel misses fails."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ops.es, "_empty", nan_empty)
    monkeypatch.setattr(ops.ms, "_empty", nan_empty)
    return ops


@pytest.fixture
def seeded(request):
    """Fresh random inputs in every case (a seed from the test id), reproducible from run to run."""
    torch.manual_seed(zlib.crc32(request.node.name.encode()))


def close(actual, expected, dtype, tol=TOL, what="", out_dtype=None):
    """``actual`` in ``out_dtype`` (default: the operands' ``dtype``) and within ``dtype``'s tolerance."""
    atol, rtol = tol[dtype]
    out_dtype = out_dtype or dtype
    assert actual.dtype == out_dtype, f"{what}: dtype {actual.dtype}, expected {out_dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an unwritten element?)"
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol, msg=what)


def small_step_tiles(n_planes, hw):
    return 2, 16, 4  # several programs, a partial last row block, several HW chunks


def small_sampler_tiles(c, hw, hid):
    import triton

    return 16, max(16, triton.next_power_of_2(c)), 16, 4  # several pixel tiles and hidden / output chunks


# ---------------------------------------------------------------- dispatch, config and CLI (no kernel runs)
def tiny_student(encoder="mlp", schedule="rectified", transfer="logits", classes=5):
    backbone = create_model("resnet8", num_classes=classes, in_channels=1)
    return DeployableModel(backbone, (0.5,), (0.25,), encoder=encoder, schedule=schedule, transfer=transfer)


@host_test
def test_install_torch_and_auto_on_cpu_use_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_student()
    assert kernels.install_step_kernel(model, "torch") == "torch"
    assert model.step_fn is None and model.sampler_fn is None
    assert kernels.install_step_kernel(model, "auto", "cpu") == "torch"
    assert model.step_fn is None and model.sampler_fn is None


@host_test
def test_auto_falls_back_to_torch_on_gpus_the_kernels_do_not_support(monkeypatch):
    """A GPU under compute capability 8.0 (Triton's minimum), or a device index CUDA does not have: auto takes the
    torch path and the summary line says why; --kernel triton refuses in one sentence."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 0) if i == 1 else (9, 0))
    monkeypatch.setattr(kernels, "triton_import_error", lambda: None)
    model = tiny_student()
    assert kernels.install_step_kernel(model, "auto", "cuda:1") == "torch"
    assert model.step_fn is None and model.sampler_fn is None
    assert "compute capability 7.0 and Triton needs 8.0" in kernels.kernel_summary("auto", "cuda:1")
    with pytest.raises(FmktError, match="compute capability 7.0"):
        kernels.install_step_kernel(model, "triton", "cuda:1")
    assert "no cuda:3" in kernels.kernel_unavailable_reason("cuda:3")
    # a supported GPU: auto installs what was shown faster: the whole-sampler inference always, the fused training
    # step only inside a captured step (where it pays)
    assert kernels.install_step_kernel(model, "auto", "cuda:0") == "torch"
    assert (model.sampler_fn is not None) == kernels.AUTO_SAMPLER_KERNEL and model.step_fn is None
    assert "torch training step" in kernels.kernel_summary("auto", "cuda:0")
    assert kernels.install_step_kernel(model, "auto", "cuda:0", captured=True) == "triton"
    assert model.step_fn is kernels.fused_euler_step
    assert "inside the captured training step" in kernels.kernel_summary("auto", "cuda:0", captured=True)


@host_test
def test_kernel_launches_are_guarded_by_the_tensors_device():
    """Triton launches on the current device: a run on cuda:1 must launch under torch.cuda.device(cuda:1)."""
    from types import SimpleNamespace

    from fmkt.kernels import on_device

    guard = on_device(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(on_device(torch.zeros(1)), torch.cuda.device)


@host_test
def test_install_triton_on_cpu_is_one_sentence(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(FmktError, match=r"--kernel triton needs a CUDA GPU.*TRITON_INTERPRET=1"):
        kernels.install_step_kernel(tiny_student(), "triton", "cpu")
    with pytest.raises(FmktError, match="unknown kernel 'fast'"):
        kernels.install_step_kernel(tiny_student(), "fast")


@host_test
def test_dispatcher_falls_back_off_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, v, z = (torch.randn(2, 3, 4, 5) for _ in range(3))
    e = torch.randn(1, 3)
    for got, want in zip(kernels.fused_euler_step(x, v, z, e, 0.5, 1.0, -1.0),
                         euler_step_reference(x, v, z, e, 0.5, 1.0, -1.0)):
        assert torch.equal(got, want)
    with torch.no_grad():
        assert kernels.fused_mlp_sampler(z, MLPEncoder(3), TimeEmbedding(3), build_schedule("rectified").steps(2)) is None


@host_test
def test_whole_sampler_dispatch_refuses_every_encoder_but_mlp(monkeypatch):
    """Where the kernels could run, ``fused_mlp_sampler`` still returns None (the caller's torch loop) for any
    registered encoder other than mlp: the whole-sampler kernel implements MLPEncoder only."""
    pytest.importorskip("triton")
    from fmkt.flow.encoders import ENCODERS, build_encoder

    ms = importlib.import_module("fmkt.kernels.mlp_sampler")
    monkeypatch.setattr(kernels, "_kernel_runs_on", lambda *t: True)
    monkeypatch.setattr(ms, "mlp_sampler_forward", lambda *a: pytest.fail("launched the mlp kernel"))
    z = torch.randn(2, 8, 3, 3)
    steps = build_schedule("rectified").steps(2)
    others = [name for name in ENCODERS if name != "mlp"]
    assert "dwconv" in others
    with torch.no_grad():
        for name in others:
            assert kernels.fused_mlp_sampler(z, build_encoder(name, 8), TimeEmbedding(8), steps) is None, name


@host_test
def test_cli_kernel_triton_on_cpu_fails_with_a_sentence(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    result = cli("distill", "--kernel", "triton", "--epochs", "1", "--set", "train.device=cpu",
                 "--out", tmp_path / "d", *TINY)
    assert result.exit_code == 2, result.output
    assert "--kernel triton needs a CUDA GPU" in result.output and "Traceback" not in result.output
    result = cli("train", "--kernel", "bogus", "--out", tmp_path / "t")
    assert result.exit_code == 2 and "train.kernel" in result.output


@host_test
def test_cli_kernel_auto_trains_on_cpu_through_the_reference(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "d"
    result = cli("distill", "--kernel", "auto", "--encoder", "mlp", "--epochs", "1", "--eval-steps", "1,2",
                 "--set", "train.device=cpu", "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "artifact" / "fmkt.json").read_text())
    assert set(meta["metrics"]["last"]) == {"1", "2"}
    assert "kernel: auto" in (out / "config.yaml").read_text()


@_defined_if(not RUN_KERNELS_HERE)
def test_kernels_interpreted_in_subprocess():
    """No GPU: run this file's kernel tests in a child process under Triton's interpreter."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (pip install -e '.[kernels]')")
    env = {**os.environ, "TRITON_INTERPRET": "1", "FMKT_KERNEL_TESTS": "interpreted"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                          env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"interpreted kernel tests failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    print(f"interpreted kernel tests: {summary}")


# ---------------------------------------------------------------- the fused step
SHAPES = [(1, 5, 3, 7), (3, 24, 5, 5), (2, 7, 1, 1), (1, 3, 9, 11)]
COEFS = [(0.25, 1.0, -1.0), (0.125, 0.7, 1.9)]  # rectified flow, and a VP/VE-like (p, q)


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("e_mode", ["shared", "per_sample", "last"])
@pytest.mark.parametrize("small_tiles", [False, True], ids=["tiles", "small_tiles"])
def test_fused_step_forward_and_backward(poisoned, seeded, monkeypatch, dtype, shape, e_mode, small_tiles):
    ops = poisoned
    if small_tiles:
        monkeypatch.setattr(ops.es, "_tiles", small_step_tiles)
    dt, p, q = COEFS[zlib.crc32(repr((shape, e_mode)).encode()) % 2]
    b, c = shape[:2]
    x, v, z = (torch.randn(shape, device=ops.device).to(dtype) for _ in range(3))
    e = None if e_mode == "last" else torch.randn(1 if e_mode == "shared" else b, c, device=ops.device).to(dtype)
    inputs = [t for t in (x, v, z, e) if t is not None]
    kern_in = [t.clone().requires_grad_() for t in inputs]
    ref_in = [t.float().requires_grad_() for t in inputs]
    kx, kv, kz = kern_in[:3]
    ke = kern_in[3] if e is not None else None
    rx, rv, rz = ref_in[:3]
    re_ = ref_in[3] if e is not None else None
    out = ops.es.FusedEulerStep.apply(kx, kv, kz, ke, dt, p, q)
    ref = euler_step_reference(rx, rv, rz, re_, dt, p, q)
    for name, got, want in zip(("x_next", "u_next", "pooled"), out, ref):
        if want is None:
            assert got is None, name
        else:  # the pooled estimate is fp32 whatever the operands (VP/VE's |q| ~ 10^2 would drown it otherwise)
            close(got, want, dtype, what=name, out_dtype=torch.float32 if name == "pooled" else None)
    grads_out = [torch.randn_like(o) if o is not None else None for o in out]
    used = [(o, g) for o, g in zip(out, grads_out) if o is not None]
    got = torch.autograd.grad([o for o, _ in used], kern_in, [g for _, g in used])
    used_ref = [(o, g.float()) for o, g in zip(ref, grads_out) if o is not None]
    want = torch.autograd.grad([o for o, _ in used_ref], ref_in, [g for _, g in used_ref])
    for name, g, w in zip(("dx", "dv", "dz1", "de"), got, want):
        close(g, w, dtype, what=name)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_step_backward_with_only_the_pooled_estimate_used(poisoned, seeded, dtype):
    """The last step's x_next is unused in logit transfer: missing output gradients count as zero."""
    ops = poisoned
    x, v, z = (torch.randn(2, 6, 3, 5, device=ops.device).to(dtype).requires_grad_() for _ in range(3))
    _, _, pooled = ops.es.FusedEulerStep.apply(x, v, z, None, 0.5, 1.0, -1.0)
    g = torch.randn_like(pooled)
    dx, dv, dz = torch.autograd.grad(pooled, (x, v, z), g, allow_unused=True)
    assert dx is None
    rv, rz = v.detach().float().requires_grad_(), z.detach().float().requires_grad_()
    wv, wz = torch.autograd.grad((1.0 * rz - rv).mean(dim=(2, 3)), (rv, rz), g.float())
    close(dv, wv, dtype, what="dv")
    close(dz, wz, dtype, what="dz1")


@kernel_test
@pytest.mark.parametrize("encoder,schedule,method", [("conv", "rectified", "fmkt"), ("mlp", "vp", "theta"),
                                                     ("transformer", "ve", "ofmkt"), ("dwconv", "vp", "fmkt")])
def test_training_step_through_the_fused_path_matches_torch(ops, seeded, monkeypatch, encoder, schedule, method):
    MethodConfig = pytest.importorskip("fmkt.config").MethodConfig  # needs pyyaml
    student = tiny_student(encoder, schedule).to(ops.device)
    if method == "theta":
        student.theta_head = torch.nn.Linear(student.num_features, student.num_classes).to(ops.device)
    teacher = DeployableModel(create_model("resnet8", num_classes=5, in_channels=1), (0.5,), (0.25,))
    distiller = build_distiller(MethodConfig(name=method, encoder=encoder, schedule=schedule, train_steps="3"),
                                student, teacher.to(ops.device).eval())
    distiller.train()
    images = torch.rand(6, 1, 8, 8, device=ops.device)
    labels = torch.randint(0, 5, (6,), device=ops.device)

    def step():
        distiller.zero_grad(set_to_none=True)
        _, losses = distiller(images, labels, 0.5)
        loss = sum(losses.values())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    loss_ref, grads_ref = step()
    calls = []
    forward = ops.es.euler_step_forward
    monkeypatch.setattr(ops.es, "euler_step_forward", lambda *a: calls.append(1) or forward(*a))
    assert kernels.install_step_kernel(student, "triton", ops.device) == "triton"
    loss_k, grads_k = step()
    assert len(calls) == 3  # every step went through the kernel
    torch.testing.assert_close(loss_k, loss_ref, atol=1e-5, rtol=1e-5)
    assert grads_k.keys() == grads_ref.keys() and any("encoder" in n for n in grads_k)
    for n in grads_ref:
        torch.testing.assert_close(grads_k[n], grads_ref[n], atol=1e-5, rtol=1e-4, msg=n)


# ---------------------------------------------------------------- the whole sampler (mlp encoder)
def random_mlp(c, depth=2, expansion=2, device="cpu"):
    enc, temb = MLPEncoder(c, depth=depth, expansion=expansion), TimeEmbedding(c)
    with torch.no_grad():
        for prm in list(enc.parameters()) + list(temb.parameters()):
            prm.normal_(0.0, 0.3).copy_(prm.half().float())  # fp16-representable: the fp16 case rounds nothing
    return enc.to(device), temb.to(device)


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,c,h,w,depth,k,schedule", [
    (1, 24, 3, 5, 2, 4, "rectified"), (2, 10, 1, 1, 1, 1, "vp"), (2, 17, 5, 7, 2, 5, "ve"), (1, 33, 4, 4, 3, 2, "vp"),
])
@pytest.mark.parametrize("small_tiles", [False, True], ids=["tiles", "small_tiles"])
def test_whole_sampler_matches_the_torch_loop(poisoned, seeded, monkeypatch, dtype, b, c, h, w, depth, k, schedule,
                                              small_tiles):
    ops = poisoned
    if small_tiles:
        monkeypatch.setattr(ops.ms, "_tiles", small_sampler_tiles)
    enc, temb = random_mlp(c, depth, device=ops.device)
    steps = build_schedule(schedule).steps(k)
    z1 = torch.randn(b, c, h, w, device=ops.device).to(dtype)
    est, fin = ops.ms.mlp_sampler_forward(z1, enc, temb, steps)
    ref = run_sampler(z1.float(), enc, temb, steps)
    close(est, ref.mean_pooled(), dtype, SAMPLER_TOL, "mean pooled estimate", out_dtype=torch.float32)
    close(fin, ref.final_state.mean(dim=(2, 3)), dtype, SAMPLER_TOL, "pooled final state", out_dtype=torch.float32)


@kernel_test
@pytest.mark.parametrize("transfer", ["logits", "features"])
def test_student_inference_uses_the_whole_sampler(ops, seeded, monkeypatch, transfer):
    model = tiny_student("mlp", "rectified", transfer).to(ops.device).eval()
    images = torch.rand(2, 1, 8, 8, device=ops.device)
    with torch.no_grad():
        want = {k: model(images, steps=k) for k in (1, 3)}
        calls = []
        forward = ops.ms.mlp_sampler_forward
        monkeypatch.setattr(ops.ms, "mlp_sampler_forward", lambda *a: calls.append(1) or forward(*a))
        kernels.install_step_kernel(model, "triton", ops.device)
        for k, logits in want.items():
            torch.testing.assert_close(model(images, steps=k), logits, atol=1e-4, rtol=1e-4)
    assert len(calls) == 2
    assert kernels.fused_mlp_sampler(model.features(images), model.encoder, model.time_embed,
                               model.schedule.steps(2)) is None  # gradients on: training keeps the step kernel


@kernel_test
def test_cli_kernel_triton_runs_interpreted_or_on_gpu(ops, tmp_path):
    out = tmp_path / "d"
    result = cli("distill", "--kernel", "triton", "--method", "ofmkt", "--encoder", "mlp", "--epochs", "1",
                 "--eval-steps", "1,2", "--out", out, "--batch-size", "16", "--set", "data.train_subset=32",
                 "--set", "data.test_subset=6", "--set", "method.train_steps=2")
    assert result.exit_code == 0, result.output
    assert set(json.loads((out / "artifact" / "fmkt.json").read_text())["metrics"]["last"]) == {"1", "2"}


@kernel_test
@pytest.mark.parametrize("transfer", ["logits", "features"])
def test_dwconv_inference_runs_the_loop_with_the_fused_step(ops, seeded, monkeypatch, transfer):
    """dwconv has no whole-sampler kernel: with the kernels installed, inference is the torch loop whose steps go
    through the fused Euler step (K launches for K steps), the mlp kernel is never launched, and the logits are
    those of the torch path."""
    model = tiny_student("dwconv", "vp", transfer).to(ops.device).eval()
    images = torch.rand(2, 1, 8, 8, device=ops.device)
    with torch.no_grad():
        want = {k: model(images, steps=k) for k in (1, 3)}
        step_calls = []
        forward = ops.es.euler_step_forward
        monkeypatch.setattr(ops.es, "euler_step_forward", lambda *a: step_calls.append(1) or forward(*a))
        monkeypatch.setattr(ops.ms, "mlp_sampler_forward", lambda *a: pytest.fail("launched the mlp kernel"))
        kernels.install_step_kernel(model, "triton", ops.device)
        assert model.sampler_fn is kernels.fused_mlp_sampler  # installed, and it declines dwconv
        assert model.sampler_fn(model.features(images), model.encoder, model.time_embed,
                                model.schedule.steps(2), transfer) is None
        for k, logits in want.items():
            torch.testing.assert_close(model(images, steps=k), logits, atol=1e-4, rtol=1e-4)
    assert len(step_calls) == 1 + 3
