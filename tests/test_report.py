"""Summary tables (Wilson intervals, targeted averaging) and regenerating a run's outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from robustcaps.errors import RobustcapsError
from robustcaps.report import build_report
from robustcaps.report.tables import (
    RECORD_COLUMNS,
    SUMMARY_COLUMNS,
    console_table,
    summarize,
    wilson_interval,
)


def test_wilson_known_values():
    lo, hi = wilson_interval(np.array([0, 5, 10, 81]), np.array([10, 10, 10, 263]))
    # reference values (e.g. R's prop.test(correct=FALSE) / Wilson 1927)
    np.testing.assert_allclose(lo, [0.0, 0.236593, 0.722467, 0.2553], atol=1e-4)
    np.testing.assert_allclose(hi, [0.277533, 0.763407, 1.0, 0.3662], atol=1e-4)


def _records() -> pd.DataFrame:
    rows = []
    # untargeted: 4 samples, eps 0 and 0.1
    for s, (label, clean, adv) in enumerate([(0, 0, 1), (1, 1, 1), (2, 2, 0), (3, 0, 0)]):
        for eps, pred in ((0.0, clean), (0.1, adv)):
            rows.append(("m", "fgsm", "native", "", False, None, eps, s, label, clean, pred,
                         pred != label, eps, eps, "u"))
    # targeted: 2 samples x 3 targets at eps 0.1; target 1 always reached, others once
    hits = {(0, 1): True, (0, 2): True, (0, 3): False, (1, 0): False, (1, 2): False, (1, 3): True}
    for (s, t), hit in hits.items():
        label = s
        pred = t if hit else label
        rows.append(("m", "fgsm", "native", "", True, t, 0.1, s, label, label, pred, hit, 0.1,
                     0.1, "u"))
    return pd.DataFrame(rows, columns=RECORD_COLUMNS)


def test_summarize_numbers():
    summary, per_target = summarize(_records())
    assert list(summary.columns[:10]) == SUMMARY_COLUMNS
    u = summary[~summary["targeted"]].set_index("epsilon")
    assert u.loc[0.0, "accuracy"] == 0.75 and u.loc[0.1, "accuracy"] == 0.25
    assert np.isnan(u.loc[0.1, "success_rate"])
    assert u.loc[0.1, "clean_accuracy"] == 0.75
    lo, hi = wilson_interval(1, 4)
    assert u.loc[0.1, "ci_low"] == pytest.approx(float(lo))
    t = summary[summary["targeted"]].iloc[0]
    assert t["n"] == 6 and t["success_rate"] == pytest.approx(3 / 6) and np.isnan(t["accuracy"])
    assert t["n_targets"] == 3
    pt = per_target.set_index("target")["success_rate"]
    assert pt.loc[1] == 1.0 and pt.loc[0] == 0.0 and pt.loc[2] == 0.5 and pt.loc[3] == 0.5
    text = console_table(summary)
    assert "25.0" in text and "50.0" in text


def test_build_report_regenerates(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _records().to_csv(run / "records.csv.gz", index=False, compression="gzip")
    first = build_report(run)
    s1 = (run / "summary.csv").read_text()
    (run / "summary.csv").unlink()
    for f in (run / "figures").iterdir():
        f.unlink()
    second = build_report(run)
    assert (run / "summary.csv").read_text() == s1
    assert set(first) == set(second)
    assert (run / "figures" / "accuracy_vs_epsilon.png").stat().st_size > 1000
    assert (run / "figures" / "targeted_success_vs_epsilon.svg").is_file()


def test_report_refuses_unfinished(tmp_path):
    (tmp_path / "chunks").mkdir()
    with pytest.raises(RobustcapsError, match="unfinished"):
        build_report(tmp_path)
    with pytest.raises(RobustcapsError, match="does not exist"):
        build_report(tmp_path / "missing")
