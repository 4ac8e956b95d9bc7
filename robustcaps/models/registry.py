"""Registry of built-in architectures (timm-style ``register_model`` / ``create_model``).

A factory registered here builds an *untrained* module; trained weights live in the zoo
(:mod:`robustcaps.models.zoo`). The registry imports no architecture: the package imports
them, which runs their ``@register_model``. Each created module gets a ``robustcaps_meta`` dict that
:class:`~robustcaps.models.adapter.ModelAdapter` reads for its defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import ModelLoadError


@dataclass(frozen=True)
class Architecture:
    name: str
    factory: Callable[..., nn.Module]
    description: str
    num_classes: int
    input_shape: tuple[int, int, int]
    outputs: str = "logits"
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, Architecture] = {}


def register_model(
    name: str,
    *,
    description: str,
    num_classes: int = 5,
    input_shape: tuple[int, int, int] = (2, 32, 32),
    outputs: str = "logits",
    **defaults: Any,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``factory(num_classes=..., in_channels=..., **kw) -> nn.Module``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} registered twice")
        _REGISTRY[name] = Architecture(
            name, factory, description, num_classes, tuple(input_shape), outputs, dict(defaults)
        )
        return factory

    return deco


def architectures() -> dict[str, Architecture]:
    """All registered architectures by name (the built-ins register when
    :mod:`robustcaps.models` imports them)."""
    return dict(_REGISTRY)


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build an untrained registered architecture.

    ``input_shape`` (C, H, W) sets the input channels (and spatial size where the
    architecture depends on it); ``kwargs`` go to the factory (e.g. ``iterations=2``).
    """
    arch = architectures().get(name)
    if arch is None:
        known = ", ".join(sorted(_REGISTRY))
        raise ModelLoadError(f"unknown architecture {name!r}; known: {known}")
    k = num_classes or arch.num_classes
    shape = tuple(input_shape or arch.input_shape)
    params = {**arch.defaults, **kwargs}
    try:
        model = arch.factory(num_classes=k, input_shape=shape, **params)
    except TypeError as exc:
        raise ModelLoadError(f"bad options for architecture {name!r}: {exc}") from exc
    model.robustcaps_meta = {
        "name": name,
        "num_classes": k,
        "input_shape": shape,
        "outputs": arch.outputs,
        "bounds": None,
        "arch": name,
        "arch_kwargs": params,
    }
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
