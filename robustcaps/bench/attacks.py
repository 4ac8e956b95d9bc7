"""``robustcaps bench attacks``: native vs torchattacks vs foolbox on identical inputs.

For each model: an FGSM sweep over 11 epsilons and a 10-step BIM sweep, timed for the
native engine (one sweep call) and for torchattacks and foolbox (called once per epsilon,
which is their API), all on the same inputs with the same loss (CE on the scores).
Printed as ratios (library seconds / native seconds) with the mean adversarial accuracy
of each, since a faster attack only counts if it is at least as strong. Targets: FGSM
native >= 3x faster than foolbox; BIM native >= 2x faster than torchattacks at equal or
lower adversarial accuracy. Untrained models (no zoo checkpoint) are flagged: their
numbers say little, since most samples are misclassified before any attack.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

import numpy as np
import torch

EPSILONS = [round(0.05 * i, 10) for i in range(11)]


def _time(fn, repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run_bench(models: list[str], n_samples: int, dataset: str, device: str, seed: int,
              steps: int = 10, repeats: int = 1, progress: bool = True) -> dict[str, Any]:
    """Time the three backends; returns a JSON-friendly dict."""
    from ..attacks import get_attack
    from ..data import load_dataset
    from ..models.loading import load_model
    from ..models.zoo import list_zoo
    from ..utils import resolve_device, seed_everything

    seed_everything(seed)
    dev = resolve_device(device)
    ds = load_dataset(dataset, "test", n_samples=n_samples, seed=seed, progress=progress)
    zoo = list_zoo()
    out: dict[str, Any] = {
        "n_samples": int(ds.x.shape[0]), "dataset": dataset, "epsilons": EPSILONS, "bim_steps": steps,
        "device": str(dev), "torch_threads": torch.get_num_threads(), "models": {},
    }
    for spec in models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = load_model(spec, device=dev, defaults={
                "num_classes": ds.num_classes, "input_shape": tuple(ds.x.shape[1:]), "bounds": ds.bounds})
        x, y = ds.x, ds.y  # the same inputs for every model and backend
        # warm-up (lazy initialisation, allocator)
        get_attack("fgsm").run(adapter, x[:4], y[:4], [0.1])
        row: dict[str, Any] = {"trained": spec in zoo,
                               "clean_accuracy": float((adapter.predict(x).cpu() == y).double().mean())}
        for attack, params in (("fgsm", {}), ("bim", {"steps": steps})):
            for backend in ("native", "torchattacks", "foolbox"):
                atk = get_attack(attack, backend=backend, **params)
                sec, res = _time(lambda a=atk, m=adapter, xx=x, yy=y: a.run(m, xx, yy, EPSILONS), repeats)
                row[f"{attack}_{backend}_s"] = sec
                row[f"{attack}_{backend}_mean_adv_acc"] = float(np.mean(res.accuracy))
                row[f"{attack}_{backend}_adv_acc"] = [round(float(v), 4) for v in res.accuracy]
                if progress:
                    print(f"  {spec:14s} {attack:4s} {backend:12s} {sec:8.2f} s", file=sys.stderr)
            if attack == "bim":
                atk = get_attack("bim", steps=steps, early_stop=False)
                sec, res = _time(lambda a=atk, m=adapter, xx=x, yy=y: a.run(m, xx, yy, EPSILONS), repeats)
                row["bim_native_no_early_stop_s"] = sec
                row["bim_native_no_early_stop_mean_adv_acc"] = float(np.mean(res.accuracy))
        row["fgsm_speedup_vs_foolbox"] = row["fgsm_foolbox_s"] / row["fgsm_native_s"]
        row["fgsm_speedup_vs_torchattacks"] = row["fgsm_torchattacks_s"] / row["fgsm_native_s"]
        row["bim_speedup_vs_torchattacks"] = row["bim_torchattacks_s"] / row["bim_native_s"]
        row["bim_speedup_vs_foolbox"] = row["bim_foolbox_s"] / row["bim_native_s"]
        row["bim_no_early_stop_speedup_vs_torchattacks"] = (row["bim_torchattacks_s"]
                                                            / row["bim_native_no_early_stop_s"])
        row["bim_native_acc_minus_torchattacks_max"] = float(np.max(
            np.array(row["bim_native_adv_acc"]) - np.array(row["bim_torchattacks_adv_acc"])))
        row["fgsm_target_met"] = row["fgsm_speedup_vs_foolbox"] >= 3.0
        row["bim_target_met"] = (row["bim_speedup_vs_torchattacks"] >= 2.0
                                 and row["bim_native_acc_minus_torchattacks_max"] <= 1e-12)
        out["models"][spec] = row
    return out
