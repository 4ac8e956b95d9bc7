"""Table 1 of Hinton et al. (2018) on SynthNORB: the capsule ablation, one budget for every row.

    python results/table1/run.py [--budget tiny|cpu|full] [--rows it3,cnn] [--arch-kw routing=paper]
                                 [--capsule capsnet] [--time-limit 3000] [--collect-only]

Trains the rows below with ``robustcaps train`` (resumable, skips finished rows; see
results/sweep.py), then writes ``table.csv`` and ``table.md`` beside the paper's smallNORB
column: validation error (5% of the training split, the only number a choice may use), test
error with the centre crop and with the paper's multiple crops, training time and hardware.
Every row has the same budget, seed and data; the final weights are reported (no choice
among epochs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import sweep  # noqa: E402

C = "CAPSULE"  # the --capsule architecture (default capsnet, the paper's A=B=C=D=32)
ROWS = [
    sweep.Row("it1", "1 iteration, matrix, spread, coord. add.", C, ["--arch-kw", "iterations=1"], "9.7%"),
    sweep.Row("it2", "2 iterations, matrix, spread, coord. add.", C, ["--arch-kw", "iterations=2"], "2.2%"),
    sweep.Row("it3", "3 iterations, matrix, spread, coord. add.", C, ["--arch-kw", "iterations=3"], "1.8%"),
    sweep.Row("it5", "5 iterations, matrix, spread, coord. add.", C, ["--arch-kw", "iterations=5"], "3.9%"),
    sweep.Row("vector", "3 it., vector, spread, coord. add.", C,
              ["--arch-kw", "iterations=3", "--arch-kw", "pose=vector"], "2.9%"),
    sweep.Row("nocoord", "3 it., matrix, spread, no coord. add.", C,
              ["--arch-kw", "iterations=3", "--arch-kw", "coord_add=false"], "2.6%"),
    sweep.Row("vector-nocoord", "3 it., vector, spread, no coord. add.", C,
              ["--arch-kw", "iterations=3", "--arch-kw", "pose=vector", "--arch-kw", "coord_add=false"],
              "3.2%"),
    sweep.Row("margin", "3 it., matrix, margin loss, coord. add.", C,
              ["--arch-kw", "iterations=3", "--loss", "margin"], "3.2%"),
    sweep.Row("ce", "3 it., matrix, cross-entropy, coord. add.", C,
              ["--arch-kw", "iterations=3", "--loss", "ce"], "5.8%"),
    sweep.Row("cnn", "baseline CNN", "cnn", [], "5.2%", capsule=False),
]
COLUMNS = ["row", "setting", "paper_test_error", "val_error", "test_center_error",
           "test_multi_crop_error", "status", "epochs", "steps", "train_time_s", "hardware",
           "command"]


def collect(rows: list[sweep.Row], runs: Path) -> list[dict]:
    out = []
    for row in rows:
        c = sweep.card(runs, row) or {}
        err = c.get("test_error") or {}
        out.append({"row": row.id, "setting": row.label, "paper_test_error": row.paper,
                    "val_error": c.get("val_error"), "test_center_error": err.get("center"),
                    "test_multi_crop_error": err.get("multi_crop"),
                    "status": c.get("status", "not run"), "epochs": c.get("epochs", ""),
                    "steps": c.get("steps", ""), "train_time_s": c.get("train_time_s", ""),
                    "hardware": c.get("hardware", ""), "command": c.get("command", "")})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sweep.add_options(parser, HERE / "runs")
    opts = parser.parse_args(argv)
    rows = sweep.select(ROWS, opts.rows)
    if not opts.collect_only:
        for row in rows:
            sweep.run_row(row, opts)
    table = collect(rows, opts.runs)
    notes = (f"Budget `{opts.budget}`: `{' '.join(sweep.BUDGETS[opts.budget])}`, seed {opts.seed}, "
             f"capsule rows `--model {opts.capsule}` with preset `{' '.join(opts.arch_kw) or '(none)'}`. "
             "Paper: smallNORB, full training; ours: SynthNORB. Errors of the final weights; "
             "val = the budget's --val-fraction of the training split, held out. The paper's best model (3 iterations) "
             "with multiple crops: 1.4%.")
    sweep.write_table(table, COLUMNS, opts.out or HERE, "Table 1 on SynthNORB", notes)
    return table


if __name__ == "__main__":
    main()
