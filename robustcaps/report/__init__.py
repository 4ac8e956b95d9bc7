"""Tables (CSV/JSON) and seaborn figures built from per-sample records.

:func:`build_report` turns a run directory's ``records.csv.gz`` (plus ``manifest.json``
for class names and ``examples/*.npz`` for the example grid) into every derived output:
``summary.csv``, ``summary_per_target.csv``, ``backend_agreement.csv``, ``table.txt`` and
the figures. ``robustcaps evaluate`` calls it at the end of a run and ``robustcaps report
RUN_DIR`` calls it again, so any figure can be regenerated from the records alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import RobustcapsError
from ..evaluation.store import COMPLETE_MARKER, write_csv
from ..utils import ensure_dir
from .tables import (
    RECORD_COLUMNS,
    SUMMARY_COLUMNS,
    backend_disagreement,
    console_table,
    read_records,
    summarize,
    wilson_interval,
)

__all__ = [
    "COMPLETE_MARKER", "RECORD_COLUMNS", "SUMMARY_COLUMNS", "ReportResult", "backend_disagreement", "build_report",
    "console_table", "read_records", "summarize", "wilson_interval",
]



class ReportResult(dict):
    """``{output name: path}`` plus the tables as attributes."""

    summary: pd.DataFrame
    per_target: pd.DataFrame
    disagreement: pd.DataFrame
    table: str


def build_report(run_dir: str | Path, *, records: pd.DataFrame | None = None,
                 figures: bool = True, manifest: dict[str, Any] | None = None,
                 out: str | Path | None = None) -> ReportResult:
    """(Re)generate summary tables and figures of a run directory from its records, into
    ``out`` (default: the run directory itself; another folder leaves it untouched)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RobustcapsError(f"run directory {run_dir} does not exist")
    rec_path = run_dir / "records.csv.gz"
    if records is None:
        if not rec_path.is_file():
            if (run_dir / "chunks").is_dir():
                raise RobustcapsError(
                    f"{run_dir} holds an unfinished run (no records.csv.gz); continue it with "
                    f"'robustcaps evaluate --resume --out {run_dir}'"
                )
            raise RobustcapsError(f"{run_dir} has no records.csv.gz: not a robustcaps run directory")
        try:
            records = read_records(rec_path)
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise RobustcapsError(f"cannot read {rec_path}: {exc}") from None
    missing = [c for c in RECORD_COLUMNS if c not in records.columns]
    if missing:
        raise RobustcapsError(f"{rec_path} lacks columns: {', '.join(missing)}")
    if manifest is None:
        mpath = run_dir / "manifest.json"
        manifest = json.loads(mpath.read_text()) if mpath.is_file() else {}
    data = manifest.get("data", {})
    dest = run_dir if out is None else ensure_dir(out, "--out")
    out = ReportResult()
    summary, per_target = summarize(records)
    out["summary"] = write_csv(summary, dest / "summary.csv")
    if not per_target.empty:
        out["summary_per_target"] = write_csv(per_target, dest / "summary_per_target.csv")
    disagreement = backend_disagreement(summary)
    if not disagreement.empty:
        out["backend_agreement"] = write_csv(disagreement, dest / "backend_agreement.csv")
    table = console_table(summary)
    if not disagreement.empty:
        worst = disagreement.loc[disagreement["max_abs_diff_pp"].idxmax()]
        table += (f"\nlargest backend disagreement: {worst['max_abs_diff_pp']:.2f} pp "
                  f"({worst['backend']} vs native, {worst['model']}, {worst['attack']}, "
                  f"eps={worst['at_epsilon']:g})")
    (dest / "table.txt").write_text(table + "\n")
    out["table"] = dest / "table.txt"
    if figures:
        from . import plots

        fig_dir = dest / "figures"
        num_classes = data.get("num_classes")
        made = {
            "accuracy_vs_epsilon": plots.plot_accuracy_vs_epsilon(summary, fig_dir, num_classes),
            "targeted_success_vs_epsilon": plots.plot_targeted_success(summary, fig_dir),
            "transfer_heatmap": plots.plot_transfer_heatmap(summary, fig_dir),
            "adversarial_examples": plots.plot_adversarial_examples(
                sorted((run_dir / "examples").glob("*.npz")), fig_dir,
                data.get("class_names"), data.get("eps_units")),
        }
        for name, paths in made.items():
            for p in paths:
                out[f"{name}.{p.suffix[1:]}"] = p
    out.summary, out.per_target, out.disagreement, out.table = summary, per_target, disagreement, table
    return out
