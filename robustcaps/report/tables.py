"""Tables built from per-sample attack records: summary, per-target summary, console table.

Records (``records.csv.gz``) hold one row per sample x model x attack x backend x target x
epsilon with the columns :data:`RECORD_COLUMNS`. Every table here is an aggregation of
those rows, so anything in a run directory can be regenerated from the records alone.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

# read_records and normalise_records are re-exported for the report's callers
from ..evaluation.records import RECORD_COLUMNS, normalise_records, read_records  # noqa: F401

#: the first columns of summary.csv, in this order (fixed by the project's interface)
SUMMARY_COLUMNS = [
    "model", "attack", "backend", "targeted", "epsilon", "n", "accuracy", "success_rate",
    "ci_low", "ci_high",
]
SUMMARY_EXTRA = ["clean_accuracy", "n_samples", "n_targets", "source", "eps_units"]
GROUP = ["model", "attack", "backend", "targeted", "epsilon"]


def wilson_interval(k: np.ndarray | int, n: np.ndarray | int, z: float = 1.959963984540054
                    ) -> tuple[np.ndarray, np.ndarray]:
    """95% Wilson score interval for k successes out of n (vectorised; n = 0 gives NaN)."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1.0 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        lo, hi = np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)
    return lo, hi


def _clean_accuracy(records: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    # One clean prediction per sample (it is repeated over epsilons and targets).
    per_sample = records.drop_duplicates(keys + ["sample"])
    out = per_sample.assign(ok=per_sample["clean_pred"] == per_sample["label"])
    return out.groupby(keys, sort=False)["ok"].mean().rename("clean_accuracy").reset_index()


def summarize(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Aggregate records into ``(summary, per_target)`` DataFrames.

    ``summary``: one row per (model, attack, backend, targeted, epsilon); ``accuracy`` is set
    for untargeted rows (fraction of samples still classified correctly), ``success_rate``
    for targeted ones (fraction of (sample, target) pairs classified as the target, i.e.
    the average over target classes weighted by their pair counts); ``ci_low``/``ci_high``
    is the 95% Wilson interval of whichever is set (for targeted rows it treats the pairs
    as independent trials). ``per_target``: targeted rows split by target class.
    """
    if records.empty:
        cols = SUMMARY_COLUMNS + SUMMARY_EXTRA
        return pd.DataFrame(columns=cols), pd.DataFrame(columns=cols[:4] + ["target"] + cols[4:])
    df = records.assign(correct=records["adv_pred"] == records["label"])
    g = df.groupby(GROUP, sort=False)
    s = g.agg(n=("success", "size"), n_correct=("correct", "sum"), n_success=("success", "sum"),
              n_samples=("sample", "nunique"), source=("source", "first"),
              eps_units=("eps_units", "first")).reset_index()
    # targets per sample (K - 1 for the paper's every-wrong-class protocol; 0 untargeted)
    s["n_targets"] = np.where(s["targeted"].astype(bool), s["n"] // s["n_samples"].clip(lower=1), 0)
    s = s.merge(_clean_accuracy(df, GROUP[:4]), on=GROUP[:4], how="left")
    untargeted = ~s["targeted"].astype(bool)
    s["accuracy"] = np.where(untargeted, s["n_correct"] / s["n"], np.nan)
    s["success_rate"] = np.where(untargeted, np.nan, s["n_success"] / s["n"])
    k = np.where(untargeted, s["n_correct"], s["n_success"])
    s["ci_low"], s["ci_high"] = wilson_interval(k, s["n"])
    summary = s[SUMMARY_COLUMNS + SUMMARY_EXTRA].sort_values(GROUP, kind="stable")

    t = df[df["targeted"]]
    if t.empty:
        per_target = pd.DataFrame(columns=GROUP[:4] + ["target"] + SUMMARY_COLUMNS[4:])
    else:
        keys = GROUP[:4] + ["target", "epsilon"]
        pt = t.groupby(keys, sort=False).agg(n=("success", "size"),
                                             n_success=("success", "sum")).reset_index()
        pt["accuracy"] = np.nan
        pt["success_rate"] = pt["n_success"] / pt["n"]
        pt["ci_low"], pt["ci_high"] = wilson_interval(pt["n_success"], pt["n"])
        per_target = pt[keys + ["n", "accuracy", "success_rate", "ci_low", "ci_high"]]
        per_target = per_target.sort_values(keys, kind="stable")
    return summary.reset_index(drop=True), per_target.reset_index(drop=True)


def backend_disagreement(summary: pd.DataFrame) -> pd.DataFrame:
    """Largest |value - native value| in percentage points per (model, attack, targeted).

    ``value`` is accuracy (untargeted) or success rate (targeted). Empty when only one
    backend ran.
    """
    s = summary[~summary["backend"].astype(str).str.startswith("transfer:")].copy()
    if s["backend"].nunique() < 2:
        return pd.DataFrame(columns=["model", "attack", "targeted", "backend", "max_abs_diff_pp",
                                     "at_epsilon"])
    s["value"] = s["accuracy"].fillna(s["success_rate"]) * 100
    ref_name = "native" if "native" in set(s["backend"]) else sorted(s["backend"])[0]
    ref = s[s["backend"] == ref_name][["model", "attack", "targeted", "epsilon", "value"]]
    m = s[s["backend"] != ref_name].merge(ref, on=["model", "attack", "targeted", "epsilon"],
                                          suffixes=("", "_ref"))
    m["diff"] = (m["value"] - m["value_ref"]).abs()
    rows = []
    for key, grp in m.groupby(["model", "attack", "targeted", "backend"], sort=False):
        i = grp["diff"].idxmax()
        rows.append((*key, float(grp.loc[i, "diff"]), float(grp.loc[i, "epsilon"])))
    return pd.DataFrame(rows, columns=["model", "attack", "targeted", "backend", "max_abs_diff_pp",
                                       "at_epsilon"])


def _fmt_eps(e: float) -> str:
    return f"{e:g}"


def console_table(summary: pd.DataFrame, max_width: int = 120) -> str:
    """A compact text table: one line per (model, attack, backend, mode), epsilons across.

    Values are percentages: accuracy for untargeted rows, success rate for targeted ones.
    """
    if summary.empty:
        return "(no results)"
    s = summary.copy()
    s["value"] = s["accuracy"].fillna(s["success_rate"]) * 100
    s["mode"] = np.where(s["targeted"].astype(bool), "targeted succ%", "accuracy %")
    eps = sorted(s["epsilon"].unique())
    keys = ["model", "attack", "backend", "mode"]
    rows = []
    for key, grp in s.groupby(keys, sort=False):
        vals = dict(zip(grp["epsilon"], grp["value"], strict=False))
        n = int(grp["n"].max())
        rows.append([*key, str(n)] + [("" if e not in vals or math.isnan(vals[e])
                                       else f"{vals[e]:.1f}") for e in eps])
    header = ["model", "attack", "backend", "metric", "n"] + [_fmt_eps(e) for e in eps]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(  # noqa: E731
        (str(c).ljust(w) if i < 4 else str(c).rjust(w)) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    lines = [fmt_row(header), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in rows]
    units = s["eps_units"].dropna().iloc[0] if "eps_units" in s and s["eps_units"].notna().any() else ""
    lines.insert(0, f"epsilon (columns): {units}" if units else "epsilon (columns)")
    return "\n".join(lines)
