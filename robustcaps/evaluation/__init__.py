"""The evaluation pipeline, one module per step, read top to bottom:

- :mod:`.config`: what a run is (frozen, validated settings; each defined once);
- :mod:`.suite`: settings from a TOML suite file;
- :mod:`.plan`: the units of work (white-box and transfer) with stable keys;
- :mod:`.store`: the run directory (resume, chunks, done log, manifest, COMPLETE);
- :mod:`.records`: the record columns and how a unit's result becomes rows;
- :mod:`.run`: ``evaluate(config)``: validate, data, models, plan, store, run, report.

The names below are loaded on first use, so that :mod:`robustcaps.report` can import
:mod:`.records` without loading the whole pipeline.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvaluationConfig": "config", "Targeting": "config", "DataSelection": "config",
    "ThreatSettings": "config", "TransferSettings": "config", "RunSettings": "config",
    "OutputSettings": "config", "evaluate": "run", "EvaluationResult": "run",
    "RECORD_COLUMNS": "records", "load_suite": "suite",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
