"""Third-party model specs: parsing, and importing the code or files they name.

A model spec is one string (``--model SPEC`` on the command line, ``model = "..."`` in a
suite, ``robustcaps.load_model(SPEC)`` in Python). :func:`parse_spec` classifies it
without touching the file system beyond ``is_file`` checks and without running any code:

=================================  ==========================================================
``capsnet-small``                  zoo checkpoint, built-in architecture (untrained) or an
                                   entry point of group ``robustcaps.models``, in that order
``package.module:factory``         ``import package.module`` and call ``factory`` (dotted
                                   attribute paths such as ``mod:Class.build`` work)
``path/to/file.py:factory``        execute that file as a module and call ``factory``
``path/to/model.pt``               a TorchScript archive (``torch.jit.save``)
``BASE@path/to/state_dict.pt``     build ``BASE`` (any of the spec kinds above except
                                   TorchScript) and load the state dict strictly into it
=================================  ==========================================================

Trust: user code runs only in the ``module``, ``file`` and ``entry_point`` kinds, i.e. only
when the spec names that code. Weights are read with ``torch.load(weights_only=True)``;
full-module pickles (``torch.save(model)``) are unpickled only with ``trust_pickle=True``
(CLI ``--trust-pickle``), because unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ModelLoadError

ENTRY_POINT_GROUP = "robustcaps.models"
SpecKind = Literal["name", "module", "file", "torchscript", "weights"]

_IDENT = r"[A-Za-z_]\w*"
_DOTTED = rf"{_IDENT}(?:\.{_IDENT})*"
_MODULE_SPEC = re.compile(rf"({_DOTTED}):({_DOTTED})")
_NAME_SPEC = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+\-]*")
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".torchscript", ".zip")
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".zip", ".pkl")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    ``kind``: ``name`` (zoo / architecture / entry point), ``module``, ``file``,
    ``torchscript`` or ``weights`` (``base`` plus a state-dict ``path``).
    """

    text: str
    kind: SpecKind
    name: str | None = None  # kind "name"
    module: str | None = None  # kind "module": importable module name
    attr: str | None = None  # kinds "module"/"file": factory attribute path
    path: Path | None = None  # kinds "file"/"torchscript"/"weights"
    base: ModelSpec | None = None  # kind "weights": what the state dict goes into

    @property
    def runs_user_code(self) -> bool:
        """Whether resolving this spec imports code the user named (or a plugin's code)."""
        if self.kind == "weights":
            return self.base is not None and self.base.runs_user_code
        return self.kind in ("module", "file")


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.lower().endswith(MODEL_FILE_SUFFIXES)


