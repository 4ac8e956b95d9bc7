"""The ``auto`` attack's breakdown: which component broke how many samples, and at what cost.

From the ``auto`` records alone (their ``broken_by``, ``forwards`` and ``backwards``
columns): per (model, backend, mode, epsilon) and component, in the order the components
ran, the samples (or sample-target pairs) it broke first and the robust accuracy
(targeted: success rate) of the worst case *up to and including* it, so the last
component's row is the ``auto`` row of the summary.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .tables import wilson_interval

KEYS = ["model", "backend", "targeted", "epsilon"]


def auto_breakdown(records: pd.DataFrame, components: list[str] | None = None) -> pd.DataFrame:
    """One row per (model, backend, targeted, epsilon, component); empty without auto rows."""
    rows = records[records["attack"] == "auto"] if "broken_by" in records else records.iloc[:0]
    if rows.empty:
        return pd.DataFrame()
    seen = [c for c in dict.fromkeys(rows["broken_by"].fillna("")) if c not in ("", "clean")]
    order = [c for c in (components or []) if c] or sorted(seen)
    order += [c for c in seen if c not in order]
    out = []
    for key, g in rows.groupby(KEYS, sort=False):
        n, broken = len(g), int((g["broken_by"] == "clean").sum())
        for comp in order:
            k = int((g["broken_by"] == comp).sum())
            broken += k
            out.append({**dict(zip(KEYS, key, strict=True)), "component": comp, "broke": k,
                        "n": n, "value_after": (n - broken) / n if not key[2] else broken / n,
                        "mean_forwards": float(g["forwards"].mean()),
                        "mean_backwards": float(g["backwards"].mean())})
    df = pd.DataFrame(out)
    df["ci_low"], df["ci_high"] = wilson_interval(np.rint(df["value_after"] * df["n"]), df["n"])
    return df


def breakdown_text(df: pd.DataFrame) -> str:
    """Console lines: per model, mode and epsilon, what each component broke."""
    if df.empty:
        return ""
    lines = ["auto: samples broken first by each component (accuracy or success after it)"]
    for key, g in df.groupby(KEYS, sort=False):
        model, _, targeted, eps = key
        parts = [f"{r.component} {r.broke} ({100 * r.value_after:.0f}%)" for r in g.itertuples()]
        metric = "success" if targeted else "accuracy"
        lines.append(f"  {model} eps {eps:g}: {', '.join(parts)}; worst-case {metric} "
                     f"{100 * g['value_after'].iloc[-1]:.1f}%, "
                     f"{g['mean_backwards'].iloc[0]:.0f} gradients/sample")
    return "\n".join(lines)
