"""Records: one row per model x attack x backend x target x epsilon x sample.

Every table and figure of a run is an aggregation of these rows (:mod:`robustcaps.report`
imports the columns from here). A transfer row names its threat in ``attack``
(``transfer-<crafting attack>``) and ``backend`` (``transfer:<source>``) and its source
in ``source``; those values are the run directory's file format and stay as they are.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..attacks.base import AttackResult

RECORD_COLUMNS = [
    "model", "attack", "backend", "source", "targeted", "target", "epsilon", "sample",
    "label", "clean_pred", "adv_pred", "success", "linf", "l2", "eps_units",
]
#: extra columns of ``auto`` rows only (other runs' columns, and their golden hashes, stay
#: as they were): the component that broke the sample and the passes spent on it
AUTO_COLUMNS = ["broken_by", "forwards", "backwards"]
#: dtypes pandas cannot infer from a CSV holding only empty strings
_CSV_DTYPES = {"source": "string", "eps_units": "string", "broken_by": "string"}


def eps_units(bounds: tuple[float, float] | None) -> str:
    """Human-readable epsilon units for outputs."""
    if bounds is None:
        return "L-inf, per-image standardised input units"
    return f"L-inf, input units in [{bounds[0]:g}, {bounds[1]:g}]"


def records_from(res: AttackResult, *, model: str, attack: str, backend: str, source: str,
                 samples: np.ndarray, units: str) -> pd.DataFrame:
    """AttackResult (E, M) -> DataFrame with E*M rows (epsilon-major)."""
    e_count, m = res.adv_pred.shape
    eps = np.repeat(res.epsilons, m)

    def tile(a):
        return np.tile(np.asarray(a), e_count)

    target = (pd.array(tile(res.targets.numpy()), dtype="Int64") if res.targets is not None
              else pd.array([pd.NA] * (e_count * m), dtype="Int64"))
    df = pd.DataFrame({
        "model": model, "attack": attack, "backend": backend, "source": source,
        "targeted": res.targeted, "target": target, "epsilon": eps,
        "sample": tile(samples), "label": tile(res.y.numpy()),
        "clean_pred": tile(res.clean_pred.numpy()), "adv_pred": res.adv_pred.numpy().reshape(-1),
        "success": res.success.numpy().reshape(-1), "linf": res.linf.numpy().reshape(-1),
        "l2": res.l2.numpy().reshape(-1), "eps_units": units,
    }, columns=RECORD_COLUMNS)
    if "broken_by" in res.info:
        df["broken_by"] = np.asarray(res.info["broken_by"], dtype=object).reshape(-1)
        df["forwards"] = np.asarray(res.info["sample_forwards"]).reshape(-1)
        df["backwards"] = np.asarray(res.info["sample_backwards"]).reshape(-1)
    return df


def read_records(path) -> pd.DataFrame:
    """Read records (``records.csv.gz`` or a chunk) with the right dtypes (``target`` is a
    nullable integer)."""
    return normalise_records(pd.read_csv(path, dtype=_CSV_DTYPES, keep_default_na=True))


def read_chunk(path) -> pd.DataFrame:
    """A unit's chunk as written, not yet normalised (concatenated chunks are)."""
    return pd.read_csv(path, dtype=_CSV_DTYPES)


def normalise_records(df: pd.DataFrame) -> pd.DataFrame:
    """Column order and dtypes of :data:`RECORD_COLUMNS` (extra columns kept at the end)."""
    df = df.copy()
    df["target"] = df["target"].astype("Int64")
    df["targeted"] = df["targeted"].astype(bool)
    df["success"] = df["success"].astype(bool)
    df["source"] = df["source"].astype("string").fillna("")
    if "broken_by" in df:
        df["broken_by"] = df["broken_by"].astype("string").fillna("")
    return df[RECORD_COLUMNS + [c for c in df.columns if c not in RECORD_COLUMNS]]


def concat_records(chunks: list[pd.DataFrame]) -> pd.DataFrame:
    """Every unit's rows as one normalised frame (an empty one without units)."""
    if not chunks:
        return normalise_records(pd.DataFrame(columns=RECORD_COLUMNS))
    return normalise_records(pd.concat(chunks, ignore_index=True))
