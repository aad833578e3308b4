"""Your own ``nn.Module`` as an fmkt backbone: the zoo's interface (``forward_features``, ``get_classifier``,
``forward_head``, ``num_features``) around any model, found on one dry-run batch.

- The feature map Z1 (B, C, h, w): the model's ``forward_features(x)`` when it has one, else the output of the
  submodule named ``feature_layer`` (captured by a forward hook while the model runs), else, found on the dry
  run, the last submodule whose output is a (B, C, h, w) map with C = the head's inputs. A (B, C) output is
  taken as a 1x1 map.
- The head: the ``nn.Linear`` named ``classifier``, else the model's last ``nn.Linear``.
- FM-KT's shape map S is global average pooling + that head, so the dry run checks that
  ``head(pool(Z1))`` gives the model's own logits; a model with anything else between them is refused in one
  sentence (a teacher only needs to give logits, so it is checked only when its features are asked for).
- Channels and classes come from the dry run, never from the user.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmkt.errors import FmktError, first_line
from fmkt.import_paths import call_factory, is_import_path

ADAPTER_OPTIONS = ("feature_layer", "classifier")


def _logits(out) -> torch.Tensor:
    """A model's output as logits: the tensor itself, or the first element of a tuple/list (logits, feats)."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FmktError(f"the model returned {shape}; it must return logits of shape (batch, classes).")
    return out


def _as_map(feat, where: str) -> torch.Tensor:
    if isinstance(feat, torch.Tensor) and feat.dim() == 2:
        return feat[:, :, None, None]
    if not isinstance(feat, torch.Tensor) or feat.dim() != 4:
        shape = tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat).__name__
        raise FmktError(f"{where} gives {shape}; the feature map must be (batch, channels, height, width).")
    return feat


class ModuleAdapter(nn.Module):
    """``model`` with the zoo interface; its weights stay under ``module.`` (the user's own key names)."""

    def __init__(self, module: nn.Module, example: torch.Tensor, *, feature_layer: str | None = None,
                 classifier: str | None = None, check_head: bool = True):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise FmktError(f"expected a torch nn.Module, got {type(module).__name__}.")
        self.module = module
        self.feature_layer = feature_layer
        self.classifier_name = classifier
        in_eval_mode(module, lambda: self._dry_run(example, check_head))

    # -- the dry run ---------------------------------------------------------------------------------------
    def _dry_run(self, x: torch.Tensor, check_head: bool) -> None:
        logits = _logits(self.module(x))
        self.num_classes = int(logits.shape[1])
        if self.classifier_name is None:
            self.classifier_name = self._find_classifier(x, logits)
        head = self._head_or_none()
        if head is not None and head.out_features != self.num_classes:
            raise FmktError(f"classifier {self.classifier_name!r} has {head.out_features} outputs but the model "
                            f"returns {self.num_classes} logits; pass classifier= naming the final nn.Linear.")
        if self.feature_layer is None and not hasattr(self.module, "forward_features") and head is not None:
            self.feature_layer = self._find_feature_layer(x, head.in_features, logits, head)
        self.num_features = None
        if not check_head:
            return
        if head is None:
            raise FmktError("the model has no nn.Linear classifier; FM-KT's shape map is global average pooling "
                            "followed by a linear head, so the model must end that way (pass classifier=NAME).")
        feat = self.forward_features(x)
        self.num_features = int(feat.shape[1])
        self.check_head(x, logits, feat)

    def _outputs(self, x, kind=nn.Module) -> list:
        """[(name, output)] of the submodules of type ``kind``, in the order they ran on ``x``."""
        outputs: list = []
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.append((n, o)))
                 for n, m in self.module.named_modules() if n and isinstance(m, kind)]
        try:
            self.module(x)
        finally:
            for h in hooks:
                h.remove()
        return outputs

    def _find_classifier(self, x, logits) -> str | None:
        """The nn.Linear whose output is the logits; else the last nn.Linear that ran."""
        ran = self._outputs(x, nn.Linear)
        exact = [n for n, o in ran if isinstance(o, torch.Tensor) and _close(o, logits)]
        return (exact or [n for n, _ in ran] or [None])[-1]

    def _find_feature_layer(self, x, channels: int, logits, head) -> str | None:
        """The last submodule with a (B, channels, h, w) output for which pool + head gives the logits."""
        outputs = self._outputs(x)
        candidates = [n for n, o in outputs if isinstance(o, torch.Tensor) and o.dim() == 4 and o.shape[1] == channels]
        out = dict(outputs)
        passing = [n for n in reversed(candidates) if _close(head(out[n].mean(dim=(2, 3))), logits)]
        spatial = [n for n in passing if out[n].shape[2] * out[n].shape[3] > 1]  # the map before the pool
        return (spatial or passing or candidates[::-1] or [None])[0]

    def check_head(self, x, logits, feat) -> None:
        got = self.forward_head(feat)
        if got.shape != logits.shape or not _close(got, logits):
            where = ("forward_features" if self.feature_layer is None else f"layer {self.feature_layer!r}")
            raise FmktError(
                f"the model's logits are not global average pooling of {where} followed by the linear "
                f"{self.classifier_name!r}, which FM-KT's shape map S must be: name the submodule whose output "
                "feeds that pool with feature_layer= (and the head with classifier=), or add a forward_features "
                "method returning that map.")

    def _head_or_none(self) -> nn.Linear | None:
        if self.classifier_name is None:
            return None
        try:
            head = self.module.get_submodule(self.classifier_name)
        except AttributeError:
            raise FmktError(f"the model has no submodule {self.classifier_name!r} (classifier=).") from None
        if not isinstance(head, nn.Linear):
            raise FmktError(f"classifier {self.classifier_name!r} is a {type(head).__name__}, not an nn.Linear.")
        return head

    # -- the zoo interface ---------------------------------------------------------------------------------
    @property
    def options(self) -> dict:
        """What fmkt.json records so that the same adapter is rebuilt on load."""
        return {"feature_layer": self.feature_layer, "classifier": self.classifier_name}

    def get_classifier(self) -> nn.Linear:
        head = self._head_or_none()
        if head is None:
            raise FmktError("the model has no nn.Linear classifier; pass classifier=NAME.")
        return head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_layer is None:
            if not hasattr(self.module, "forward_features"):
                raise FmktError("no feature map: the model has no forward_features method and no feature_layer "
                                "was named (pass feature_layer=NAME of the submodule whose output is the map).")
            return _as_map(self.module.forward_features(x), "forward_features")
        try:
            layer = self.module.get_submodule(self.feature_layer)
        except AttributeError:
            raise FmktError(f"the model has no submodule {self.feature_layer!r} (feature_layer=).") from None
        captured = []
        hook = layer.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            self.module(x)
        finally:
            hook.remove()
        if not captured:
            raise FmktError(f"layer {self.feature_layer!r} did not run in the model's forward.")
        return _as_map(captured[-1], f"layer {self.feature_layer!r}")

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        return self.get_classifier()(F.adaptive_avg_pool2d(feat, 1).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.module(x))


