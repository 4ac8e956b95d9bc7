"""One way from anything that names a model to a checked ModelAdapter.

:func:`resolve_model` is what evaluate, diagnose, train and the CLI call. A model may be
given as a spec string (see :mod:`robustcaps.models.loading`), a suite table
``{"spec": ..., <adapter options>}``, a :class:`ModelRequest` (a spec with its adapter
options, as the CLI's ``--model`` builds it), an ``nn.Module`` or a ready
:class:`ModelAdapter`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RobustcapsError
from ..utils import resolve_device
from .adapter import ModelAdapter
from .loading import load_model, parse_adapter_options

log = logging.getLogger("robustcaps.models")


@dataclass
class ModelRequest:
    """One model spec with its adapter options (keyword arguments of ``load_model``)."""

    spec: str
    options: dict[str, Any] = field(default_factory=dict)

    def load(self, *, defaults: Mapping[str, Any] | None = None, **extra: Any) -> ModelAdapter:
        """Load as a checked :class:`ModelAdapter`.

        ``extra`` (e.g. ``device=``) overrides ``options``; ``defaults`` (e.g. the
        dataset's ``num_classes``/``input_shape``/``bounds``) fill in only what neither the
        user nor the model sets. Warnings (untrained architecture, probability outputs) are
        logged as one line each instead of Python warning blocks.
        """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adapter = load_model(self.spec, defaults=defaults, **{**self.options, **extra})
        for w in caught:
            # Library deprecation notices are hidden by default in Python; keep it so.
            if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)):
                log.warning("%s: %s", self.spec, w.message)
        return adapter

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | str) -> ModelRequest:
        """A suite entry: a spec string, or a table with ``spec`` (or ``model``) and adapter
        option keys (``num_classes``, ``input_shape``, ``bounds``, ``mean``, ``std``,
        ``output_key``, ``outputs``, ``name``, ``loss``, ``trust_pickle``)."""
        if isinstance(mapping, str):
            return cls(mapping)
        rest = dict(mapping)
        spec = rest.pop("spec", None) or rest.pop("model", None)
        if not isinstance(spec, str) or not spec.strip():
            raise RobustcapsError(f"model entry {dict(mapping)!r} has no 'spec' string")
        return cls(spec.strip(), parse_adapter_options(rest))

    def describe(self) -> dict[str, Any]:
        """JSON-friendly form for run manifests."""
        return {"spec": self.spec, "options": {k: list(v) if isinstance(v, tuple) else v
                                               for k, v in self.options.items()}}


def resolve_model(model: Any, *, defaults: Mapping[str, Any] | None = None,
                  **options: Any) -> ModelAdapter:
    """Anything that names a model -> a checked :class:`ModelAdapter`.

    ``defaults`` fill ``num_classes``/``input_shape``/``bounds`` where neither ``options``
    nor the model sets them (typically the dataset's); ``options`` are adapter options
    (``device``, ``loss``, ...; see :func:`~robustcaps.models.loading.load_model`). A ready
    adapter takes only ``loss`` (a shallow copy with that attack loss) and ``device`` (a
    copy moved there; ``"auto"`` leaves it where it is). Options given as None are ignored,
    so that they never override a request's own.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(model, ModelAdapter):
        return _reuse_adapter(model, options)
    if isinstance(model, nn.Module):
        meta = dict(getattr(model, "robustcaps_meta", {}) or {})
        for key, value in (defaults or {}).items():
            # as load_model: a module tells its num_classes on the probe batch; the data's
            # count (the labels present, e.g. in an npz file) may be smaller
            if value is not None and key not in options and meta.get(key) is None \
                    and key != "num_classes":
                options[key] = value
        return ModelAdapter(model, **options)
    if isinstance(model, (str, Path)):
        return load_model(model, defaults=defaults, **options)
    if isinstance(model, Mapping):
        model = ModelRequest.from_mapping(model)
    if isinstance(model, ModelRequest):
        return model.load(defaults=defaults, **options)
    raise RobustcapsError(f"cannot use a {type(model).__name__} as a model: give a spec string, "
                          "an nn.Module or a ModelAdapter")


def _reuse_adapter(adapter: ModelAdapter, options: Mapping[str, Any]) -> ModelAdapter:
    extra = {k: v for k, v in options.items() if k not in ("device", "loss")}
    if extra:
        raise RobustcapsError(
            f"options {', '.join(sorted(extra))} cannot be applied to a ready ModelAdapter "
            f"({adapter.name!r}); pass the nn.Module or a spec instead")
    loss, device = options.get("loss"), options.get("device")
    if loss is not None and loss != adapter.loss_name:
        adapter = copy.copy(adapter)  # same module, another attack loss
        adapter.loss_name = loss
    if device is not None and str(device) != "auto" and resolve_device(device) != adapter.device:
        adapter = adapter.to(resolve_device(device))
    return adapter


def model_spec(model: Any) -> Any:
    """JSON form of a model argument (a spec or a table), None for a Python object."""
    if isinstance(model, (str, dict)):
        return model
    spec = getattr(model, "spec", None)
    if isinstance(spec, str):
        opts = {k: list(v) if isinstance(v, tuple) else v
                for k, v in (getattr(model, "options", {}) or {}).items()}
        return {"spec": spec, **opts} if opts else spec
    return None


def state_sha256(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()
