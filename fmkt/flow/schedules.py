"""Interpolation schedules Z_t = a(t) * Z1 + s(t) * Z0 between the student (t = 1) and the teacher (t = 0).

Each schedule gives a(t), s(t) and their time derivatives. From a velocity v = dZ/dt = a'(t) Z1 + s'(t) Z0
the teacher estimate is Z0_hat = (a'(t) Z1 - v) / (-s'(t)) = p(t) * Z1 + q(t) * v, with
p = -a'/s' and q = 1/s'. The sampler only ever sees the plain floats (t, dt, p, q) of each step, which is
what lets export bake them in as constants and lets a kernel take them as scalars.

- ``rectified`` (the authors' default): a = t, s = 1 - t, so p = 1, q = -1 and Z0_hat = Z1 - v.
- ``vp``: the score-SDE VP path (beta_min 0.1, beta_max 20): a(t) = exp(-19.9/4 (1-t)^2 - 0.1/2 (1-t)),
  s = sqrt(1 - a^2). s'(1) is infinite, so the coefficients are evaluated at min(t, 1 - 1e-3) (ours).
- ``ve``: a geometric noise level sigma(t) = 0.02 * (100/0.02)^t on a constant teacher term (Z0 + sigma Z1)
  has s' = 0, so no estimate can come from a velocity. We use the same path rescaled by 1/sqrt(1 + sigma^2),
  the standard VE-to-bounded rescaling: a = sigma / sqrt(1 + sigma^2), s = 1 / sqrt(1 + sigma^2), so
  a(1) ~ 1, s(1) ~ 0.01, a(0) ~ 0.02, s(0) ~ 1 (ours: the paper names VE but its formulas are not public).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fmkt.errors import FmktError


def fp32(t):
    """A tensor in at least float32 (16-bit floats widened; float32/float64 as they are)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclass(frozen=True)
class StepConstants:
    """Constants of one Euler step from time t to t - dt; estimate = p * Z1 + q * v."""

    t: float
    dt: float
    p: float
    q: float


class Schedule:
    name = "base"

    def a(self, t: float) -> float:
        raise NotImplementedError

    def s(self, t: float) -> float:
        raise NotImplementedError

    def da(self, t: float) -> float:
        raise NotImplementedError

    def ds(self, t: float) -> float:
        raise NotImplementedError

    def coefficient_time(self, t: float) -> float:
        """The time at which the estimate coefficients are evaluated (schedules with s'(t) = inf clamp it)."""
        return t

    def velocity_coefficients(self, t: float) -> tuple[float, float]:
        """(a'(t), s'(t)) at the clamped time: the target velocity is a' Z1 + s' Z0 (finite for every t in (0, 1])."""
        tc = self.coefficient_time(t)
        return self.da(tc), self.ds(tc)

    def estimate_coefficients(self, t: float) -> tuple[float, float]:
        """(p, q) with Z0_hat = p * Z1 + q * v at time t."""
        da, ds = self.velocity_coefficients(t)
        return -da / ds, 1.0 / ds

    def teacher_estimate(self, z1, v, t: float):
        """Z0_hat from the student representation Z1 and a velocity v at time t (any shape, broadcast), in at least
        fp32: |p|, |q| reach the hundreds for VP/VE, so 16-bit operands would drown the estimate in rounding."""
        p, q = self.estimate_coefficients(t)
        return p * fp32(z1) + q * fp32(v)

    def target_velocity(self, z1, z0, t: float):
        """a'(t) Z1 + s'(t) Z0 in (at least) fp32 (feature transfer regresses the encoder's velocity onto it)."""
        da, ds = self.velocity_coefficients(t)
        return da * fp32(z1) + ds * fp32(z0)

    def steps(self, num_steps: int) -> list[StepConstants]:
        """Per-step constants of the N-step Euler sampler, t = N/N, (N-1)/N, ..., 1/N."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise FmktError(f"the number of flow steps must be an integer >= 1, got {num_steps!r}.")
        dt = 1.0 / num_steps
        out = []
        for i in range(num_steps, 0, -1):
            t = i / num_steps
            p, q = self.estimate_coefficients(t)
            out.append(StepConstants(t=t, dt=dt, p=p, q=q))
        return out


class RectifiedFlow(Schedule):
    name = "rectified"

    def a(self, t):
        return t

    def s(self, t):
        return 1.0 - t

    def da(self, t):
        return 1.0

    def ds(self, t):
        return -1.0


class VPODE(Schedule):
    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_max: float = 1.0 - 1e-3):
        self.beta_min, self.beta_max, self.t_max = beta_min, beta_max, t_max

    def _log_a(self, t):
        u = 1.0 - t
        return -0.25 * (self.beta_max - self.beta_min) * u * u - 0.5 * self.beta_min * u

    def a(self, t):
        return math.exp(self._log_a(t))

    def s(self, t):
        return math.sqrt(max(0.0, 1.0 - self.a(t) ** 2))

    def da(self, t):
        u = 1.0 - t
        return self.a(t) * (0.5 * (self.beta_max - self.beta_min) * u + 0.5 * self.beta_min)

    def ds(self, t):
        s = self.s(t)
        if s == 0.0:
            return -math.inf
        return -self.a(t) * self.da(t) / s

    def coefficient_time(self, t):
        return min(t, self.t_max)


class VEODE(Schedule):
    name = "ve"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self._log_ratio = math.log(sigma_max / sigma_min)

    def sigma(self, t):
        return self.sigma_min * math.exp(self._log_ratio * t)

    def a(self, t):
        sg = self.sigma(t)
        return sg / math.sqrt(1.0 + sg * sg)

    def s(self, t):
        sg = self.sigma(t)
        return 1.0 / math.sqrt(1.0 + sg * sg)

    def da(self, t):
        sg = self.sigma(t)
        return self._log_ratio * sg * (1.0 + sg * sg) ** -1.5

    def ds(self, t):
        sg = self.sigma(t)
        return -self._log_ratio * sg * sg * (1.0 + sg * sg) ** -1.5


SCHEDULES = {"rectified": RectifiedFlow, "vp": VPODE, "ve": VEODE}


def build_schedule(name: str) -> Schedule:
    try:
        return SCHEDULES[name]()
    except KeyError:
        raise FmktError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}.") from None
