"""Attack suites: declarative TOML recipes for :func:`robustcaps.attacks.engine.evaluate`.

A suite is a flat TOML table; every key is optional and maps to an ``evaluate`` argument
(command-line options given explicitly override it)::

    name = "paper-fig3"
    description = "..."
    attack = ["fgsm", "bim"]          # fgsm | bim | transfer | all, or a list
    mode = "both"                     # untargeted | targeted | both
    models = ["capsnet-small", "cnn"] # or tables: {spec = "f.py:build", output_key = "logits"}
    dataset = "synthnorb"             # synthnorb | smallnorb | mnist | npz:PATH
    split = "test"
    epsilons = [0.0, 0.05, 0.1]       # or eps_range = "0:0.5:0.05" (not both)
    steps = 10                        # BIM
    step_size = 0.0125                # BIM, absolute; default 1.25 * eps / steps
    early_stop = true                 # BIM
    loss = "ce"                       # ce | spread | margin | cw
    n_samples = 200
    batch_size = 100
    backend = "native"                # native | torchattacks | foolbox | all, or a list
    seed = 0
    source = "cnn"                    # transfer
    targets = ["capsnet-small", "cnn-b"]
    transfer_attack = "fgsm"

Unknown keys and bad values raise :class:`~robustcaps.errors.RobustcapsError` naming the
key. Suites ship in the top-level ``attacks/`` folder; ``--suite NAME`` finds them there.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from ..errors import RobustcapsError
from ..models.adapter import LOSSES
from ..utils import repo_root

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_STR_OR_LIST = (str, list)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# key -> (check, description of a valid value)
_SCHEMA: dict[str, tuple[Any, str]] = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "description": (lambda v: isinstance(v, str), "a string"),
    "attack": (lambda v: _str_list(v, ("fgsm", "bim", "transfer", "all")),
               "fgsm, bim, transfer, all or a list of them"),
    "mode": (lambda v: v in ("untargeted", "targeted", "both"), "untargeted, targeted or both"),
    "models": (lambda v: isinstance(v, list) and v and all(_model_entry(s) for s in v),
               "a non-empty list of model specs or tables {spec = ..., <adapter options>}"),
    "dataset": (lambda v: isinstance(v, str) and v, "a dataset name"),
    "split": (lambda v: isinstance(v, str) and v, "a split name"),
    "data_dir": (lambda v: isinstance(v, str) and v, "a folder path"),
    "epsilons": (lambda v: isinstance(v, list) and v and all(_is_num(e) and e >= 0 for e in v),
                 "a non-empty list of numbers >= 0"),
    "eps_range": (lambda v: isinstance(v, str), "a string START:STOP:STEP"),
    "steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "step_size": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "early_stop": (lambda v: isinstance(v, bool), "true or false"),
    "loss": (lambda v: v in LOSSES, " or ".join(LOSSES)),
    "n_samples": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "backend": (lambda v: _str_list(v, ("native", "torchattacks", "foolbox", "all")),
                "native, torchattacks, foolbox, all or a list of them"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "device": (lambda v: isinstance(v, str), "auto, cpu or cuda[:N]"),
    "source": (lambda v: isinstance(v, str) and v, "a model spec"),
    "targets": (lambda v: isinstance(v, list) and v and all(isinstance(s, str) and s for s in v),
                "a non-empty list of model specs"),
    "transfer_attack": (lambda v: v in ("fgsm", "bim"), "fgsm or bim"),
}
SUITE_KEYS = tuple(_SCHEMA)


def _model_entry(v: Any) -> bool:
    """A spec string, or a table that ModelRequest.from_mapping accepts (it raises a
    RobustcapsError naming the bad adapter option)."""
    if isinstance(v, str):
        return bool(v)
    if isinstance(v, dict):
        from ..commands._model_options import ModelRequest

        ModelRequest.from_mapping(v)
        return True
    return False


def _str_list(v: Any, allowed: tuple[str, ...]) -> bool:
    items = [v] if isinstance(v, str) else v
    return isinstance(items, list) and bool(items) and all(
        isinstance(i, str) and i in allowed for i in items)


def find_suite(name_or_path: str | Path) -> Path:
    """A suite file path, or a bare name looked up in the top-level ``attacks/`` folder."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    root = repo_root()
    if root is not None and p.suffix in ("", ".toml") and len(p.parts) == 1:
        cand = root / "attacks" / (p.stem + ".toml")
        if cand.is_file():
            return cand
    known = sorted(f.stem for f in (root / "attacks").glob("*.toml")) if root else []
    hint = f"; shipped suites: {', '.join(known)}" if known else ""
    raise RobustcapsError(f"suite {str(name_or_path)!r} not found{hint}")


def load_suite(path: str | Path) -> dict[str, Any]:
    """Read and validate a suite; returns its keys (TOML names) with valid values."""
    p = find_suite(path)
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RobustcapsError(f"suite {p}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise RobustcapsError(f"suite {p}: cannot read: {exc}") from None
    for key, value in data.items():
        if key not in _SCHEMA:
            raise RobustcapsError(
                f"suite {p.name}: unknown key {key!r}; known keys: {', '.join(SUITE_KEYS)}")
        check, expected = _SCHEMA[key]
        if not check(value):
            raise RobustcapsError(f"suite {p.name}: {key!r} must be {expected}, got {value!r}")
    if "epsilons" in data and "eps_range" in data:
        raise RobustcapsError(f"suite {p.name}: give 'epsilons' or 'eps_range', not both")
    if "eps_range" in data:
        from .engine import parse_eps_range

        try:
            data["epsilons"] = parse_eps_range(data.pop("eps_range"))
        except RobustcapsError as exc:
            raise RobustcapsError(f"suite {p.name}: 'eps_range': {exc}") from None
    if "epsilons" in data and len(set(data["epsilons"])) != len(data["epsilons"]):
        raise RobustcapsError(f"suite {p.name}: 'epsilons' contains duplicates")
    data["_path"] = str(p)
    return data


def suite_to_kwargs(suite: dict[str, Any]) -> dict[str, Any]:
    """Suite keys -> :func:`~robustcaps.attacks.engine.evaluate` keyword arguments."""
    rename = {"mode": "targeted", "targets": "transfer_targets"}
    skip = {"name", "description", "_path"}
    return {rename.get(k, k): v for k, v in suite.items() if k not in skip}
