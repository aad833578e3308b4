"""Any timm model as an fmkt backbone: ``timm:NAME`` wherever a zoo name goes.

The model is timm's own (``timm.create_model(NAME, num_classes=, in_chans=, **kwargs)``), kept under ``module.`` so
a weights file with timm's key names loads strictly into it. What FM-KT needs from it:

- Z1, the feature map (B, C, h, w): ``forward_features(x)`` for CNNs (an NHWC map, as Swin gives, is permuted).
  Vision Transformers give tokens (B, T, C); Z1 is then chosen by the option ``z1``:
  ``cls`` (default, as the paper's official DeiT code): the class token expanded to a ``cls_size`` x ``cls_size``
  map (7 x 7); ``patches``: the patch tokens as their (h, w) grid.
- The shape map S is the model's own head (``forward_head``): ConvNeXt's pool -> LayerNorm -> fc, MobileNetV3's
  pool -> conv_head -> act -> fc, a ViT's fc_norm -> head on the pooled token (for ``patches``: on the mean patch
  token, as a global-average-pooled ViT does). :attr:`linear_head` says whether S is global pooling + one Linear
  (found on a dry run); then the pooled-space shortcut of :mod:`fmkt.flow.sampler` is exact and used.

Refused in one sentence: distilled DeiT as a student (a distillation token and a second head: fmkt distils into
the class token), a ViT with attention pooling, token outputs of other models.
"""
from __future__ import annotations

import torch
from torch import nn

from fmkt.errors import FmktError, first_line
from fmkt.models.adapter import _close, in_eval_mode

PREFIX = "timm:"
TIMM_OPTIONS = ("z1", "cls_size")
Z1_MODES = ("cls", "patches")


def is_timm(arch: str) -> bool:
    return isinstance(arch, str) and arch.startswith(PREFIX)


def timm_name(arch: str) -> str:
    return arch[len(PREFIX):]


def _timm():
    try:
        import timm
    except ImportError:
        raise FmktError("timm:NAME models need timm: pip install timm (the README's install includes it).") from None
    return timm


def count_timm_models() -> int | None:
    """How many architectures timm offers here (None without timm)."""
    try:
        import timm
    except ImportError:
        return None
    return len(timm.list_models())


def timm_models_line() -> str:
    """What ``fmkt-cli info --models`` says about timm."""
    n = count_timm_models()
    return f"{n} (as --student/--teacher-arch timm:NAME)" if n is not None else "timm is not installed (pip install timm)"


def check_timm_name(arch: str, key: str = "student") -> None:
    """One sentence when ``timm:NAME`` is not a timm architecture (a close match named when there is one)."""
    timm = _timm()
    name = timm_name(arch)
    if name in timm.list_models() or name.split(".")[0] in timm.list_models():
        return
    import difflib

    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else "; `timm.list_models()` lists them."
    raise FmktError(f"unknown timm model {name!r} ({key}){hint}")


