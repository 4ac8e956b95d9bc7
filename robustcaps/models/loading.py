"""Resolve a model spec to a checked :class:`~robustcaps.models.adapter.ModelAdapter`.

Spec kinds (parsed by :func:`robustcaps.models.plugins.parse_spec`):

- ``NAME``: a zoo checkpoint, else a built-in architecture (untrained, with a warning),
  else an entry point registered by an installed package in group ``robustcaps.models``;
- ``package.module:factory`` and ``path/to/file.py:factory``: user code, imported because
  the spec names it; the factory returns an ``nn.Module`` (or a ``ModelAdapter``);
- ``path/to/model.pt``: a TorchScript archive;
- ``BASE@path/to/state_dict.pt``: ``BASE`` (a name or a factory spec) with the user's
  weights, loaded strictly with ``torch.load(weights_only=True)``.

Every adapter is in eval mode on the requested device and has passed one probe batch:
scores of shape (N, num_classes) and finite. Anything wrong raises
:class:`~robustcaps.errors.ModelLoadError` with a one-line message.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError, RobustcapsError
from ..utils import resolve_device
from . import plugins
from .adapter import OUTPUT_KINDS, ModelAdapter
from .registry import architectures, create_model
from .zoo import list_zoo, load_zoo_model

#: Keyword options of :class:`ModelAdapter` that :func:`load_model` and suites accept.
ADAPTER_OPTIONS = ("num_classes", "input_shape", "bounds", "mean", "std", "outputs",
                   "output_key", "loss", "name", "device", "dtype", "probe")
#: Options a model may take from ``defaults`` (e.g. the dataset) when neither the user nor
#: the model itself says otherwise.
DEFAULTABLE = ("num_classes", "input_shape", "bounds")


def known_names() -> list[str]:
    """Every plain name a spec can use: zoo, built-in architectures, entry points."""
    return sorted(set(list_zoo()) | set(architectures()) | set(plugins.entry_points()))


def _build_named(name: str, options: Mapping[str, Any], *, for_weights: bool) -> nn.Module | ModelAdapter:
    """Zoo -> built-in architecture -> entry point. ``for_weights``: build the bare
    architecture of a zoo entry (its weights are replaced by the user's)."""
    zoo = list_zoo()
    arch_opts = {k: options[k] for k in ("num_classes", "input_shape") if options.get(k) is not None}
    if for_weights and name in architectures():
        # NAME@weights means NAME's architecture, whatever a zoo entry of that name holds.
        return create_model(name, **{k: tuple(v) if k == "input_shape" else v for k, v in arch_opts.items()})
    if name in zoo:
        if not for_weights:
            if arch_opts:
                warnings.warn(f"zoo model {name!r}: its card fixes the architecture; "
                              "num_classes/input_shape are only checked", stacklevel=3)
            return load_zoo_model(name)
        card = zoo[name].card
        shape = arch_opts.get("input_shape") or card.get("input_shape")
        module = create_model(card["arch"], num_classes=arch_opts.get("num_classes") or card.get("num_classes"),
                              input_shape=tuple(shape) if shape else None, **card.get("arch_kwargs", {}))
        module.robustcaps_meta = {**module.robustcaps_meta, "name": name,
                                  "bounds": tuple(card["bounds"]) if card.get("bounds") else None}
        return module
    if name in architectures():
        if not for_weights:
            warnings.warn(f"{name!r} is an untrained architecture (no zoo checkpoint); "
                          f"load weights with {name}@path/to/state_dict.pt", stacklevel=3)
        return create_model(name, **{k: tuple(v) if k == "input_shape" else v for k, v in arch_opts.items()})
    if name in plugins.entry_points():
        factory = plugins.load_entry_point(name)
        return plugins.call_factory(factory, f"entry point {name}", arch_opts)
    if Path(name).is_file():
        raise ModelLoadError(f"unknown model {name!r}; to load the file of that name, write ./{name}")
    raise ModelLoadError(
        f"unknown model {name!r}; known names: {', '.join(known_names()) or 'none'} "
        "(or use package.module:FACTORY, path/to/file.py:FACTORY, a TorchScript .pt file, "
        "or NAME@path/to/state_dict.pt)"
    )


def _build(spec: plugins.ModelSpec, options: Mapping[str, Any], *, device: torch.device,
           trust_pickle: bool, for_weights: bool = False) -> nn.Module | ModelAdapter:
    """Build the module a spec names (weights not yet loaded for ``weights`` specs)."""
    arch_opts = {k: options[k] for k in ("num_classes", "input_shape") if options.get(k) is not None}
    if spec.kind == "name":
        assert spec.name is not None
        return _build_named(spec.name, options, for_weights=for_weights)
    if spec.kind == "module":
        assert spec.module is not None and spec.attr is not None
        factory = plugins.import_module_spec(spec.module, spec.attr, spec.text)
        return plugins.call_factory(factory, f"{spec.module}:{spec.attr}", arch_opts)
    if spec.kind == "file":
        assert spec.path is not None and spec.attr is not None
        factory = plugins.import_file_spec(spec.path, spec.attr, spec.text)
        return plugins.call_factory(factory, f"{spec.path}:{spec.attr}", arch_opts)
    if spec.kind == "torchscript":
        assert spec.path is not None
        return plugins.load_torchscript(spec.path, device=device, trust_pickle=trust_pickle)
    assert spec.kind == "weights" and spec.base is not None and spec.path is not None
    built = _build(spec.base, options, device=device, trust_pickle=trust_pickle, for_weights=True)
    module = built.model if isinstance(built, ModelAdapter) else built
    ckpt = plugins.torch_load(spec.path, trust_pickle=trust_pickle, what="weights file")
    state = plugins.extract_state_dict(ckpt)
    if state is None:
        keys = sorted(map(str, ckpt))[:6] if isinstance(ckpt, Mapping) else None
        found = f"a dict with keys {keys}" if keys is not None else f"a {type(ckpt).__name__}"
        raise ModelLoadError(f"weights file {spec.path} does not hold a state dict (found {found})")
    plugins.load_state_dict_strict(module, state, source=str(spec.path), arch=spec.base.text)
    meta = dict(getattr(module, "robustcaps_meta", {}) or {})
    if meta:
        module.robustcaps_meta = {**meta, "weights": str(spec.path)}
    return built


def _meta_of(obj: nn.Module | ModelAdapter) -> dict[str, Any]:
    if isinstance(obj, ModelAdapter):
        return {"num_classes": obj.num_classes, "input_shape": obj.input_shape, "bounds": obj.bounds}
    return dict(getattr(obj, "robustcaps_meta", {}) or {})


def _rebuild_adapter(adapter: ModelAdapter, options: dict[str, Any]) -> ModelAdapter:
    """A factory returned a ready ModelAdapter: keep its settings, override with ``options``."""
    base: dict[str, Any] = {
        "num_classes": adapter.num_classes, "input_shape": adapter.input_shape,
        "bounds": adapter.bounds, "outputs": adapter.outputs, "output_key": adapter.output_key,
        "loss": adapter.loss_name, "name": adapter.name, "dtype": adapter.dtype,
    }
    if adapter._mean is not None:
        base["mean"] = adapter._mean.flatten().tolist()
    if adapter._std is not None:
        base["std"] = adapter._std.flatten().tolist()
    return ModelAdapter(adapter.model, **{**base, **options})


def load_model(
    spec: str | Path,
    *,
    trust_pickle: bool = False,
    defaults: Mapping[str, Any] | None = None,
    **options: Any,
) -> ModelAdapter:
    """Load ``spec`` (see the module docstring) as a checked :class:`ModelAdapter`.

    Args:
        spec: the model spec.
        trust_pickle: allow unpickling full-module files (``torch.load(weights_only=False)``);
            only for files you trust, since unpickling runs arbitrary code.
        defaults: fallbacks for ``num_classes``, ``input_shape`` and ``bounds`` (typically
            the dataset's), used only when neither ``options`` nor the model's own metadata
            (``robustcaps_meta``, a zoo card) sets them. Built-in architectures are built for
            them (e.g. ``cnn`` for 1x28x28 MNIST); other models take ``num_classes`` from
            their probe batch instead.
        **options: :class:`ModelAdapter` keyword options (``num_classes``, ``input_shape``
            (C, H, W), ``bounds`` (lo, hi), ``mean``/``std`` (normalisation inside the
            adapter), ``outputs``, ``output_key``, ``loss``, ``name``, ``device``, ...).

    Factories (``module:factory``, ``file.py:factory``, entry points) receive
    ``num_classes`` and ``input_shape`` when the user gave them and the factory's signature
    accepts them.

    Raises:
        ModelLoadError: the spec cannot be resolved or the model fails the probe batch.
    """
    text = str(spec)
    unknown = sorted(set(options) - set(ADAPTER_OPTIONS))
    if unknown:
        raise RobustcapsError(f"unknown model option(s) {', '.join(unknown)}; "
                              f"known: {', '.join(ADAPTER_OPTIONS)}")
    options = {k: v for k, v in options.items() if v is not None}
    device = resolve_device(options.get("device", "auto"))
    options["device"] = device
    parsed = plugins.parse_spec(text)
    defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
    bad = sorted(set(defaults) - set(DEFAULTABLE))
    if bad:
        raise RobustcapsError(f"defaults may only set {', '.join(DEFAULTABLE)}, got {', '.join(bad)}")
    # A built-in architecture (untrained or NAME@weights) has no data of its own: it is
    # built for the defaults (the dataset) unless the user says otherwise.
    named = parsed.base if parsed.kind == "weights" else parsed
    if named is not None and named.kind == "name" and named.name in architectures() \
            and (parsed.kind == "weights" or named.name not in list_zoo()):
        for key, value in defaults.items():
            options.setdefault(key, value)
    built = _build(parsed, options, device=device, trust_pickle=trust_pickle)
    if isinstance(built, ModelAdapter):
        # A plugin's ready adapter keeps its own settings (and name) unless overridden.
        meta = _meta_of(built)
        for key, value in defaults.items():
            if key not in options and meta.get(key) is None:
                options[key] = value
        return _rebuild_adapter(built, options)
    options.setdefault("name", text)
    if not isinstance(built, nn.Module):
        raise ModelLoadError(
            f"model spec {text!r} produced a {type(built).__name__}, expected a torch.nn.Module "
            "or a ModelAdapter"
        )
    meta = _meta_of(built)
    for key, value in defaults.items():
        # A model of unknown width tells its num_classes on the probe batch; the data's
        # count (e.g. the labels present in an npz file) may be smaller.
        if key not in options and key not in meta and key != "num_classes":
            options[key] = value
    if options.get("probe", True) and options.get("input_shape") is None and meta.get("input_shape") is None:
        raise ModelLoadError(
            f"input shape of model {text!r} is unknown: pass --input-shape C,H,W "
            "(Python: input_shape=(C, H, W)) so it can be checked on a probe batch"
        )
    return ModelAdapter(built, **options)


# --------------------------------------------------------------------------- option parsing
def _floats(value: Any, name: str) -> tuple[float, ...]:
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
    elif isinstance(value, (int, float)):
        parts = [value]
    elif isinstance(value, Sequence):
        parts = list(value)
    else:
        raise RobustcapsError(f"{name}: expected numbers, got {value!r}")
    try:
        out = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise RobustcapsError(f"{name}: expected comma-separated numbers, got {value!r}") from None
    if not out:
        raise RobustcapsError(f"{name}: expected at least one number")
    if not all(map(lambda v: v == v and abs(v) != float("inf"), out)):
        raise RobustcapsError(f"{name}: numbers must be finite, got {value!r}")
    return out


def parse_input_shape(value: Any) -> tuple[int, int, int]:
    """``"1,28,28"`` / ``"1x28x28"`` / ``[1, 28, 28]`` -> (C, H, W) of positive ints."""
    parts = re.split(r"[,x\s]+", value.strip().lower()) if isinstance(value, str) else value
    try:
        shape = tuple(int(p) for p in parts if p != "")
    except (TypeError, ValueError):
        raise RobustcapsError(f"input_shape: expected C,H,W (e.g. 1,28,28), got {value!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise RobustcapsError(f"input_shape: expected three positive integers C,H,W, got {value!r}")
    return shape  # type: ignore[return-value]


def parse_bounds(value: Any) -> tuple[float, float]:
    """``"0,1"`` / ``[0, 1]`` -> (lo, hi) with lo < hi."""
    b = _floats(value, "bounds")
    if len(b) != 2 or not b[0] < b[1]:
        raise RobustcapsError(f"bounds: expected LO,HI with LO < HI, got {value!r}")
    return b  # type: ignore[return-value]


def parse_output_key(value: Any) -> str | int:
    """An integer-looking key selects a tuple index, anything else a dict key."""
    if isinstance(value, bool):
        raise RobustcapsError(f"output_key: expected a key or an index, got {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not text:
        raise RobustcapsError("output_key: empty")
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def parse_adapter_options(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """Validate adapter options given as strings or plain values (CLI flags, suite keys).

    Keys (``-`` and ``_`` are interchangeable): ``num_classes``, ``input_shape``,
    ``bounds``, ``mean``, ``std``, ``outputs``, ``output_key``, ``loss``, ``name``,
    ``trust_pickle``. Returns keyword arguments for :func:`load_model`.
    """
    out: dict[str, Any] = {}
    for raw_key, value in mapping.items():
        key = str(raw_key).replace("-", "_")
        if value is None:
            continue
        if key == "num_classes":
            try:
                k = int(value)
            except (TypeError, ValueError):
                raise RobustcapsError(f"num_classes: expected an integer, got {value!r}") from None
            if k < 2 or (isinstance(value, float) and value != k):
                raise RobustcapsError(f"num_classes: expected an integer >= 2, got {value!r}")
            out[key] = k
        elif key == "input_shape":
            out[key] = parse_input_shape(value)
        elif key == "bounds":
            out[key] = parse_bounds(value)
        elif key in ("mean", "std"):
            vals = _floats(value, key)
            if key == "std" and min(vals) <= 0:
                raise RobustcapsError(f"std: must be positive, got {value!r}")
            out[key] = vals
        elif key == "outputs":
            if value not in OUTPUT_KINDS:
                raise RobustcapsError(f"outputs: expected one of {', '.join(OUTPUT_KINDS)}, got {value!r}")
            out[key] = value
        elif key == "output_key":
            out[key] = parse_output_key(value)
        elif key in ("loss", "name"):
            out[key] = str(value)
        elif key == "trust_pickle":
            if not isinstance(value, bool):
                raise RobustcapsError(f"trust_pickle: expected true or false, got {value!r}")
            out[key] = value
        else:
            raise RobustcapsError(
                f"unknown model option {raw_key!r}; known: num_classes, input_shape, bounds, "
                "mean, std, outputs, output_key, loss, name, trust_pickle"
            )
    return out
