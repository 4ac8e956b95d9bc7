"""Resolve a model spec to a :class:`~robustcaps.models.adapter.ModelAdapter`.

Specs: a zoo name (trained weights) or a registered architecture name (untrained).
"""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import ModelLoadError
from .adapter import ModelAdapter
from .registry import architectures, create_model
from .zoo import list_zoo, load_zoo_model


def load_model(spec: str, **options: Any) -> ModelAdapter:
    """Load ``spec`` and wrap it; ``options`` go to :class:`ModelAdapter`."""
    spec = spec.strip()
    if spec in list_zoo():
        module = load_zoo_model(spec)
    elif spec in architectures():
        warnings.warn(f"{spec!r} is an untrained architecture (no zoo checkpoint)", stacklevel=2)
        module = create_model(spec)
    else:
        known = sorted(set(list_zoo()) | set(architectures()))
        raise ModelLoadError(f"unknown model {spec!r}; known: {', '.join(known)}")
    options.setdefault("name", spec)
    return ModelAdapter(module, **options)