def create_timm(arch: str, *, num_classes: int, in_channels: int, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's model ``arch`` (``timm:NAME``); ``pretrained`` needs the Hugging Face hub (one sentence without)."""
    timm = _timm()
    check_timm_name(arch)
    try:
        return timm.create_model(timm_name(arch), pretrained=pretrained, num_classes=num_classes,
                                 in_chans=in_channels, **kwargs)
    except TypeError as exc:
        raise FmktError(f"timm model {timm_name(arch)!r} does not take these keyword arguments "
                        f"({first_line(exc)}); check student_kwargs / teacher.kwargs.") from None
    except Exception as exc:
        if pretrained:
            raise FmktError(f"cannot fetch the pretrained weights of {timm_name(arch)!r} ("
                            f"{first_line(exc)}); pretrained=true needs the Hugging Face hub (network or "
                            "HF_HUB_OFFLINE with a filled cache), else pass the weights with --teacher FILE.") from None
        raise


class TimmBackbone(nn.Module):
    """A timm model with the interface fmkt's backbones share (``forward_features`` -> (B, C, h, w),
    ``forward_head``, ``num_features``, ``num_classes``, ``linear_head``, ``options``)."""

    def __init__(self, module: nn.Module, example: torch.Tensor, *, z1: str | None = None, cls_size: int = 7,
                 check_head: bool = True):
        super().__init__()
        self.module = module
        self.tokens = hasattr(module, "num_prefix_tokens") and hasattr(module, "fc_norm")
        if z1 is not None and not self.tokens:
            raise FmktError("the option z1 chooses a Vision Transformer's feature map; this model gives a map itself.")
        if z1 is not None and z1 not in Z1_MODES:
            raise FmktError(f"unknown z1 {z1!r}; choose one of {', '.join(Z1_MODES)}.")
        self.z1, self.cls_size = z1 or "cls", int(cls_size)
        self.nhwc = False
        in_eval_mode(module, lambda: self._dry_run(example, check_head))

    # -- the dry run ---------------------------------------------------------------------------------------
    def _dry_run(self, x: torch.Tensor, check_head: bool) -> None:
        logits = self.module(x)
        self.num_classes = int(logits.shape[1])
        self.num_features, self.linear_head = None, False
        if not check_head:
            return
        self._refuse_unsupported()
        feat = self.module.forward_features(x)
        if feat.dim() == 4 and feat.shape[1] != self.module.num_features and feat.shape[-1] == self.module.num_features:
            self.nhwc = True
        z1 = self.forward_features(x)
        self.num_features = int(z1.shape[1])
        if self._own_pooling() and not _close(self.forward_head(z1), logits):  # S must be the model's own head
            raise FmktError("the head applied to the feature map does not give the model's own logits; this "
                            "timm architecture is not supported as a flow student.")
        self.linear_head = self._is_linear(z1)

    def _own_pooling(self) -> bool:
        """Whether Z1 is what the model's own head pools (a CNN's map; a ViT's class token with global_pool
        'token', its patch grid with 'avg'); other choices are options to compare, S is then fc_norm -> head."""
        if not self.tokens:
            return True
        pool = getattr(self.module, "global_pool", "token")
        return (self.z1, pool) in {("cls", "token"), ("patches", "avg")}

    def _refuse_unsupported(self) -> None:
        m = self.module
        if hasattr(m, "head_dist") or getattr(m, "dist_token", None) is not None:
            raise FmktError("distilled DeiT (a distillation token and a second head) cannot be a flow student: fmkt "
                            "distils into the class token; use the plain model (e.g. timm:deit_tiny_patch16_224).")
        if self.tokens and getattr(m, "attn_pool", None) is not None:
            raise FmktError("a ViT with attention pooling (global_pool='map') has no token to expand into Z1; "
                            "build it with student_kwargs.global_pool=token.")
        if not self.tokens and not hasattr(m, "forward_head"):
            raise FmktError("this timm model has no forward_head, which fmkt uses as the shape map S.")

    def _is_linear(self, z1: torch.Tensor) -> bool:
        """Whether S(map) == Linear(mean over h, w of map) on random maps (then the pooled shortcut is exact)."""
        head = self.get_classifier()
        if not isinstance(head, nn.Linear) or head.in_features != z1.shape[1]:
            return False
        g = torch.Generator().manual_seed(0)
        maps = [torch.randn(z1.shape, generator=g) * s + s for s in (1.0, 3.0)]
        return all(_close(self.forward_head(m), head(m.mean(dim=(2, 3)))) for m in maps)

    # -- the interface -------------------------------------------------------------------------------------
    @property
    def options(self) -> dict:
        """What fmkt.json records so that the same backbone is rebuilt on load."""
        return {"z1": self.z1, "cls_size": self.cls_size} if self.tokens else {}

    def get_classifier(self) -> nn.Module:
        return self.module.get_classifier()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.module.forward_features(x)
        if not self.tokens:
            if feat.dim() != 4:
                raise FmktError(f"this timm model's forward_features gives {tuple(feat.shape)}, not a (B, C, h, w) "
                                "map; it cannot be a flow student.")
            return feat.permute(0, 3, 1, 2) if self.nhwc else feat
        if self.z1 == "cls":
            return feat[:, 0, :, None, None].expand(-1, -1, self.cls_size, self.cls_size)
        patches = feat[:, self.module.num_prefix_tokens:]
        h, w = self.module.patch_embed.dynamic_feat_size(x.shape[-2:]) if self.module.dynamic_img_size \
            else self.module.patch_embed.grid_size
        return patches.transpose(1, 2).reshape(feat.shape[0], feat.shape[2], h, w)

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        """S: the model's own head on a (B, C, h, w) map."""
        m = self.module
        if self.tokens:
            return m.head(m.head_drop(m.fc_norm(feat.mean(dim=(2, 3)))))
        return m.forward_head(feat.permute(0, 2, 3, 1) if self.nhwc else feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def create_timm_backbone(arch: str, *, num_classes: int, in_channels: int, input_size, options: dict | None = None,
                         check_head: bool = True, **kwargs) -> TimmBackbone:
    """``timm:NAME`` as a TimmBackbone, dry-run on a random (2, in_channels, *input_size) batch."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(TIMM_OPTIONS))
    if unknown:
        raise FmktError(f"unknown option {unknown[0]!r} for a timm model; valid: {', '.join(TIMM_OPTIONS)}.")
    module = create_timm(arch, num_classes=num_classes, in_channels=in_channels, **kwargs)
    example = torch.rand(2, in_channels, *input_size, generator=torch.Generator().manual_seed(0))
    try:
        backbone = TimmBackbone(module, example, check_head=check_head, **options)
        # what rebuilds it (the Python API records these; pretrained weights are saved, never fetched again)
        backbone.arch, backbone.arch_kwargs = arch, {k: v for k, v in kwargs.items() if k != "pretrained"}
        return backbone
    except FmktError as exc:
        raise FmktError(f"model {arch!r}: {exc}") from None
    except Exception as exc:
        raise FmktError(f"model {arch!r} failed on a ({in_channels}, {', '.join(map(str, input_size))}) dry-run "
                        f"batch ({first_line(exc)}){VIT_HINT if _is_vit(arch) else ''}.") from None


VIT_HINT = "; a ViT needs student_kwargs.img_size (and patch_size) to fit the data's image size"


def _is_vit(arch: str) -> bool:
    return any(k in timm_name(arch) for k in ("vit", "deit", "eva", "beit"))