def parse_spec(spec: str) -> ModelSpec:
    """Classify ``spec`` (see the module docstring). Runs no code and loads nothing."""
    if not isinstance(spec, str):
        raise ModelLoadError(f"model spec must be a string, got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise ModelLoadError("empty model spec")
    if "@" in text:
        # BASE@WEIGHTS. Names and module specs hold no '@', so the first '@' ends them; a
        # file.py:FACTORY base ends at its factory name. Weight paths may contain '@'.
        m = re.fullmatch(rf"(.+?\.py):({_DOTTED})@(.+)", text, flags=re.IGNORECASE)
        if m:
            base = ModelSpec(f"{m.group(1)}:{m.group(2)}", "file", attr=m.group(2), path=Path(m.group(1)))
            return ModelSpec(text, "weights", path=Path(m.group(3)), base=base)
        left, _, right = text.partition("@")
        if left and right and (_MODULE_SPEC.fullmatch(left) or _NAME_SPEC.fullmatch(left)):
            return ModelSpec(text, "weights", path=Path(right), base=parse_spec(left))
        if not Path(text).is_file():
            raise ModelLoadError(
                f"model spec {text!r}: expected BASE@path/to/weights.pt with BASE a zoo or "
                "architecture name, package.module:FACTORY or path/to/file.py:FACTORY"
            )
    if ":" in text:
        left, _, right = text.rpartition(":")
        if left.lower().endswith(".py"):
            if not re.fullmatch(_DOTTED, right):
                raise ModelLoadError(
                    f"model spec {text!r}: expected path/to/file.py:FACTORY, "
                    f"and {right!r} is not a Python name"
                )
            return ModelSpec(text, "file", attr=right, path=Path(left))
        m = _MODULE_SPEC.fullmatch(text)
        if m:
            return ModelSpec(text, "module", module=m.group(1), attr=m.group(2))
    if text.lower().endswith(".py"):
        raise ModelLoadError(
            f"model spec {text!r} names a Python file but no factory: use {text}:FACTORY"
        )
    if _looks_like_path(text):
        return ModelSpec(text, "torchscript", path=Path(text))
    if _NAME_SPEC.fullmatch(text):  # a bare word is a name even if a file has it (use ./NAME)
        return ModelSpec(text, "name", name=text)
    if Path(text).is_file():
        return ModelSpec(text, "torchscript", path=Path(text))
    raise ModelLoadError(
        f"cannot parse model spec {text!r}: expected NAME, package.module:FACTORY, "
        "path/to/file.py:FACTORY, path/to/model.pt (TorchScript) or NAME@path/to/weights.pt"
    )


# --------------------------------------------------------------------------- code import
def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _getattr_path(obj: Any, attr: str) -> Any:
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def import_module_spec(module: str, attr: str, spec_text: str) -> Any:
    """``import module`` and return ``module.attr`` (dotted). Errors name the module."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        if module == missing or module.startswith(missing + "."):
            raise ModelLoadError(
                f"cannot import module {module!r} (model spec {spec_text!r}): "
                f"no module named {missing!r}"
            ) from exc
        raise ModelLoadError(
            f"importing module {module!r} (model spec {spec_text!r}) failed: "
            f"it needs module {missing!r}, which is not installed"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - user code can raise anything on import
        raise ModelLoadError(
            f"importing module {module!r} (model spec {spec_text!r}) failed: {_first_line(exc)}"
        ) from exc
    try:
        return _getattr_path(mod, attr)
    except AttributeError:
        raise ModelLoadError(
            f"module {module!r} has no attribute {attr!r} (model spec {spec_text!r})"
        ) from None


def _file_module_name(path: Path) -> str:
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    return f"robustcaps_user_{stem}_{digest}"


def import_file(path: Path, spec_text: str) -> Any:
    """Execute the Python file ``path`` as a fresh module and return it.

    The file's folder is put on ``sys.path`` while it executes, so it can import its
    sibling modules. The module is registered in ``sys.modules`` under a name derived
    from the absolute path (re-loading the same file re-executes it).
    """
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path} (model spec {spec_text!r})")
    path = path.resolve()
    name = _file_module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - .py files always have one
        raise ModelLoadError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - user code can raise anything
        sys.modules.pop(name, None)
        raise ModelLoadError(f"error while importing model file {path}: {_first_line(exc)}") from exc
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:  # pragma: no cover - the file removed it itself
            pass
    return module


def import_file_spec(path: Path, attr: str, spec_text: str) -> Any:
    """Execute ``path`` and return its attribute ``attr`` (dotted)."""
    module = import_file(path, spec_text)
    try:
        return _getattr_path(module, attr)
    except AttributeError:
        found = sorted(
            n for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        )
        hint = f"; callables defined there: {', '.join(found)}" if found else ""
        raise ModelLoadError(f"model file {path} has no attribute {attr!r}{hint}") from None


# --------------------------------------------------------------------------- entry points
def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Entry points of group ``robustcaps.models`` by name (first one wins on clashes)."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def load_entry_point(name: str) -> Any:
    """Import the object entry point ``name`` refers to (runs the plugin's import code)."""
    ep = entry_points().get(name)
    if ep is None:
        raise ModelLoadError(f"no entry point {name!r} in group {ENTRY_POINT_GROUP!r}")
    dist = getattr(getattr(ep, "dist", None), "name", None) or "an installed package"
    try:
        return ep.load()
    except ModuleNotFoundError as exc:
        raise ModelLoadError(
            f"entry point {name!r} (from {dist}) = {ep.value!r}: cannot import module "
            f"{exc.name or ep.module!r}"
        ) from exc
    except AttributeError as exc:
        raise ModelLoadError(
            f"entry point {name!r} (from {dist}) = {ep.value!r}: factory missing ({_first_line(exc)})"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - plugin import code can raise anything
        raise ModelLoadError(
            f"entry point {name!r} (from {dist}) failed to load: {_first_line(exc)}"
        ) from exc


# --------------------------------------------------------------------------- factories
def call_factory(factory: Any, label: str, options: Mapping[str, Any]) -> Any:
    """Call a model factory, passing those of ``options`` its signature accepts.

    ``options`` holds e.g. ``num_classes`` and ``input_shape`` when the user gave them; a
    factory that declares such a parameter (or ``**kwargs``) receives it, others are called
    without it. An ``nn.Module`` instance is returned as is.
    """
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise ModelLoadError(f"{label!r} is not callable (it is a {type(factory).__name__})")
    kwargs: dict[str, Any] = {}
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: call bare
        sig = None
    if sig is not None:
        params = sig.parameters
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for key, value in options.items():
            if value is not None and (var_kw or key in params):
                kwargs[key] = value
        missing = [
            n for n, p in params.items()
            if p.default is inspect.Parameter.empty and n not in kwargs
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]
        if missing:
            raise ModelLoadError(
                f"factory {label!r} requires argument(s) {', '.join(missing)}, which robustcaps "
                "cannot supply; give them defaults or wrap the factory"
            )
    try:
        return factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - user code can raise anything
        raise ModelLoadError(f"factory {label!r} raised {_first_line(exc)}") from exc


# --------------------------------------------------------------------------- files
def _zip_names(path: Path) -> list[str] | None:
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def is_torchscript_file(path: Path) -> bool:
    """A TorchScript archive is a zip holding compiled ``code/``; torch.save zips do not."""
    names = _zip_names(path)
    return bool(names) and any("/code/" in n or n.startswith("code/") for n in names)


def _is_weights_only_refusal(exc: BaseException) -> bool:
    return isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc).lower()


def torch_load(path: Path, *, trust_pickle: bool, what: str) -> Any:
    """``torch.load`` on the CPU: ``weights_only=True`` unless ``trust_pickle``."""
    if not path.is_file():
        raise ModelLoadError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many different errors
        if not trust_pickle and _is_weights_only_refusal(exc):
            raise ModelLoadError(
                f"{what} {path} holds pickled Python objects, which are not loaded by default "
                "(unpickling runs arbitrary code); if you trust the file, pass --trust-pickle "
                "(Python: trust_pickle=True)"
            ) from exc
        raise ModelLoadError(f"cannot read {what} {path}: {_first_line(exc)}") from exc


def load_torchscript(path: Path, *, device: torch.device, trust_pickle: bool = False) -> nn.Module:
    """Load a TorchScript archive onto ``device``.

    With ``trust_pickle`` a full-module ``torch.save(model)`` pickle is accepted too.
    A state dict gets an error that says how to load it (``ARCH@FILE``).
    """
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    if is_torchscript_file(path):
        try:
            with warnings.catch_warnings():
                # torch >= 2.9 deprecates TorchScript; loading existing archives still works.
                warnings.filterwarnings("ignore", message=".*torch.jit", category=DeprecationWarning)
                return torch.jit.load(str(path), map_location=device)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot load TorchScript file {path}: {_first_line(exc)}") from exc
    if _zip_names(path) is None and not trust_pickle:
        raise ModelLoadError(
            f"not a TorchScript file: {path} (save one with torch.jit.save(torch.jit.script(model), "
            "path) or use a spec such as path/to/file.py:FACTORY)"
        )
    try:
        obj = torch_load(path, trust_pickle=trust_pickle, what="model file")
    except ModelLoadError as exc:
        if trust_pickle:
            raise
        raise ModelLoadError(
            f"not a TorchScript file: {path} is a torch.save pickle; a full pickled module is "
            "loaded only with --trust-pickle (unpickling runs arbitrary code)"
        ) from exc
    if isinstance(obj, nn.Module):
        return obj
    if extract_state_dict(obj) is not None:
        raise ModelLoadError(
            f"not a TorchScript file: {path} holds a state dict; load it into its architecture "
            f"with ARCH@{path} (e.g. cnn@{path})"
        )
    raise ModelLoadError(f"not a TorchScript file: {path} holds a {type(obj).__name__}, not a model")


# --------------------------------------------------------------------------- state dicts
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights", "ema")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state dict in a checkpoint: the dict itself, or under a usual key
    (``state_dict``, ``model_state_dict``, ``model``, ...), or a module's; else None."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            if _is_tensor_dict(obj.get(key)):
                return dict(obj[key])
    return None


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    # DataParallel ("module.") and torch.compile ("_orig_mod.") wrap the real keys.
    for prefix in _STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and not any(
            k.startswith(prefix) for k in expected
        ):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_dict_strict(module: nn.Module, state: Mapping[str, Any], *, source: str,
                           arch: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with a one-line error naming the first
    missing, unexpected or wrongly shaped key."""
    expected = module.state_dict()
    state = _strip_prefixes(dict(state), set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shape = [
        k for k in expected
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shape:
        counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shape)} wrongly shaped"
        if missing:
            first = f"missing key {missing[0]!r}"
        elif unexpected:
            first = f"unexpected key {unexpected[0]!r}"
        else:
            k = shape[0]
            first = (f"key {k!r} has shape {tuple(state[k].shape)}, "
                     f"the architecture expects {tuple(expected[k].shape)}")
        raise ModelLoadError(
            f"state dict {source} does not match architecture {arch!r}: {first} ({counts})"
        )
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - e.g. dtype or custom _load_from_state_dict hooks
        raise ModelLoadError(
            f"state dict {source} does not load into architecture {arch!r}: {_first_line(exc)}"
        ) from exc


def describe_callable(obj: Callable[..., Any]) -> str:
    """``module:qualname`` of a callable, for messages and manifests."""
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__name__)}"
