"""Distillers, one per method, and METHODS: the one list of method names.

A method is one entry: ``METHODS[name] = Method(cls, needs_teacher, flow, theta)``. Config checks, the CLI, `fmkt-cli
info --models`, the benchmarks and fmkt.json read it, and tests/test_registries.py trains every entry (with every
metric loss), so registering a method is what gets it tested.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fmkt.distillers.base import Distiller
from fmkt.distillers.baselines import LogitKDDistiller, VanillaDistiller
from fmkt.distillers.flow import FMKTDistiller, OFMKTDistiller, ThetaDistiller, apply_dirac_ratio
from fmkt.errors import FmktError


@dataclass(frozen=True)
class Method:
    cls: type  # a Distiller: cls(student, teacher, cfg, input_shape=None, **options)
    needs_teacher: bool
    flow: bool  # builds a flow student (meta-encoder, K steps) and takes method.loss as its metric loss D
    theta: bool  # adds the FM-KT^Theta head (K = 0 at deployment)
    summary: str
    options: dict = field(default_factory=dict)
    features: bool = False  # also distills features (method.transfer=features)

    def capture_refusal(self, cfg) -> str | None:
        """Why this method's step under ``cfg`` (the MethodConfig) cannot be one CUDA graph (its distiller says)."""
        return self.cls.capture_refusal(cfg, **self.options)

    def steady_from(self, cfg) -> float:
        """The fractional epoch from which the step is the same computation every time (its distiller says)."""
        return self.cls.steady_from(cfg, **self.options)


METHODS = {
    "none": Method(VanillaDistiller, False, False, False, "the student alone, cross-entropy (how teachers train)"),
    "kd": Method(LogitKDDistiller, True, False, False, "Hinton KD on logits", {"loss_name": "kd"}),
    "dkd": Method(LogitKDDistiller, True, False, False, "decoupled KD (Zhao et al., 2022)", {"loss_name": "dkd"}),
    "dist": Method(LogitKDDistiller, True, False, False, "DIST relation matching (Huang et al., 2022)",
                   {"loss_name": "dist"}),
    "fmkt": Method(FMKTDistiller, True, True, False, "FM-KT: N Euler steps of a flow from student to teacher",
                   features=True),
    "theta": Method(ThetaDistiller, True, True, True, "FM-KT^Theta: FM-KT plus a zero-step head for deployment"),
    "ofmkt": Method(OFMKTDistiller, False, True, False, "OFM-KT: FM-KT without a teacher (the steps teach each other)"),
}


def check_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise FmktError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.") from None


def check_name(value, allowed, key: str) -> None:
    """``value`` must be a name of the registry ``allowed`` (the config key ``key`` says where it came from)."""
    if value not in allowed:
        raise FmktError(f"unknown {key.split('.')[-1]} {value!r} ({key}); choose one of {', '.join(allowed)}.")


def check_method_names(m) -> None:
    """The method section's names against their registries (``m``: the MethodConfig): the config check of
    fmkt.commands and the Python API (fmkt.api) both run it."""
    from fmkt.flow.encoders import ENCODERS
    from fmkt.flow.schedules import SCHEDULES
    from fmkt.losses import LOGIT_LOSSES, LOSSES, build_metric_loss
    from fmkt.student import TRANSFERS

    method = check_method(m.name)
    check_name(m.encoder, ENCODERS, "method.encoder")
    check_name(m.schedule, SCHEDULES, "method.schedule")
    check_name(m.loss, LOSSES, "method.loss")
    check_name(m.transfer, TRANSFERS, "method.transfer")
    if m.transfer == "features" and not method.features:
        allowed = ", ".join(n for n, x in METHODS.items() if x.features)
        raise FmktError(f"method.transfer=features works with method {allowed} only (method {m.name!r} distills "
                        "logits: theta's head and OFM-KT's ensemble target are logits); use method.transfer=logits "
                        "or --method fmkt.")
    loss = method.options.get("loss_name", m.loss if method.flow else None)  # the D the method builds, if any
    if m.logit_standardization and (m.transfer == "features" or (loss and loss not in LOGIT_LOSSES)):
        what = "method.transfer=features" if m.transfer == "features" else f"method.loss={loss}"
        raise FmktError(f"method.logit_standardization works with the softmax logit losses ({', '.join(LOGIT_LOSSES)}) "
                        f"only, not with {what}; turn it off or choose one of them (with method.transfer=logits).")
    if loss:  # the parameters of the D the method builds, up front (before any teacher is trained)
        if "standardize" in m.loss_params:
            raise FmktError("method.loss_params.standardize is not a loss parameter; logit standardization is "
                            "method.logit_standardization: true.")
        build_metric_loss(loss, standardize=m.logit_standardization, **m.loss_params)


def build_distiller(cfg, student, teacher, input_shape=None) -> Distiller:
    """cfg: the MethodConfig. The teacher is required exactly for the methods that use one."""
    method = check_method(cfg.name)
    if method.needs_teacher and teacher is None:
        raise FmktError(f"method {cfg.name!r} needs a teacher; pass --teacher PATH (or let distill train one).")
    return method.cls(student, teacher if method.needs_teacher else None, cfg, input_shape, **method.options)


__all__ = ["METHODS", "Method", "Distiller", "build_distiller", "check_method", "check_method_names", "check_name",
           "apply_dirac_ratio"]
