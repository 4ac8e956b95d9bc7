"""Shared machinery of the ``results/table*/run.py`` recipes: resumable ``robustcaps train`` rows.

A row is one ``robustcaps train`` run in ``RUNS/<row id>``. Running a recipe again skips the
rows whose card says ``finished`` or ``stopped`` (reached ``--stop-at-error``), resumes the
ones with a checkpoint (``--resume``), and starts the rest; with ``--time-limit`` each run
checkpoints and pauses, so a recipe can be rerun across sessions until every row is done.
Every invocation appends a line (row, start, wall time, exit code, hardware, command) to
``RUNS/invocations.csv``; the table takes each row's cumulative training time and hardware
from its model card.

Only the ``robustcaps train`` command line and the library's loading/data modules are used
(not the training engine's Python API), so the recipes survive refactors of its internals.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Training options every row of a recipe shares, per budget. The budget is per row: one
# number of epochs for all, the same seeds and data, and a validation split held out from
# the training data (5%), the only split any choice may look at.
BUDGETS: dict[str, list[str]] = {
    # a few steps on a few images: checks the plumbing, its numbers mean nothing
    "tiny": ["--epochs", "1", "--max-train-samples", "40", "--steps-per-epoch", "2",
             "--batch-size", "8", "--max-test-samples", "20", "--eval-samples", "20",
             "--val-fraction", "0.25"],
    # what 2 CPU cores do in hours per capsule row (the zoo's capsnet-small took 36 min for 15)
    "cpu": ["--epochs", "4", "--max-test-samples", "2000", "--val-fraction", "0.05",
            "--checkpoint-every", "100"],
    # the full training and test sets, for a GPU owner
    "full": ["--epochs", "30", "--val-fraction", "0.05", "--checkpoint-every", "500"],
}
DONE = ("finished", "stopped")


@dataclass
class Row:
    """One table row: ``robustcaps train --model MODEL ARGS`` (``capsule``: takes the preset)."""

    id: str
    label: str
    model: str
    args: list[str] = field(default_factory=list)
    paper: str = ""
    capsule: bool = True


def add_options(parser: argparse.ArgumentParser, default_runs: Path) -> None:
    """The options every recipe shares."""
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu",
                        help="training budget of every row (see BUDGETS in results/sweep.py)")
    parser.add_argument("--tiny", action="store_const", const="tiny", dest="budget",
                        help="same as --budget tiny (a few steps; for tests)")
    parser.add_argument("--rows", default=None, help="comma-separated row ids (default: all)")
    parser.add_argument("--capsule", default="capsnet", help="capsule architecture of the rows")
    parser.add_argument("--arch-kw", action="append", default=[], metavar="KEY=VALUE",
                        help="capsule preset for every capsule row, e.g. routing=paper (repeat)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed for every row")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="per run: checkpoint and pause after this long (rerun to continue)")
    parser.add_argument("--runs", type=Path, default=default_runs, help="folder of the runs")
    parser.add_argument("--out", type=Path, default=None, help="folder of the table (default: the recipe's)")
    parser.add_argument("--collect-only", action="store_true", help="only (re)build the table")
    parser.add_argument("--extra", default="", help="more train options for every row, one string")


def select(rows: list[Row], wanted: str | None) -> list[Row]:
    if not wanted:
        return rows
    ids = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = sorted(set(ids) - {r.id for r in rows})
    if unknown:
        sys.exit(f"unknown row(s) {', '.join(unknown)}; known: {', '.join(r.id for r in rows)}")
    return [r for r in rows if r.id in ids]


def card(runs: Path, row: Row) -> dict | None:
    path = runs / row.id / "card.json"
    return json.loads(path.read_text()) if path.is_file() else None


def train_command(row: Row, opts: argparse.Namespace, extra: list[str] = ()) -> list[str]:
    """The row's ``robustcaps train`` command line (without --resume / --time-limit)."""
    preset = [a for kv in opts.arch_kw for a in ("--arch-kw", kv)] if row.capsule else []
    model = opts.capsule if row.model == "CAPSULE" else row.model
    return ["robustcaps", "train", "--model", model, *BUDGETS[opts.budget], *preset, *row.args,
            *shlex.split(opts.extra), *extra, "--seed", str(opts.seed), "--device", opts.device,
            "--name", row.id, "--out", str(opts.runs / row.id), "-q"]


def hardware() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def run_row(row: Row, opts: argparse.Namespace, extra: list[str] = ()) -> str:
    """Run (or resume) one row unless it is done; returns its card status afterwards."""
    c = card(opts.runs, row)
    if c is not None and c.get("status") in DONE:
        print(f"{row.id}: {c['status']}, skipped")
        return c["status"]
    cmd = train_command(row, opts, extra)
    if (opts.runs / row.id / "checkpoints" / "last.pt").is_file():
        cmd.append("--resume")
    if opts.time_limit:
        cmd += ["--time-limit", str(opts.time_limit)]
    print(f"{row.id}: {shlex.join(cmd)}", flush=True)
    start, t0 = time.strftime("%Y-%m-%dT%H:%M:%S"), time.monotonic()
    rc = subprocess.run([sys.executable, "-m", "robustcaps.cli", *cmd[1:]], check=False).returncode
    log = opts.runs / "invocations.csv"
    new = not log.is_file()
    with log.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["row", "started", "wall_s", "exit_code", "hardware", "command"])
        w.writerow([row.id, start, f"{time.monotonic() - t0:.1f}", rc, hardware(), shlex.join(cmd)])
    c = card(opts.runs, row)
    return c.get("status", "?") if c else ("failed" if rc else "paused")


def budget_value(budget: str, flag: str) -> str | None:
    """The value of ``flag`` in a budget's options (None when it is not set)."""
    opts = BUDGETS[budget]
    return opts[opts.index(flag) + 1] if flag in opts else None


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def write_table(rows: list[dict], columns: list[str], out: Path, title: str, notes: str) -> None:
    """``table.csv`` and ``table.md`` (the CSV's columns, percentages as text)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "table.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in columns} for r in rows)
    lines = [f"# {title}", "", notes, "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    for r in rows:
        cells = [pct(r[k]) if isinstance(r.get(k), float) and k.endswith("error") else str(r.get(k, ""))
                 for k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
