"""Top-1 accuracy of a deployable student at each K, in IEEE fp32 (the numbers fmkt.json stores and bench shows).

Keys: ``"plain"`` for a plain model (teachers and the baselines), ``"0"`` for the FM-KT^Theta head, ``"K"`` for K
flow steps. Z1 is computed once per batch and every K reuses it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fmkt.data import make_loader
from fmkt.runtime import ddp_active, strict_fp32
from fmkt.student import DeployableModel


def step_label(k) -> str:
    """How a K value reads in tables: theta for 0, K=n otherwise, 'student' for a plain model."""
    return {"0": "theta (K=0)", "plain": "student"}.get(str(k), f"K={k}")


def eval_keys(model: DeployableModel, steps) -> list[str]:
    """Keys to evaluate: "plain" for a plain model; else each K it can run, plus "0" when it has a theta head."""
    if not model.is_flow:
        return ["plain"]
    steps = list(steps) + ([0] if model.theta_head is not None and 0 not in steps else [])
    return [str(k) for k in model.available_steps(steps)]


@torch.no_grad()
def evaluate(model: DeployableModel, data, keys: list[str], batch_size: int, device) -> dict:
    """Top-1 accuracy (%) on ``data`` (ImageTensors, or an image folder's split: decoded by DataLoader workers,
    evaluation transform) for each key; IEEE fp32 whatever the training precision.

    Under DDP each rank counts its shard (items r, r + W, ...) and the counts are summed: every rank returns the
    same numbers, those of the whole set (the caller makes the models equal first). The number of images scored
    (an image folder leaves out the files it cannot decode) is noted on ``data`` for :func:`evaluated_images`.
    """
    whole = data
    if ddp_active():
        data = data.shard(dist.get_rank(), dist.get_world_size())
    loader = make_loader(data, batch_size, shuffle=False, augment_info=None, seed=0, device=device)
    correct, total = count_correct(model, loader, keys, device)
    if ddp_active():
        counts = torch.tensor([correct[k] for k in keys] + [total], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        correct, total = {k: int(c) for k, c in zip(keys, counts[:-1].tolist())}, int(counts[-1])
    whole.evaluated = total  # all ranks together
    return {k: 100.0 * correct[k] / max(total, 1) for k in keys}


def evaluated_images(data) -> dict:
    """fmkt.json's counts for an evaluation split (its :meth:`fmkt.data.Split.evaluation_record`): {"images_evaluated":
    images the last :func:`evaluate` of ``data`` scored, all ranks together}, and for an image folder
    "images_unreadable": its files left out (None for a folder not evaluated in this process)."""
    return data.evaluation_record()


@torch.no_grad()
def count_correct(model: DeployableModel, batches, keys: list[str], device) -> tuple[dict, int]:
    """({key: correct top-1 count}, images) over ``batches`` of (images, labels, ...); Z1 once per batch; IEEE
    fp32 (``runtime.strict_fp32``)."""
    was_training = model.training
    model.eval()
    correct = {k: 0 for k in keys}
    total = 0
    for images, labels, *_ in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with strict_fp32():
            if keys == ["plain"]:
                outputs = {"plain": model(images)}
            else:
                z1 = model.features(images)
                outputs = {k: model.logits_from_features(z1, int(k)) for k in keys}
        for k, logits in outputs.items():
            correct[k] += int((logits.argmax(1) == labels).sum())
        total += labels.numel()
    model.train(was_training)
    return correct, total
