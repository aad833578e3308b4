"""Distillers: one per method, registered in one place (METHODS)."""
from __future__ import annotations

from fmkt.distillers.base import Distiller
from fmkt.distillers.baselines import LogitKDDistiller, VanillaDistiller
from fmkt.distillers.fmkt import FMKTDistiller, OFMKTDistiller, ThetaDistiller, apply_dirac_ratio
from fmkt.errors import FmktError

# method -> (needs a teacher, builds a flow student, has a theta head)
METHODS = {
    "none": (False, False, False),
    "kd": (True, False, False),
    "dkd": (True, False, False),
    "dist": (True, False, False),
    "fmkt": (True, True, False),
    "theta": (True, True, True),
    "ofmkt": (False, True, False),
}


def check_method(name: str) -> tuple[bool, bool, bool]:
    try:
        return METHODS[name]
    except KeyError:
        raise FmktError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.") from None


def build_distiller(cfg, student, teacher, input_shape=None) -> Distiller:
    """cfg: the MethodConfig. The teacher is required exactly for the methods that use one."""
    needs_teacher, _, _ = check_method(cfg.name)
    if needs_teacher and teacher is None:
        raise FmktError(f"method {cfg.name!r} needs a teacher; pass --teacher PATH (or let distill train one).")
    if cfg.name == "none":
        return VanillaDistiller(student, None, cfg)
    if cfg.name in ("kd", "dkd", "dist"):
        return LogitKDDistiller(student, teacher, cfg, loss_name=cfg.name)
    if cfg.name == "fmkt":
        return FMKTDistiller(student, teacher, cfg, input_shape)
    if cfg.name == "theta":
        return ThetaDistiller(student, teacher, cfg, input_shape)
    return OFMKTDistiller(student, None, cfg, input_shape)


__all__ = ["METHODS", "Distiller", "build_distiller", "check_method", "apply_dirac_ratio"]
