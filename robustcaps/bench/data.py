"""``robustcaps bench data``: how long SynthNORB takes to generate (budget: 2 minutes on 2 cores).

By default this times the real thing: both splits (48,600 stereo pairs = 97,200 images of
96x96) rendered and written in the official format into a temporary folder (deleted after;
``--out DIR`` keeps the files). ``--fraction F`` renders only that share of the 50 objects
(spread over categories and splits, nothing written) and extrapolates linearly.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

BUDGET_S = 120.0


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def bench_data(fraction: float = 1.0, seed: int = 0, workers: int | None = None,
               out: Path | None = None, progress: bool = True) -> dict:
    """Time SynthNORB generation; returns the figures as a dict (see module docstring)."""
    from ..data import synthnorb
    from ..errors import RobustcapsError

    if not 0.0 < fraction <= 1.0:
        raise RobustcapsError(f"invalid --fraction {fraction}: use a number in (0, 1]")
    n_workers = workers if workers is not None else _cpus()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    tasks = synthnorb.object_tasks()
    full_images = len(tasks) * synthnorb.PAIRS_PER_INSTANCE * 2
    if fraction >= 1.0:
        tmp = None
        folder = out
        if folder is None:
            tmp = tempfile.mkdtemp(prefix="robustcaps-bench-data-")
            folder = Path(tmp)
        try:
            start = time.perf_counter()
            paths = synthnorb.generate(folder, seed=seed, progress=progress, workers=n_workers)
            seconds = time.perf_counter() - start
            nbytes = sum(p.stat().st_size for p in paths)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        measured_images, full_s, written = full_images, seconds, True
    else:
        n = max(1, round(len(tasks) * fraction))
        pick = np.unique(np.linspace(0, len(tasks) - 1, n).round().astype(int))
        sub = [tasks[i] for i in pick]
        start = time.perf_counter()
        for _block in synthnorb.iter_render_objects(sub, seed, n_workers):
            pass
        seconds = time.perf_counter() - start
        measured_images = len(sub) * synthnorb.PAIRS_PER_INSTANCE * 2
        full_s = seconds * full_images / measured_images
        nbytes, written = 0, False
    return {
        "benchmark": "data",
        "dataset": f"synthnorb r{synthnorb.RENDERER_VERSION} seed {seed}",
        "fraction": fraction,
        "extrapolated": fraction < 1.0,
        "files_written": written,
        "bytes_written": nbytes,
        "measured_images": measured_images,
        "measured_seconds": round(seconds, 3),
        "full_images": full_images,
        "full_seconds": round(full_s, 3),
        "images_per_second": round(full_images / full_s, 1),
        "budget_seconds": BUDGET_S,
        "within_budget": bool(full_s <= BUDGET_S),
        "workers": n_workers,
        "cpus": _cpus(),
        "load_average_before": round(load_before, 2),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
