"""Gradient diagnostics and masking indicators: can a robustness number be trusted?

>>> from robustcaps.diagnostics import run_diagnostics            # doctest: +SKIP
>>> res = run_diagnostics([capsnet, cnn], x, y, out="runs/diag")  # doctest: +SKIP
>>> res.verdicts.pivot(index="id", columns="model", values="verdict")  # doctest: +SKIP

:func:`run_diagnostics` measures, per model, the input gradient of the model's attack loss
(:mod:`.gradients`) and runs the masking indicators (:mod:`.indicators`); with ``out`` it
writes ``gradient_report.md``, ``gradients.json``, ``gradients.csv``, ``verdicts.csv``,
``attack_curves.csv`` and figures (:mod:`.report`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import RobustcapsError
from ..models.adapter import ModelAdapter
from .adaptive import COLUMNS, recommendations, run_adaptive
from .gradients import GradientAnalysis, compare_magnitudes, gradient_statistics, loss_profile
from .indicators import (
    CHECKS,
    DEVIATIONS,
    attack_verdicts,
    curves,
    gradient_verdicts,
    interrupted_rows,
    worst,
)
from .ioaf import graph_interrupted
from .runs import (
    DEFAULT_STEPS,
    AttackConfig,
    AttackRuns,
    add_transfer,
    data_scale,
    default_epsilons,
    run_attacks,
)

__all__ = ["CHECKS", "DEVIATIONS", "DiagnosticsResult", "run_diagnostics"]

log = logging.getLogger(__name__)


@dataclass
class DiagnosticsResult:
    """What :func:`run_diagnostics` measured.

    Attributes:
        stats: one row per model: every gradient statistic (``zero_fraction``,
            ``log10_abs_q50``, ``l1_q50``, ``f64_rel_diff_median``, ...), attack summaries
            and the overall ``verdict``.
        verdicts: one row per (model, check): id, check, group, value, verdict, numbers, rule.
        magnitudes: pairwise orders of magnitude between models' gradients.
        curves: success rate per (model, attack, epsilon) (fgsm, bim, random, transfer:<src>,
            bim-unbounded).
        per_sample: per-sample gradient numbers (model, sample, loss, l1, l2, linf, ...).
        profiles: loss and correctness along the gradient-sign and a random-sign direction.
        config: the parameters used (JSON-ready).
        paths: written files by kind (empty without ``out``).
        recommended: capsule models flagged by C/P4/P6 -> the capsule-aware attacks to run
            next (:mod:`.adaptive`).
        adaptive: what those attacks did when run (``adaptive=True``): model, attack,
            status (``ran`` or why not), epsilon, success_rate.
    """

    stats: pd.DataFrame
    verdicts: pd.DataFrame
    magnitudes: pd.DataFrame
    curves: pd.DataFrame
    per_sample: pd.DataFrame
    profiles: pd.DataFrame
    config: dict[str, Any]
    log10_abs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    paths: dict[str, Path] = field(default_factory=dict)
    recommended: dict[str, list[str]] = field(default_factory=dict)
    adaptive: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=COLUMNS))

    def verdict(self, model: str, check_id: str) -> str:
        """The verdict of one check for one model (``PASS``/``WARN``/``FAIL``/``N/A``)."""
        rows = self.verdicts[(self.verdicts["model"] == model) & (self.verdicts["id"] == check_id)]
        if rows.empty:
            raise RobustcapsError(f"no verdict for model {model!r}, check {check_id!r}")
        return str(rows["verdict"].iloc[0])

    def overall(self) -> dict[str, str]:
        """Worst verdict per model."""
        return {m: worst(g["verdict"].tolist()) for m, g in self.verdicts.groupby("model", sort=False)}

    def verdict_table(self) -> pd.DataFrame:
        """checks x models table of verdicts, in the order of :data:`CHECKS`."""
        t = self.verdicts.pivot(index="id", columns="model", values="verdict")
        order = [c["id"] for c in CHECKS if c["id"] in t.index]
        models = list(dict.fromkeys(self.verdicts["model"]))
        t = t.loc[order, models]
        t.insert(0, "check", [next(c["name"] for c in CHECKS if c["id"] == i) for i in order])
        return t


def _check_inputs(adapters: list[ModelAdapter], x: torch.Tensor, y: torch.Tensor) -> None:
    if not adapters:
        raise RobustcapsError("run_diagnostics: give at least one model")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise RobustcapsError(f"model names must be unique, got {names}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise RobustcapsError("x and y must be torch tensors")
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise RobustcapsError(f"x (N, ...) and y (N,) disagree: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise RobustcapsError(f"diagnostics need at least 2 samples, got {x.shape[0]}")
    for a in adapters:
        if a.input_shape is not None and tuple(x.shape[1:]) != tuple(a.input_shape):
            raise RobustcapsError(
                f"model {a.name!r} takes inputs of shape {a.input_shape}, data has {tuple(x.shape[1:])}"
            )
        if a.num_classes is not None and int(y.max()) >= a.num_classes:
            raise RobustcapsError(
                f"label {int(y.max())} is out of range for a {a.num_classes}-class model "
                f"{a.name!r} (its class count comes from {a.num_classes_from})")


def run_diagnostics(
    adapters: list[ModelAdapter],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    out: str | Path | None = None,
    epsilons: list[float] | tuple[float, ...] | None = None,
    steps: int = DEFAULT_STEPS,
    attacks: bool = True,
    float64: bool = True,
    finite_differences: bool = True,
    n_random: int = 4,
    gamma: int = 20,
    profile_samples: int = 8,
    seed: int = 0,
    batch_size: int | None = None,
    dataset: str | None = None,
    progress: bool = True,
    figures: bool = True,
    adaptive: bool = False,
) -> DiagnosticsResult:
    """Gradient statistics and masking indicators for ``adapters`` on ``x`` (N, *in), ``y`` (N,).

    Args:
        adapters: models to diagnose (unique names); each is measured with its own attack loss.
        out: folder for ``gradient_report.md``, ``gradients.json``/``.csv`` and figures.
        epsilons: L-infinity grid (input space) for the attack indicators; default
            (0.02, 0.05, 0.1, 0.2, 0.5) x the data scale (box width, or the data's std).
        steps: PGD iterations K of the tracked attack (the unbounded PGD uses as many).
        attacks: run the attack-based indicators (A-D, P2-P6); gradient checks always run.
        gamma: random draws per sample of the unstable-predictions indicator (P2).
        float64, finite_differences: the float64 recomputation and derivative checks.
        n_random: random sign perturbations per sample and epsilon (check D).
        profile_samples: samples for the loss-along-gradient profile figure.
        seed: seeds every random draw here (directions, noise).
        dataset: a description of the data for the report.
        progress: a progress bar per model and phase.
        adaptive: run the capsule-aware attacks recommended for flagged capsule networks.
    """
    from tqdm.auto import tqdm

    _check_inputs(adapters, x, y)
    x = x.detach().cpu()
    y = y.detach().cpu().long()
    t0 = time.perf_counter()
    bounds = adapters[0].bounds
    scale = data_scale(x, bounds)
    eps = tuple(epsilons) if epsilons is not None else default_epsilons(scale)
    cfg = AttackConfig(epsilons=eps, steps=steps, unbounded_eps=(bounds[1] - bounds[0]) if bounds
                       else 100.0 * scale, n_random=n_random, noise_scale=scale, gamma=gamma,
                       seed=seed, batch_size=batch_size)
    phases = ["gradients"] + (["attacks"] if attacks else [])
    bar = tqdm(total=len(adapters) * len(phases) + (1 if out else 0), desc="diagnose",
               disable=not progress, leave=False)
    analyses: list[GradientAnalysis] = []
    runs: dict[str, AttackRuns] = {}
    timings: dict[str, float] = {}
    profiles = []
    interrupted: dict[str, list[dict[str, Any]]] = {}
    for a in adapters:
        bar.set_postfix_str(f"{a.name}: gradients")
        t = time.perf_counter()
        broken = graph_interrupted(lambda a=a: a.input_gradient(x[:2], y[:2]))
        if broken is not None:
            interrupted[a.name] = interrupted_rows(a, x, y, cfg, broken)
            bar.update(len(phases))
            continue
        ga = gradient_statistics(a, x, y, batch_size=batch_size, float64=float64,
                                 finite_differences=finite_differences, seed=seed)
        k = min(profile_samples, x.shape[0])
        profiles.append(loss_profile(a, x[:k], y[:k], ga.grad[:k], t_max=max(cfg.epsilons),
                                     seed=seed, batch_size=batch_size))
        analyses.append(ga)
        timings[f"{a.name}/gradients"] = time.perf_counter() - t
        bar.update()
        if attacks:
            t = time.perf_counter()

            def say(msg: str, _name: str = a.name) -> None:
                bar.set_postfix_str(f"{_name}: {msg}")

            runs[a.name] = run_attacks(a, x, y, cfg, log=say)
            timings[f"{a.name}/attacks"] = time.perf_counter() - t
            timings.update({f"{a.name}/attacks/{k}": v for k, v in runs[a.name].timings.items()})
            bar.update()
    if attacks and len(adapters) > 1:
        add_transfer(runs, adapters, x, batch_size)
    magnitudes = compare_magnitudes(analyses)
    rows = []
    stats_rows = []
    for ga in analyses:
        rows += gradient_verdicts(ga, magnitudes if len(analyses) > 1 else None)
        st = dict(ga.summary)
        if ga.model in runs:
            r = runs[ga.model]
            rows += attack_verdicts(r)
            st["eps_ref"] = r.eps_ref
            st["attack_clean_correct"] = int(r.clean_correct.sum())
            st["attack_engine"] = r.engine
        st["seconds"] = sum(v for k, v in timings.items()
                            if k.startswith(ga.model + "/") and k.count("/") == 1)
        stats_rows.append(st)
    for name, extra in interrupted.items():
        rows += extra
        stats_rows.append({"model": name, "n_samples": int(x.shape[0]), "graph_interrupted": True,
                           "clean_accuracy": extra[0]["clean_accuracy"]})
    verdicts = pd.DataFrame(rows).drop(columns=["clean_accuracy"], errors="ignore")
    order = {c["id"]: i for i, c in enumerate(CHECKS)}
    verdicts["_o"] = verdicts["id"].map(order)
    verdicts["_m"] = verdicts["model"].map({a.name: i for i, a in enumerate(adapters)})
    verdicts = verdicts.sort_values(["_m", "_o"]).drop(columns=["_o", "_m"]).reset_index(drop=True)
    stats = pd.DataFrame(stats_rows)
    overall = {m: worst(g["verdict"].tolist()) for m, g in verdicts.groupby("model", sort=False)}
    stats["verdict"] = stats["model"].map(overall)
    per_sample = pd.concat([pd.DataFrame(columns=["model"])]
                           + [ga.per_sample.assign(model=ga.model) for ga in analyses],
                           ignore_index=True)
    per_sample = per_sample[["model"] + [c for c in per_sample.columns if c != "model"]]
    curve_df = (pd.concat([curves(r) for r in runs.values()], ignore_index=True) if runs else
                pd.DataFrame(columns=["model", "attack", "epsilon", "success_rate", "accuracy"]))
    config = {
        "models": [{**a.describe(), "weights": _weights_kind(a)} for a in adapters],
        "n_samples": int(x.shape[0]),
        "input_shape": list(x.shape[1:]),
        "dataset": dataset,
        "data_scale": scale,
        "epsilons": list(cfg.epsilons),
        "steps": cfg.steps,
        "unbounded_eps": cfg.unbounded_eps,
        "step_ratio": 1 / 3,
        "n_random": cfg.n_random,
        "gamma": cfg.gamma,
        "unstable_radius": 8 / 255 * scale,
        "attacks": attacks,
        "float64": float64,
        "finite_differences": finite_differences,
        "adaptive": adaptive,
        "seed": seed,
        "torch": torch.__version__,
        "timings_s": timings,
    }
    recommended = recommendations(verdicts, adapters)
    adaptive_df = pd.DataFrame(columns=COLUMNS)
    if adaptive and recommended:
        bar.set_postfix_str("adaptive attacks")
        adaptive_df = pd.concat([run_adaptive(a, x, y, cfg.epsilons, cfg.steps, batch_size)
                                 for a in adapters if a.name in recommended], ignore_index=True)
    result = DiagnosticsResult(stats, verdicts, magnitudes, curve_df, per_sample,
                               pd.concat(profiles, ignore_index=True) if profiles else pd.DataFrame(),
                               config,
                               {ga.model: ga.log10_abs for ga in analyses},
                               recommended=recommended, adaptive=adaptive_df)
    if out is not None:
        bar.set_postfix_str("report")
        config["seconds_total"] = time.perf_counter() - t0
        result.paths = write_outputs(result, Path(out), figures=figures)
        bar.update()
    bar.close()
    config["seconds_total"] = time.perf_counter() - t0
    return result


def _weights_kind(adapter: ModelAdapter) -> str:
    """``zoo`` (trained checkpoint), ``untrained`` (bare registered architecture) or ``user``."""
    meta = getattr(adapter.model, "robustcaps_meta", None) or {}
    if meta.get("zoo"):
        return "zoo"
    if meta.get("arch") and not meta.get("weights"):
        return "untrained"
    return "user"


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(w) for k, w in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(w) for w in v]
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else str(f)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def write_outputs(result: DiagnosticsResult, out: Path, figures: bool = True) -> dict[str, Path]:
    """Write JSON/CSV tables, figures and the Markdown report into ``out``."""
    from .report import write_figures, write_report

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RobustcapsError(f"cannot create output folder {out}: {exc.strerror}") from None
    paths: dict[str, Path] = {}
    payload = {
        "config": result.config,
        "models": {row["model"]: row for row in result.stats.to_dict(orient="records")},
        "verdicts": result.verdicts.to_dict(orient="records"),
        "magnitudes": result.magnitudes.to_dict(orient="records"),
        "curves": result.curves.to_dict(orient="records"),
        "checks": CHECKS,
    }
    paths["json"] = out / "gradients.json"
    paths["json"].write_text(json.dumps(_jsonable(payload), indent=2))
    paths["csv"] = out / "gradients.csv"
    result.stats.to_csv(paths["csv"], index=False)
    paths["verdicts"] = out / "verdicts.csv"
    result.verdicts.to_csv(paths["verdicts"], index=False)
    paths["curves"] = out / "attack_curves.csv"
    result.curves.to_csv(paths["curves"], index=False)
    paths["per_sample"] = out / "gradient_samples.csv"
    result.per_sample.to_csv(paths["per_sample"], index=False)
    figs = write_figures(result, out) if figures else {}
    paths.update(figs)
    paths["report"] = write_report(result, out, figs)
    return paths
