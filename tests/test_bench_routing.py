"""``robustcaps bench routing``: rows, fields and the native/torch switch (no timing asserted)."""

from __future__ import annotations

import json
import os

from click.testing import CliRunner

from robustcaps.bench.routing import benchmark_routing, command
from robustcaps.models import native


def test_rows_report_passes_threads_and_restore_settings():
    import torch

    before = (torch.get_num_threads(), os.environ.get("ROBUSTCAPS_NATIVE"))
    rows = benchmark_routing(("capsnet-small",), "cpu", batch_size=2, iterations=1, repeats=1,
                             threads=1, native_passes=False, routings=("paper",))
    assert (torch.get_num_threads(), os.environ.get("ROBUSTCAPS_NATIVE")) == before
    (row,) = rows
    assert row["passes"] == "torch" and row["threads"] == 1 and row["cpu"]
    assert 60_000 < row["params"] < 80_000
    for key in ("forward", "forward_backward"):
        assert row[f"{key}_img_s"] > 0
        assert abs(row[f"{key}_img_s"] * row[f"{key}_s_per_batch"] - 2) < 0.01


def test_cli_json_names_the_native_passes_when_built():
    res = CliRunner().invoke(command, ["--device", "cpu", "--model", "capsnet-small",
                                       "--batch-size", "2", "--iterations", "1",
                                       "--repeats", "1", "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["routing"] for r in rows] == ["paper", "authors"]  # both presets by default
    row = rows[0]
    assert row["passes"] == ("native" if native.library() is not None else "torch")
    assert row["model"] == "capsnet-small" and row["batch_size"] == 2


def test_rows_report_cpu_seconds_per_preset():
    rows = benchmark_routing(("capsnet-small",), "cpu", batch_size=2, iterations=2, repeats=1,
                             threads=1, routings=("paper", "authors"))
    assert [r["routing"] for r in rows] == ["paper", "authors"]
    for r in rows:
        for key in ("forward", "forward_backward"):
            assert 0 < r[f"{key}_cpu_s_per_batch"] < 60
