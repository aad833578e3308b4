"""Distillation losses as pure functions (mdistiller-style math).

Shapes: ``B`` batch, ``K`` classes, ``C`` channels. Logit losses take (B, K) tensors; feature
losses take (B, C) or (B, C, H, W) tensors of equal shape. Every loss returns a 0-dim tensor.

:func:`build_metric_loss` turns a name from :data:`LOSSES` plus parameters into a callable
``fn(student, teacher, target=None, warmup_factor=1.0)`` so the engine can treat them alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fmkt.errors import FmktError

__all__ = [
    "ce_loss",
    "hard_target",
    "kd_loss",
    "dkd_loss",
    "dist_loss",
    "pkd_loss",
    "mse_loss",
    "standardize_logits",
    "LOSSES",
    "LossEntry",
    "METRIC_LOSSES",
    "LOGIT_LOSSES",
    "DEFAULT_LOSS_PARAMS",
    "MetricLoss",
    "build_metric_loss",
]


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024): each row's z-score ``(z - mean) / (eps + std)``.

    logits (B, K); mean and std over the classes of each sample, std unbiased (torch's default, as the authors'
    ``normalize``), eps = 1e-7 added to the std. Applied to student and teacher alike before the temperature.
    Computed in fp32 at least (bf16 logits under autocast are promoted first; fp64 stays fp64).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (eps + std)


def _same_shape(a: torch.Tensor, b: torch.Tensor, what: str, ndims: tuple[int, ...]) -> None:
    if a.shape != b.shape or a.dim() not in ndims:
        dims = " or ".join({2: "(B, K)", 4: "(B, C, H, W)"}.get(d, f"{d}-D") for d in ndims)
        raise FmktError(
            f"{what}: student shape {tuple(a.shape)} and teacher shape {tuple(b.shape)} must be "
            f"equal and {dims}; check that student and teacher are built for the same dataset."
        )


def ce_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy, mean over the batch.

    logits (B, K) float; target (B,) int64 class indices, or (B, K) float class probabilities (a soft target:
    Mixup/CutMix's, fmkt.mixing). With ``label_smoothing`` = e the target distribution is ``(1 - e) * onehot + e / K``
    (``(1 - e) * target + e / K`` for a soft one, torch's rule: mixing smoothed one-hots gives the same); a one-hot
    soft target gives the hard label's loss (within float rounding, ~1e-7).
    """
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes, mean over batch.

    logits_s, logits_t: (B, K).
    """
    _same_shape(logits_s, logits_t, "kd_loss", (2,))
    log_ps = F.log_softmax(logits_s / temperature, dim=1)
    log_pt = F.log_softmax(logits_t / temperature, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * temperature**2


def _gt_mask(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, target.reshape(-1, 1), True)


def hard_target(target: torch.Tensor) -> torch.Tensor:
    """The class index per sample: ``target`` itself (B,), or a soft target's (B, K) argmax: the class with the
    larger Mixup/CutMix weight (the batch image's own class when lam > 0.5; the lower index on a tie)."""
    return target.argmax(dim=1) if target.dim() == 2 and target.is_floating_point() else target


def dkd_loss(
    logits_s: torch.Tensor,
    logits_t: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 2.0,
    temperature: float = 4.0,
    warmup_factor: float = 1.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022), the math of mdistiller's ``DKD.py``, times warmup.

    logits_s, logits_t: (B, K); target: (B,) int64, or a (B, K) soft target (Mixup/CutMix), whose argmax is the
    ground-truth class here (:func:`hard_target`; the authors' DKD takes an index only, mdistiller's and the mmcls
    distillers' alike, and fails on mixed labels).
    TCKD: KL between the binary (target, non-target) distributions; NCKD: KL between the
    distributions over the non-target classes (target logit pushed down by 1000 as mdistiller
    does). Both are summed, times T^2, divided by B:
    ``warmup_factor * (alpha * TCKD + beta * NCKD)``; the distillers pass mdistiller's
    ``warmup_factor = min(epoch / warmup_epochs, 1)``, epochs counted from 1 (distillers/base.py).
    """
    _same_shape(logits_s, logits_t, "dkd_loss", (2,))
    if target.shape == logits_s.shape:
        target = hard_target(target)
    if target.shape != logits_s.shape[:1]:
        raise FmktError(
            f"dkd_loss: target shape {tuple(target.shape)} must be ({logits_s.shape[0]},), "
            "one class index per sample (or a soft target of the logits' shape)."
        )
    gt = _gt_mask(logits_s, target)
    other = ~gt
    t = temperature
    p_s = F.softmax(logits_s / t, dim=1)
    p_t = F.softmax(logits_t / t, dim=1)
    b_s = torch.cat([(p_s * gt).sum(1, keepdim=True), (p_s * other).sum(1, keepdim=True)], dim=1)
    b_t = torch.cat([(p_t * gt).sum(1, keepdim=True), (p_t * other).sum(1, keepdim=True)], dim=1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * t**2 / target.shape[0]
    p_t2 = F.softmax(logits_t / t - 1000.0 * gt, dim=1)
    log_p_s2 = F.log_softmax(logits_s / t - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * t**2 / target.shape[0]
    return warmup_factor * (alpha * tckd + beta * nckd)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    logits_s: torch.Tensor,
    logits_t: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 2.0,
    tau: float = 1.0,
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): relation matching by Pearson correlation.

    logits_s, logits_t: (B, K); ``y = softmax(logits / tau)``.
    inter = 1 - mean over samples of Pearson(y_s[i, :], y_t[i, :]);
    intra = 1 - mean over classes of Pearson(y_s[:, k], y_t[:, k]);
    loss = tau^2 * (beta * inter + gamma * intra). The intra term needs B >= 2 (with B = 1 it is
    a constant 1 with zero gradient). Pearson uses eps = 1e-8 in the denominator, as the authors.
    """
    _same_shape(logits_s, logits_t, "dist_loss", (2,))
    y_s = F.softmax(logits_s / tau, dim=1)
    y_t = F.softmax(logits_t / tau, dim=1)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return tau**2 * (beta * inter + gamma * intra)


def _channel_standardize(feat: torch.Tensor) -> torch.Tensor:
    # (B, C, ...) -> (C, B * ...) standardised per channel (unbiased std + 1e-6, as mmrazor's PKD).
    c = feat.shape[1]
    flat = feat.transpose(0, 1).reshape(c, -1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True)
    return (flat - mean) / (std + 1e-6)


def pkd_loss(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """PKD (Cao et al., 2022; mmrazor ``PKDLoss``): MSE of channel-standardised features / 2.

    feat_s, feat_t: (B, C, H, W) (statistics over B, H, W per channel) or (B, C) (statistics over
    B per channel). Equals (1 - Pearson correlation) per channel up to the unbiased-std factor.
    Needs more than one element per channel.
    """
    _same_shape(feat_s, feat_t, "pkd_loss", (2, 4))
    return F.mse_loss(_channel_standardize(feat_s), _channel_standardize(feat_t)) / 2


def mse_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements; s and t of equal shape (any)."""
    if s.shape != t.shape:
        raise FmktError(
            f"mse_loss: student shape {tuple(s.shape)} and teacher shape {tuple(t.shape)} must "
            "be equal; check that student and teacher are built for the same dataset."
        )
    return F.mse_loss(s, t)


@dataclass(frozen=True)
class LossEntry:
    """A registered metric loss: ``fn(s, t, **params)`` (or ``fn(s, t, target, warmup_factor=, **params)`` when
    ``uses_target``) and its default parameters, which are also the only parameters it accepts."""

    fn: Callable[..., torch.Tensor]
    defaults: dict
    uses_target: bool = False  # needs the labels and DKD's warm-up factor
    logits: bool = False  # compares (B, K) logits, so logit standardization applies


#: The one list of metric losses D (FM-KT's and the baselines'); every entry is trained by
#: tests/test_registries.py under every method.
LOSSES: dict[str, LossEntry] = {
    "kd": LossEntry(kd_loss, {"temperature": 4.0}, logits=True),
    "dkd": LossEntry(dkd_loss, {"alpha": 1.0, "beta": 2.0, "temperature": 4.0}, uses_target=True, logits=True),
    "dist": LossEntry(dist_loss, {"beta": 2.0, "gamma": 2.0, "tau": 1.0}, logits=True),
    "pkd": LossEntry(pkd_loss, {}),
    "mse": LossEntry(mse_loss, {}),
}
METRIC_LOSSES: tuple[str, ...] = tuple(LOSSES)  # views of LOSSES, for readers that want only the names ...
DEFAULT_LOSS_PARAMS: dict[str, dict[str, float]] = {k: dict(v.defaults) for k, v in LOSSES.items()}  # ... or defaults
LOGIT_LOSSES: tuple[str, ...] = tuple(k for k, v in LOSSES.items() if v.logits)  # ... or those LS applies to

_POSITIVE = ("temperature", "tau")


@dataclass(frozen=True)
class MetricLoss:
    """A configured metric loss: ``fn(s, t, target=None, warmup_factor=1.0) -> Tensor``.

    Only ``dkd`` uses ``target`` (required) and ``warmup_factor``; the others ignore them. With ``standardize``
    (a logit loss only) student and teacher logits are both z-scored by :func:`standardize_logits` first: the
    one place logit standardization happens, for every logit loss and every method.
    Picklable (unlike a closure), so it survives DDP spawn and checkpoints.
    """

    name: str
    params: dict[str, float] = field(default_factory=dict)
    standardize: bool = False

    def __call__(
        self,
        s: torch.Tensor,
        t: torch.Tensor,
        target: torch.Tensor | None = None,
        warmup_factor: float = 1.0,
    ) -> torch.Tensor:
        entry = LOSSES[self.name]
        if self.standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        if not entry.uses_target:
            return entry.fn(s, t, **self.params)
        if target is None:
            raise FmktError(f"The {self.name} loss needs the target labels: pass target=labels.")
        return entry.fn(s, t, target, warmup_factor=warmup_factor, **self.params)


def build_metric_loss(name: str, standardize: bool = False, **params: Any) -> Callable[..., torch.Tensor]:
    """A :class:`MetricLoss` for ``name`` with its :data:`LOSSES` defaults overridden by ``params``;
    ``standardize`` turns on logit standardization (logit losses only).

    Raises :class:`FmktError` for an unknown name, an unknown parameter, a non-numeric value, a
    non-positive temperature/tau, or ``standardize`` on a loss that does not compare logits.
    """
    key = str(name).strip().lower()
    if key not in LOSSES:
        raise FmktError(f"Unknown metric loss {name!r}: expected one of {', '.join(LOSSES)}.")
    if standardize and not LOSSES[key].logits:
        raise FmktError(f"Logit standardization applies to the softmax logit losses ({', '.join(LOGIT_LOSSES)}) "
                        f"only, not to {key!r}.")
    defaults = LOSSES[key].defaults
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) if defaults else "none"
        raise FmktError(
            f"Unknown parameter(s) {', '.join(unknown)} for metric loss {key!r}: "
            f"valid ones are {valid}."
        )
    merged: dict[str, float] = dict(defaults)
    for k, v in params.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise FmktError(f"Parameter {k} of metric loss {key!r} is {v!r}: expected a number.")
        if k in _POSITIVE and v <= 0:
            raise FmktError(f"Parameter {k} of metric loss {key!r} is {v}: expected a positive number.")
        merged[k] = float(v)
    return MetricLoss(key, merged, bool(standardize))
