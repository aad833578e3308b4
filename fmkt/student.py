"""The one deployable module: normalisation, backbone, time embedding, meta-encoder, shape map S, theta head.

``forward(x, steps=K)`` takes raw images in [0, 1] (B, C, H, W) and returns logits (B, classes):
- plain model (no encoder; teachers and the baselines): the backbone's own head;
- K >= 1: the K-step FM-KT sampler; the prediction is S applied to the mean of the pooled step estimates
  (S = global pool + the backbone's classifier, which is linear, so one head call covers the whole ensemble);
- K = 0: the FM-KT^Theta head on Z1 (only when trained with ``theta``).
The engine trains it inside a distiller, the artifact stores it, export wraps it with K fixed, bench times it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmkt.errors import FmktError
from fmkt.flow.encoders import TimeEmbedding, build_encoder
from fmkt.flow.sampler import SamplerOutput, apply_head, run_sampler
from fmkt.flow.schedules import build_schedule

TRANSFERS = ("logits", "features")


class Normalize(nn.Module):
    """(x - mean) / std per channel, with the dataset's statistics as buffers (saved with the weights)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class DeployableModel(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        mean,
        std,
        *,
        encoder: nn.Module | str | None = None,
        schedule: str = "rectified",
        theta_head: bool = False,
        transfer: str = "logits",
        default_steps: int = 1,
        encoder_kwargs: dict | None = None,
    ):
        super().__init__()
        if transfer not in TRANSFERS:
            raise FmktError(f"unknown transfer {transfer!r}; choose one of {', '.join(TRANSFERS)}.")
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        channels = backbone.num_features
        if isinstance(encoder, str):
            encoder = build_encoder(encoder, channels, **(encoder_kwargs or {}))
        self.encoder = encoder
        self.time_embed = TimeEmbedding(channels) if encoder is not None else None
        self.theta_head = nn.Linear(channels, self.num_classes) if theta_head else None
        self.schedule_name = schedule
        self.schedule = build_schedule(schedule)
        self.transfer = transfer
        self.default_steps = default_steps
        self.step_fn = None  # None = the torch reference step; the kernels install a fused one
        # None = the torch loop; fmkt.kernels may install a whole-sampler inference path:
        # (z1, encoder, time_embed, steps, transfer) -> pooled (B, C), or None to fall back to the loop.
        self.sampler_fn = None

    @property
    def num_classes(self) -> int:
        n = getattr(self.backbone, "num_classes", None)  # a ModuleAdapter knows it from its dry run
        return n if n is not None else self.backbone.get_classifier().out_features

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    @property
    def is_flow(self) -> bool:
        return self.encoder is not None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw images (B, C_in, H, W) -> Z1, the backbone's last feature map (B, C, h, w)."""
        return self.backbone.forward_features(self.normalize(x))

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """The shape map S after pooling: (B, C) -> (B, classes)."""
        return apply_head(self.backbone.get_classifier(), pooled)

    def sample(self, z1: torch.Tensor, steps: int, *, return_velocities: bool = False) -> SamplerOutput:
        return run_sampler(
            z1, self.encoder, self.time_embed, self.schedule.steps(steps),
            return_velocities=return_velocities, step_fn=self.step_fn,
        )

    def logits_from_features(self, z1: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        steps = self.default_steps if steps is None else steps
        if self.encoder is None:
            return self.backbone.forward_head(z1)
        if steps == 0:
            if self.theta_head is None:
                raise FmktError("steps=0 needs the FM-KT^Theta head, and this model was not trained with "
                                "--method theta; use steps >= 1.")
            return self.theta_head(F.adaptive_avg_pool2d(z1, 1).flatten(1))
        if steps < 0:
            raise FmktError(f"steps must be >= 0, got {steps}.")
        if self.sampler_fn is not None and not torch.is_grad_enabled():
            pooled = self.sampler_fn(z1, self.encoder, self.time_embed, self.schedule.steps(steps), self.transfer)
            if pooled is not None:
                return self.head(pooled)
        out = self.sample(z1, steps)
        if self.transfer == "features":
            return self.head(out.final_state.mean(dim=(2, 3)))
        return self.head(out.mean_pooled())

    def forward(self, x: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        if self.encoder is None:  # a plain model: the backbone's own forward (a user's teacher may give only logits)
            return self.backbone(self.normalize(x))
        return self.logits_from_features(self.features(x), steps)

    def available_steps(self, candidates) -> list[int]:
        """The subset of requested K values this model can run (plain models have exactly one output)."""
        if self.encoder is None:
            return [1]
        return [k for k in candidates if k >= 1 or (k == 0 and self.theta_head is not None)]


class FixedStepsModel(nn.Module):
    """A DeployableModel with K fixed: forward(x) -> logits (what export and bench wrap)."""

    def __init__(self, model: DeployableModel, steps: int):
        super().__init__()
        self.model = model
        self.steps = steps

    def forward(self, x):
        return self.model(x, self.steps)
