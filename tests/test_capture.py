"""The GPU fast path: which runs may capture the step (and why not), the data path that stays on the device, and
(on CUDA, run by scripts/gpu_check.sh) the captured step against the eager one."""
import pytest
import torch

from fmkt.capture import WARMUP, CapturedStep, capture_refusal, fast_path_plan
from fmkt.config import Config
from fmkt.data import BatchLoader, ImageTensors, dataset_info
from fmkt.data.loader import augment_batch
from fmkt.distillers import METHODS, build_distiller
from fmkt.engine import train_step
from fmkt.optim import build_optimizer, build_scheduler
from fmkt.student import StudentSpec, build_student

CUDA = torch.device("cuda")


def config(**method):
    cfg = Config()
    for k, v in method.items():
        setattr(cfg.method, k, v)
    return cfg


@pytest.mark.parametrize("method,world,device,why", [
    ({}, 1, CUDA, None),
    ({"name": "kd"}, 1, CUDA, None),
    ({}, 1, torch.device("cpu"), "needs CUDA"),
    ({}, 2, CUDA, "DDP"),
    ({"train_steps": "1,2,4,8,16"}, 1, CUDA, "draws N per iteration"),
    ({"dirac_ratio": 0.5}, 1, CUDA, "Dirac ratio"),
    ({"name": "dkd"}, 1, CUDA, "DKD's warm-up"),
    ({"loss": "dkd"}, 1, CUDA, "DKD's warm-up"),
    ({"loss": "dkd", "dkd_warmup_epochs": 0}, 1, CUDA, None),
])
def test_capture_steps_aside_where_a_step_is_not_the_same_computation(method, world, device, why):
    cfg = config(**method)
    got = capture_refusal(cfg, device, world, METHODS[cfg.method.name])
    assert (got is None) if why is None else (why in got), got


def test_fast_path_plan_says_what_it_does():
    cfg = config()
    assert fast_path_plan("auto", cfg, torch.device("cpu"), 1, METHODS["fmkt"])[:2] == (False, False)
    assert fast_path_plan("off", cfg, CUDA, 1, METHODS["fmkt"]) == (False, False, "fast path: off (--set "
                                                                     "train.fast_path=off)")
    on_gpu, capture, line = fast_path_plan("on", config(dirac_ratio=0.5), CUDA, 1, METHODS["fmkt"])
    assert on_gpu and not capture and "Dirac ratio" in line


def test_predrawn_augmentation_gives_the_same_batches():
    """The loader draws an epoch's augmentation randoms up front (so a GPU-resident dataset needs no host work per
    batch): the batches are exactly those of drawing per batch, as before."""
    info = dataset_info("fashion-mnist")
    gen = torch.Generator().manual_seed(3)
    data = ImageTensors(torch.rand(70, 1, 28, 28, generator=gen), torch.randint(0, 10, (70,), generator=gen))
    loader = BatchLoader(data, 16, shuffle=True, augment_info=info, seed=5, drop_last=False)
    loader.set_epoch(2)
    per_batch, idx, g = [], loader.indices(), loader._aug_generator()
    for b in range(len(loader)):
        sel = idx[b * 16:(b + 1) * 16]
        per_batch.append(augment_batch(data.images.index_select(0, sel), info, g))
    got = [images for images, _ in loader]
    assert len(got) == len(per_batch) == 5 and all(torch.equal(a, b) for a, b in zip(got, per_batch))
    moved = data.to("cpu")
    assert torch.equal(moved.images, data.images) and torch.equal(moved.labels, data.labels)


def _distiller(device, method="fmkt"):
    torch.manual_seed(0)
    common = dict(num_classes=10, channels=1, size=(28, 28), mean=(0.286,), std=(0.353,))
    teacher = build_student(StudentSpec(arch="resnet8", **common)).eval()
    m = METHODS[method]
    student = build_student(StudentSpec(arch="resnet8", encoder="conv" if m.flow else None, default_steps=4,
                                        **common))
    cfg = config(name=method, train_steps="4")
    return cfg, build_distiller(cfg.method, student, teacher, input_shape=(1, 28, 28)).to(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA (scripts/gpu_check.sh runs it on the GPU)")
@pytest.mark.parametrize("method", ["fmkt", "kd"])
@pytest.mark.parametrize("amp", [False, True])
def test_captured_step_trains_like_the_eager_step(method, amp):
    """Eight steps each way on the same batches (cuDNN deterministic): the captured replays give the eager losses
    and weights within the dtype's rounding: fp32 to 1e-5 (the same computation), bf16 to 1e-2 (on an H100 the
    bf16 FM-KT losses drifted to 2.1e-3 apart by step 8: convolutions may pick other algorithms inside a capture,
    and bf16 (eps 3.9e-3) rounds those differently)."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.rand(32, 1, 28, 28, generator=gen).cuda(), torch.randint(0, 10, (32,), generator=gen).cuda())
               for _ in range(8)]
    runs = {}
    for path in ("eager", "captured"):
        cfg, d = _distiller(CUDA, method)
        d.train()
        opt = build_optimizer(cfg, d.parameters())
        sched = build_scheduler(cfg, opt, 8)
        step = CapturedStep(d, opt, sched, amp) if path == "captured" else \
            (lambda i, y, p, d=d, opt=opt, sched=sched: train_step(d, opt, sched, i, y, p, amp))
        losses = [float(sum(step(i, y, 0.0).values()).detach()) for i, y in batches]
        runs[path] = losses, [p.detach().clone() for p in d.student.parameters()], float(opt.param_groups[0]["lr"])
    (le, pe, lre), (lc, pc, lrc) = runs["eager"], runs["captured"]
    assert lc[:WARMUP] == le[:WARMUP]
    loss_tol, param_tol = ((1e-2, 1e-4), (2e-2, 1e-3)) if amp else ((1e-5, 1e-6), (1e-4, 1e-6))
    torch.testing.assert_close(torch.tensor(lc), torch.tensor(le), rtol=loss_tol[0], atol=loss_tol[1])
    for a, b in zip(pc, pe):
        torch.testing.assert_close(a, b, rtol=param_tol[0], atol=param_tol[1])
    assert lrc == pytest.approx(lre)  # the schedule moved the LR the graph reads
