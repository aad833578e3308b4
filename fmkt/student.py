"""The one deployable module: normalisation, backbone, time embedding, meta-encoder, shape map S, theta head.

``forward(x, steps=K)`` takes raw images in [0, 1] (B, C, H, W) and returns logits (B, classes):
- plain model (no encoder; teachers and the baselines): the backbone's own head;
- K >= 1: the K-step FM-KT sampler; the prediction is the mean of the steps' logits S(estimate_i), S being the
  backbone's own head. Where S is global pooling + one Linear (the zoo; timm's ResNets and ViTs), that mean is S
  applied once to the mean of the pooled estimates (exact, and what runs); other heads (ConvNeXt's LayerNorm,
  MobileNetV3's conv_head) run on each step's estimate map (``pooled_head`` False);
- K = 0: the FM-KT^Theta head on Z1 (only when trained with ``theta``).
The engine trains it inside a distiller, the artifact stores it, export wraps it with K fixed, bench times it.

:class:`StudentSpec` describes one (fmkt.json's ``"model"``); :func:`build_student` is the one way the code makes a
DeployableModel (from a spec, for students, teachers, artifacts and the Python API alike) and :func:`spec_of` reads
the spec back, so what is saved is what is rebuilt.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fmkt.errors import FmktError
from fmkt.flow.encoders import TimeEmbedding, build_encoder
from fmkt.flow.sampler import SamplerOutput, apply_head, cast, run_sampler
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
        # S = pool + one Linear: the pooled shortcut is exact (zoo models and adapters always; timm: found on a dry run)
        self.pooled_head = bool(getattr(backbone, "linear_head", True))
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

    def map_head(self, feat: torch.Tensor) -> torch.Tensor:
        """S on a map (B, C, h, w): pooled + the Linear where that is S, else the backbone's own head."""
        if self.pooled_head:
            return self.head(feat.mean(dim=(2, 3)))
        return map_logits(self.backbone, feat)

    def step_logits(self, out: SamplerOutput) -> list:
        """Each step's logits S(estimate_i) (what training scores), from pooled estimates or estimate maps."""
        if self.pooled_head:
            return [self.head(p) for p in out.pooled_estimates]
        return [map_logits(self.backbone, e) for e in out.estimates]

    def sample(self, z1: torch.Tensor, steps: int, *, return_velocities: bool = False) -> SamplerOutput:
        return run_sampler(
            z1, self.encoder, self.time_embed, self.schedule.steps(steps),
            return_velocities=return_velocities, step_fn=self.step_fn, return_estimates=not self.pooled_head,
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
        if self.sampler_fn is not None and self.pooled_head and not torch.is_grad_enabled():
            pooled = self.sampler_fn(z1, self.encoder, self.time_embed, self.schedule.steps(steps), self.transfer)
            if pooled is not None:
                return self.head(pooled)
        return ensemble_logits(self, self.sample(z1, steps))

    def forward(self, x: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        if self.encoder is None:  # a plain model: the backbone's own forward (a user's teacher may give only logits)
            return self.backbone(self.normalize(x))
        return self.logits_from_features(self.features(x), steps)

    def available_steps(self, candidates) -> list[int]:
        """The subset of requested K values this model can run (plain models have exactly one output)."""
        if self.encoder is None:
            return [1]
        return [k for k in candidates if k >= 1 or (k == 0 and self.theta_head is not None)]


def map_logits(backbone: nn.Module, feat: torch.Tensor) -> torch.Tensor:
    """The backbone's own head on a map, fed in its classifier's dtype (the estimates are fp32)."""
    weight = getattr(backbone.get_classifier(), "weight", None)
    return backbone.forward_head(feat if weight is None else cast(feat, weight.dtype))


def ensemble_logits(model, out: SamplerOutput) -> torch.Tensor:
    """The prediction from a sampler run: feature transfer, S on the final state; logit transfer, the mean of the
    steps' logits (with a linear S: S once on the mean pooled estimate, the same numbers). ``model`` needs
    ``transfer``, ``pooled_head``, ``head``/``map_head`` and ``step_logits`` (a DeployableModel, export's graph)."""
    if model.transfer == "features":
        return model.map_head(out.final_state)
    if model.pooled_head:
        return model.head(out.mean_pooled())
    return torch.stack(model.step_logits(out), 0).mean(0)


class FixedStepsModel(nn.Module):
    """A DeployableModel with K fixed: forward(x) -> logits (what export and bench wrap)."""

    def __init__(self, model: DeployableModel, steps: int):
        super().__init__()
        self.model = model
        self.steps = steps

    def forward(self, x):
        return self.model(x, self.steps)


NORMALISATION_NOTE = "inside the model: pass raw images in [0, 1]"


@dataclass
class StudentSpec:
    """Everything that rebuilds a deployable model; ``to_json()`` is fmkt.json's ``"model"``.

    ``arch``: a zoo name or an import path ``pkg.module:factory`` (called with ``num_classes``/``in_channels`` when
    it takes them, plus ``arch_kwargs``); ``adapter``: where an import-path model's feature map and head were found
    (fmkt.models.adapter). ``encoder`` None = a plain model (teachers, baselines): no flow, its own head.
    """

    arch: str
    num_classes: int
    channels: int
    size: tuple
    mean: tuple
    std: tuple
    arch_kwargs: dict = field(default_factory=dict)
    adapter: dict | None = None
    encoder: str | None = None
    encoder_params: dict = field(default_factory=dict)
    schedule: str = "rectified"
    transfer: str = "logits"
    theta_head: bool = False
    default_steps: int = 1
    num_features: int | None = None  # recorded for readers of fmkt.json; derived from the backbone

    def to_json(self) -> dict:
        return {
            "arch": self.arch, "arch_kwargs": dict(self.arch_kwargs),
            **({"adapter": dict(self.adapter)} if self.adapter is not None else {}),
            "num_classes": self.num_classes, "num_features": self.num_features,
            "encoder": self.encoder, "encoder_params": dict(self.encoder_params), "schedule": self.schedule,
            "transfer": self.transfer, "theta_head": self.theta_head,
            "default_steps": self.default_steps,  # K when model(x) is called without steps
            "input": {"channels": self.channels, "size": list(self.size), "range": [0.0, 1.0],
                      "mean": list(self.mean), "std": list(self.std), "normalisation": NORMALISATION_NOTE},
        }

    @classmethod
    def for_method(cls, m, method, **facts) -> "StudentSpec":
        """The spec a method config means: the one writer of its method fields (the engine's student and the Python
        API's). ``m``: the config's MethodConfig; ``method``: its METHODS entry (``flow``: a meta-encoder, the
        schedule's sampler and the transfer; ``theta``: the K = 0 head); ``facts``: architecture, classes, input."""
        return cls(encoder=m.encoder if method.flow else None, encoder_params=m.encoder_params, schedule=m.schedule,
                   transfer=m.transfer if method.flow else "logits", theta_head=method.theta,
                   default_steps=m.train_step_choices()[-1], **facts)

    @classmethod
    def from_json(cls, d: dict, default_steps: int = 1) -> "StudentSpec":
        """``default_steps`` is used only when ``d`` predates its own key (older fmkt.json files)."""
        inp = d["input"]
        return cls(arch=d["arch"], num_classes=d["num_classes"], channels=inp["channels"], size=tuple(inp["size"]),
                   mean=tuple(inp["mean"]), std=tuple(inp["std"]), arch_kwargs=dict(d.get("arch_kwargs") or {}),
                   adapter=d.get("adapter"), encoder=d.get("encoder"),
                   encoder_params=dict(d.get("encoder_params") or {}), schedule=d.get("schedule", "rectified"),
                   transfer=d.get("transfer", "logits"), theta_head=bool(d.get("theta_head", False)),
                   default_steps=int(d.get("default_steps", default_steps)), num_features=d.get("num_features"))


def build_student(spec: StudentSpec, backbone: nn.Module | None = None) -> DeployableModel:
    """The DeployableModel ``spec`` describes. ``backbone``: an already built one (the Python API wraps the
    user's own module instance); else it is created from ``spec.arch`` (fmkt.models.adapter.create_backbone)."""
    if backbone is None:
        from fmkt.models.adapter import create_backbone

        backbone = create_backbone(spec.arch, num_classes=spec.num_classes, in_channels=spec.channels,
                                   input_size=spec.size, options=spec.adapter, check_head=spec.encoder is not None,
                                   **spec.arch_kwargs)
    model = DeployableModel(backbone, spec.mean, spec.std, encoder=spec.encoder, encoder_kwargs=spec.encoder_params,
                            schedule=spec.schedule, theta_head=spec.theta_head, transfer=spec.transfer,
                            default_steps=spec.default_steps)
    # pretrained=true fetched the starting weights once; a rebuild loads the saved ones, never the hub's
    kwargs = {k: v for k, v in spec.arch_kwargs.items() if k != "pretrained"}
    model.spec = dataclasses.replace(spec, num_features=model.num_features, arch_kwargs=kwargs)
    return model


def spec_of(model: DeployableModel) -> StudentSpec:
    """The spec that rebuilds ``model`` as it is now (its default_steps and the adapter's findings included)."""
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ValueError("this model was not made by build_student; build it from a StudentSpec with build_student")
    options = getattr(model.backbone, "options", None)  # a ModuleAdapter records where it found map and head
    return dataclasses.replace(spec, default_steps=model.default_steps, num_features=model.num_features,
                               adapter=options if options is not None else spec.adapter)
