"""The static graph: a DeployableModel with K fixed and the Python loop unrolled.

- K >= 1 (flow artifacts): the K time embeddings e(t_i) are computed once here and stored as a constant
  buffer (K, C); the loop of ``fmkt.flow.sampler.run_sampler`` (the one sampler) is unrolled by tracing,
  with (t, dt, p, q) of ``schedule.steps(K)`` baked in as Python floats; with a linear head S the ensemble mean
  is taken in pooled space (B, C) and the head runs once, else the model's own head runs on each step's estimate
  map and the logits are averaged (``fmkt.student.ensemble_logits``, the same code as eager). The graph grows
  linearly with K and has no Loop or If.
- K = 0 (flow artifacts with the FM-KT^Theta head): backbone + theta head, no encoder.
- Plain artifacts (methods none, kd, dkd, dist): the student backbone and its own head; only K = 0 is
  accepted (there are no flow steps to unroll).

Every graph takes raw images in [0, 1] (B, C, H, W): the dataset normalisation is folded in.
"""
from __future__ import annotations

import torch
from torch import nn

from fmkt.errors import FmktError
from fmkt.flow.sampler import apply_head, run_sampler
from fmkt.student import DeployableModel, FixedStepsModel, ensemble_logits


class ConstantTimeEmbedding(nn.Module):
    """Stands in for the time embedding: returns the precomputed table (K, C) whatever t it is given."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    @property
    def precomputed(self) -> torch.Tensor:
        return self.table

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.table


class UnrolledFlow(nn.Module):
    """Raw images (B, C_in, H, W) -> logits (B, classes) with K flow steps as one static graph."""

    def __init__(self, model: DeployableModel, steps: int):
        super().__init__()
        self.normalize = model.normalize
        self.backbone = model.backbone
        self.encoder = model.encoder
        self.transfer = model.transfer
        self.pooled_head = model.pooled_head
        self.constants = model.schedule.steps(steps)  # plain floats (t, dt, p, q) per step
        ref = model.normalize.mean
        with torch.no_grad():
            table = model.time_embed(torch.tensor([c.t for c in self.constants], device=ref.device))
        self.time_embed = ConstantTimeEmbedding(table.detach().clone())

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return apply_head(self.backbone.get_classifier(), pooled)

    map_head = DeployableModel.map_head
    step_logits = DeployableModel.step_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z1 = self.backbone.forward_features(self.normalize(x))
        out = run_sampler(z1, self.encoder, self.time_embed, self.constants, return_estimates=not self.pooled_head)
        return ensemble_logits(self, out)


class StudentAlone(nn.Module):
    """The student without FM-KT: raw images -> normalisation -> backbone -> its own head (no meta-encoder);
    what bench times as the baseline of every K."""

    def __init__(self, model: DeployableModel):
        super().__init__()
        self.normalize, self.backbone = model.normalize, model.backbone

    def forward(self, x):
        return self.backbone(self.normalize(x))


def check_steps(model: DeployableModel, steps: int, method: str | None = None) -> None:
    """One sentence when ``steps`` cannot be exported for this model."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise FmktError(f"--steps must be an integer >= 0, got {steps!r}.")
    if not model.is_flow:
        if steps != 0:
            raise FmktError(f"this artifact is a plain student (method {method or 'unknown'}) with no flow steps to "
                            f"unroll; export it with --steps 0.")
        return
    if steps == 0 and model.theta_head is None:
        raise FmktError("--steps 0 needs the FM-KT^Theta head, and this artifact was not trained with "
                        "--method theta; use --steps 1 or more.")


def static_module(model: DeployableModel, steps: int, method: str | None = None) -> nn.Module:
    """The exportable module for K = ``steps`` (eval mode, no gradients needed)."""
    check_steps(model, steps, method)
    model = model.eval()
    if model.is_flow and steps >= 1:
        return UnrolledFlow(model, steps).eval()
    return FixedStepsModel(model, steps if model.is_flow else None).eval()
