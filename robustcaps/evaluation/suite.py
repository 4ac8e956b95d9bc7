"""Attack suites: declarative TOML recipes of evaluation settings.

A suite is a flat TOML table; every key is optional and is a setting of
:mod:`robustcaps.evaluation.config` (by its suite name), plus ``name``, ``description``
and ``eps_range`` (command-line options given explicitly override the suite)::

    name = "paper-fig3"
    description = "..."
    attack = ["fgsm", "bim"]          # registered attacks, transfer, all, or a list
    mode = "both"                     # untargeted | targeted | both
    models = ["capsnet-small", "cnn"] # or tables: {spec = "f.py:build", output_key = "logits"}
    dataset = "synthnorb"             # synthnorb | smallnorb | mnist | npz:PATH
    epsilons = [0.0, 0.05, 0.1]       # or eps_range = "0:0.5:0.05" (not both)
    steps = 10                        # iterative attacks; also step_size, early_stop
    backend = "native"                # native (built-in engine) | torchattacks | foolbox | all
    source = "cnn"                    # transfer; also targets, transfer_attack

Unknown keys and bad values raise :class:`~robustcaps.errors.RobustcapsError` naming the
key. Suites ship in the top-level ``attacks/`` folder; ``--suite NAME`` finds them there.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..errors import RobustcapsError
from ..utils import repo_root
from .config import iter_settings, parse_eps_range, parse_setting

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: suite key -> setting field, in declaration order
_SETTINGS = {(f.metadata["suite"] or f.name): f for _, f in iter_settings()}
SUITE_KEYS = ("name", "description", *_SETTINGS, "eps_range")


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


def _check_value(where: str, key: str, value: Any) -> None:
    if key in ("name", "description", "eps_range"):
        if not isinstance(value, str):
            raise RobustcapsError(f"{where}: {key!r} must be a string, got {value!r}")
        return
    f = _SETTINGS[key]
    expected = f.metadata["expected"]
    expected = expected() if callable(expected) else expected
    reason = ""
    try:
        ok = isinstance(value, f.metadata["toml"]) and (
            not isinstance(value, bool) or f.metadata["toml"] is bool)
        if ok:
            parse_setting(f.name, value)
    except RobustcapsError as exc:
        ok, reason = False, f" ({exc})"
    if not ok:
        raise RobustcapsError(f"{where}: {key!r} must be {expected}, got {value!r}{reason}")


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
        if key not in SUITE_KEYS:
            raise RobustcapsError(
                f"suite {p.name}: unknown key {key!r}; known keys: {', '.join(SUITE_KEYS)}")
        _check_value(f"suite {p.name}", key, value)
    if "epsilons" in data and "eps_range" in data:
        raise RobustcapsError(f"suite {p.name}: give 'epsilons' or 'eps_range', not both")
    if "eps_range" in data:
        try:
            data["epsilons"] = parse_eps_range(data.pop("eps_range"))
        except RobustcapsError as exc:
            raise RobustcapsError(f"suite {p.name}: 'eps_range': {exc}") from None
    data["_path"] = str(p)
    return data


def suite_to_kwargs(suite: dict[str, Any]) -> dict[str, Any]:
    """Suite keys -> setting keys (the keyword arguments of ``robustcaps.evaluate``)."""
    return {_SETTINGS[k].name: v for k, v in suite.items() if k in _SETTINGS}
