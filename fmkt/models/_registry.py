"""A timm-style model registry: ``@register_model`` factories, ``create_model`` and ``list_models``.

A factory is a function ``name(num_classes=..., in_channels=..., **kwargs) -> nn.Module``; it is
registered under its function name.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

from fmkt.errors import FmktError

__all__ = ["register_model", "create_model", "list_models"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(fn: F) -> F:
    """Register a model factory under its function name and return it unchanged."""
    name = fn.__name__
    old = _MODELS.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
        raise ValueError(f"model name {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def create_model(name: str, num_classes: int = 100, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build the registered model ``name`` for ``num_classes`` outputs and ``in_channels`` input channels.

    ``timm:NAME`` builds timm's model with fmkt's backbone interface (fmkt.models.timm_backbone.TimmBackbone),
    dry-run at ``input_size`` (default: ``img_size`` when given, else 224 x 224); other keywords go to timm."""
    if name.startswith("timm:"):
        from fmkt.models.timm_backbone import create_timm_backbone

        side = kwargs.get("img_size", 224)
        size = kwargs.pop("input_size", None) or (tuple(side) if isinstance(side, (tuple, list)) else (side, side))
        return create_timm_backbone(name, num_classes=num_classes, in_channels=in_channels, input_size=size,
                                    options=kwargs.pop("options", None), **kwargs)
    fn = _MODELS.get(name)
    if fn is None:
        raise FmktError(f"Unknown model {name!r}; choose one of: {', '.join(list_models())}.")
    return fn(num_classes=num_classes, in_channels=in_channels, **kwargs)
