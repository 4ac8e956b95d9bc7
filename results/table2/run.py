"""Table 2 of Hinton et al. (2018) on SynthNORB: novel viewpoints at matched familiar-view error.

    python results/table2/run.py [--budget tiny|cpu|full] [--rows azimuth-cnn,azimuth-caps]
                                 [--arch-kw routing=paper] [--capsule capsnet] [--time-limit 3000]

Section 5.1's protocol, per axis (azimuth, elevation; README "Data" for the splits):

1. the CNN trains on ``<axis>-train`` (5% held out as familiar-viewpoint validation data)
   for the budget's epochs; its validation error is the target ``E``;
2. the capsule network trains on the same data and stops as soon as its validation error
   is at most ``E`` (``--stop-at-error E --on val``, checked every few steps), or at the
   end of the same budget (then the row says it did not match);
3. both are tested on ``<axis>-test-novel`` and ``<axis>-test-familiar``, centre crop and
   multiple crops (cached in ``RUNS/<row>/viewpoints.json``).

The test splits take no part in any decision. Rows are resumable and skipped when done
(results/sweep.py); a capsule row waits until its CNN is done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import sweep  # noqa: E402

AXES = ("azimuth", "elevation")
PAPER = {("azimuth", "cnn"): ("20%", "3.7%"), ("azimuth", "caps"): ("13.5%", "3.7%"),
         ("elevation", "cnn"): ("17.8%", "4.3%"), ("elevation", "caps"): ("12.3%", "4.3%")}
EVAL_EVERY = {"tiny": 1, "cpu": 50, "full": 100}  # steps between checks of the stop target
COLUMNS = ["axis", "model", "paper_novel_error", "paper_familiar_error", "val_error", "target_val_error",
           "matched", "novel_center_error", "novel_multi_crop_error", "familiar_center_error",
           "familiar_multi_crop_error", "steps", "train_time_s", "hardware", "command"]


def rows() -> list[sweep.Row]:
    out = []
    for axis in AXES:
        split = ["--train-split", f"{axis}-train", "--test-split", f"{axis}-test-familiar"]
        out.append(sweep.Row(f"{axis}-cnn", f"{axis}: CNN", "cnn", split, capsule=False))
        out.append(sweep.Row(f"{axis}-caps", f"{axis}: capsules", "CAPSULE", split))
    return out


def stop_args(row: sweep.Row, opts: argparse.Namespace) -> list[str] | None:
    """The capsule row's stop options from its CNN's validation error (None: CNN not done)."""
    if not row.capsule:
        return []
    cnn = sweep.card(opts.runs, sweep.Row(row.id.replace("-caps", "-cnn"), "", "cnn"))
    if not cnn or cnn.get("status") not in sweep.DONE or cnn.get("val_error") is None:
        return None
    return ["--stop-at-error", f"{cnn['val_error']:.6f}", "--on", "val",
            "--eval-every-steps", str(EVAL_EVERY[opts.budget])]


@torch.no_grad()
def errors(model: torch.nn.Module, split: str, n: int | None) -> dict[str, float]:
    """Centre-crop and multi-crop error of ``model`` on a SynthNORB split (48x48 images)."""
    from robustcaps.data import load_dataset
    from robustcaps.data.transforms import center_crop, multi_crop_scores

    data = load_dataset("synthnorb", split, n_samples=n, crop="none", progress=False)
    capsule = model.robustcaps_meta.get("outputs") == "capsule_logits"
    act = torch.sigmoid if capsule else (lambda s: s.softmax(dim=1))
    wrong = {"center": 0, "multi_crop": 0}
    for i in range(0, len(data), 256):
        x, y = data.x[i:i + 256], data.y[i:i + 256]
        wrong["center"] += int((model(center_crop(x, 32)).argmax(1) != y).sum())
        wrong["multi_crop"] += int((multi_crop_scores(model, x, 32, activation=act).argmax(1) != y).sum())
    return {k: v / len(data) for k, v in wrong.items()}


def viewpoint_errors(row: sweep.Row, opts: argparse.Namespace) -> dict:
    """Novel and familiar test errors of a done row, cached beside its weights."""
    from robustcaps.models.zoo import load_zoo_model

    c = sweep.card(opts.runs, row)
    n = sweep.budget_value(opts.budget, "--max-test-samples")
    cache = opts.runs / row.id / "viewpoints.json"
    key = {"sha256": c["sha256"], "max_test_samples": n}
    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        return json.loads(cache.read_text())
    os.environ["ROBUSTCAPS_ZOO"] = str(opts.runs)  # each run folder is a zoo entry
    model = load_zoo_model(row.id).eval()
    axis = row.id.split("-")[0]
    res = {"key": key, **{kind: errors(model, f"{axis}-test-{kind}", int(n) if n else None)
                          for kind in ("novel", "familiar")}}
    cache.write_text(json.dumps(res, indent=1))
    return res


def table_row(row: sweep.Row, opts: argparse.Namespace) -> dict:
    axis, kind = row.id.split("-")
    c = sweep.card(opts.runs, row) or {}
    novel, familiar = PAPER[(axis, kind)]
    out = {"axis": axis, "model": "CNN" if kind == "cnn" else f"capsules ({opts.capsule})",
           "paper_novel_error": novel, "paper_familiar_error": familiar,
           "val_error": c.get("val_error"), "steps": c.get("steps", ""),
           "train_time_s": c.get("train_time_s", ""), "hardware": c.get("hardware", ""),
           "command": c.get("command", "")}
    if kind == "caps":
        stop = stop_args(row, opts)
        out["target_val_error"] = float(stop[1]) if stop else ""
        out["matched"] = {"stopped": "yes", "finished": "no (budget ended)"}.get(c.get("status"), "not run")
    if c.get("status") in sweep.DONE:
        v = viewpoint_errors(row, opts)
        for split in ("novel", "familiar"):
            for crop in ("center", "multi_crop"):
                out[f"{split}_{crop}_error"] = v[split][crop]
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sweep.add_options(parser, HERE / "runs")
    opts = parser.parse_args(argv)
    selected = sweep.select(rows(), opts.rows)
    if not opts.collect_only:
        for row in selected:  # each axis's CNN comes before its capsule row
            stop = stop_args(row, opts)
            if stop is None:
                print(f"{row.id}: waiting for {row.id.replace('-caps', '-cnn')} to finish")
                continue
            sweep.run_row(row, opts, stop)
    table = [table_row(r, opts) for r in selected]
    notes = (f"Budget `{opts.budget}`: `{' '.join(sweep.BUDGETS[opts.budget])}`, seed {opts.seed}; "
             f"capsules `--model {opts.capsule}`, preset `{' '.join(opts.arch_kw) or '(none)'}`, "
             "stopped at the CNN's familiar-viewpoint validation error (`target`). Paper: smallNORB.")
    sweep.write_table(table, COLUMNS, opts.out or HERE, "Table 2 on SynthNORB", notes)
    return table


if __name__ == "__main__":
    main()
