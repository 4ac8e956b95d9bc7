"""Merge a run directory that processes filled unit by unit (``--shard I/N``, torchrun,
an interrupted run) from the directory alone: no data or model is loaded. Used by
``robustcaps report DIR``; a run with units missing names them and the shards that owe them.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..errors import RobustcapsError
from .distributed import WORKERS, Workers, assign, read_plan, scale_summary
from .run import EvaluationResult, finish
from .store import RunStore


def missing_units(root: str | Path) -> list[str] | None:
    """Keys of the planned units without records (None: the directory holds no plan)."""
    plan = read_plan(Path(root))
    if plan is None:
        return None
    store = RunStore(root)
    return [k for k in plan[0] if not store.has_chunk(k)]


def _shard_counts(root: Path) -> list[int]:
    names = (p.name for p in (root / WORKERS).glob("shard-*-of-*.json"))
    return sorted({int(m.group(1)) for n in names if (m := re.search(r"-of-(\d+)\.json$", n))})


def missing_message(root: str | Path, missing: list[str]) -> str:
    """One line: how many units are missing, which shards owe them, how to finish."""
    root = Path(root)
    keys, costs = read_plan(root)
    lost = set(missing)
    parts = [f"{root} is incomplete: {len(missing)} of {len(keys)} units have no records "
             f"(first: {missing[0]})"]
    for n in _shard_counts(root):
        owing = [f"{i}/{n}" for i, share in enumerate(assign(costs, n))
                 if any(keys[j] in lost for j in share)]
        parts.append(f"shards not finished: {', '.join(owing)}")
    parts.append(f"run them (the missing --shard I/N, or robustcaps evaluate --resume --out "
                 f"{root}) and merge again")
    return "; ".join(parts)


def _launch(root: Path) -> Workers:
    """Who ran the run last: the shards of the largest N, else the latest torchrun launch."""
    counts = _shard_counts(root)
    if counts:
        return Workers(world=counts[-1], mode="shard")
    stats = sorted((root / WORKERS).glob("*-rank*.json"), key=lambda p: p.stat().st_mtime)
    if not stats:
        return Workers()
    last = json.loads(stats[-1].read_text())
    return Workers(world=int(last["worker"].split("/")[1]), mode="torchrun",
                   attempt=last["attempt"])


def merge_run(root: str | Path, *, figures: bool = True) -> EvaluationResult:
    """Records, report, manifest and COMPLETE of a run whose every unit is done."""
    t0, root = time.perf_counter(), Path(root)
    missing = missing_units(root)
    if missing is None:
        raise RobustcapsError(f"{root} holds no plan.json: not a run this version can merge")
    if missing:
        raise RobustcapsError(missing_message(root, missing))
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise RobustcapsError(f"{root} holds no manifest.json")
    manifest = json.loads(manifest_path.read_text())
    store = RunStore(root)
    chunks = [store.load_chunk(k) for k in read_plan(root)[0]]
    launch = _launch(root)
    if launch.mode != "single":
        manifest["scale"] = scale_summary(root, launch)
    return finish(chunks, store, manifest, store.unit_seconds(), t0, figures=figures)