def in_eval_mode(module: nn.Module, fn) -> None:
    """``fn()`` without gradients with ``module`` in eval mode (a dry run must not touch BatchNorm statistics), then
    the module's mode restored."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            fn()
    finally:
        module.train(was_training)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    return bool((a - b).abs().max() <= 1e-4 + 1e-3 * b.abs().max())


def is_zoo_backbone(module: nn.Module) -> bool:
    from fmkt.models._base import ZooModel

    return isinstance(module, ZooModel)


def unwrap(backbone: nn.Module) -> nn.Module:
    """The module whose state dict a weights file holds: the user's own (or timm's) model inside an adapter."""
    from fmkt.models.timm_backbone import TimmBackbone

    return backbone.module if isinstance(backbone, (ModuleAdapter, TimmBackbone)) else backbone


def create_backbone(arch: str, *, num_classes: int, in_channels: int, input_size, options: dict | None = None,
                    check_head: bool = True, **kwargs) -> nn.Module:
    """A zoo model by name, timm's ``timm:NAME`` (fmkt.models.timm_backbone), or the model of an import path
    ``pkg.module:factory`` wrapped in a ModuleAdapter.

    The factory is called with ``num_classes`` and ``in_channels`` when it takes them (and ``kwargs``), and its
    model is dry-run on a random (2, in_channels, *input_size) batch.
    """
    from fmkt.models.timm_backbone import create_timm_backbone, is_timm

    if is_timm(arch):
        return create_timm_backbone(arch, num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                                    options=options, check_head=check_head, **kwargs)
    if not is_import_path(arch):
        from fmkt.models import create_model

        return create_model(arch, num_classes=num_classes, in_channels=in_channels, **kwargs)
    module = call_factory(arch, "model factory", num_classes=num_classes, in_channels=in_channels, **kwargs)
    if not isinstance(module, nn.Module):
        raise FmktError(f"model factory {arch!r} returned {type(module).__name__}; it must return a torch nn.Module.")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(ADAPTER_OPTIONS))
    if unknown:
        raise FmktError(f"unknown model option {unknown[0]!r}; valid: {', '.join(ADAPTER_OPTIONS)}.")
    example = torch.rand(2, in_channels, *input_size, generator=torch.Generator().manual_seed(0))
    try:
        adapter = ModuleAdapter(module, example, check_head=check_head, **options)
    except FmktError as exc:
        raise FmktError(f"model {arch!r}: {exc}") from None
    except Exception as exc:  # the user's forward failed on the dry run
        raise FmktError(f"model {arch!r} failed on a ({in_channels}, {', '.join(map(str, input_size))}) dry-run "
                        f"batch ({first_line(exc, 200).rstrip('.')}).") from None
    if adapter.num_classes != num_classes:
        raise FmktError(f"model {arch!r} returns {adapter.num_classes} logits but the data has {num_classes} classes; "
                        "let the factory take num_classes=.")
    return adapter
