"""``evaluate(config)``: validate, data, models, plan, store, run the units, report.

Each unit's records are written atomically to the run directory as soon as it finishes, so
an interrupted run loses at most the unit in flight; a resumed run skips the units whose
chunk exists after checking that the settings have not changed. Only when every unit is
done are ``records.csv.gz``, the summaries, figures and the ``COMPLETE`` marker written.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..attacks.base import AttackResult
from ..attacks.registry import get_attack
from ..attacks.transfer import _check_compatible, evaluate_on
from ..data.coerce import as_dataset, fit_classes
from ..data.datasets import Dataset
from ..errors import ModelRuntimeError, NonFiniteError, RobustcapsError
from ..models.adapter import ModelAdapter
from ..models.resolve import model_spec, resolve_model, state_sha256
from ..utils import atomic_write, resolve_device, seed_everything
from .config import (
    AUTO_COMPONENTS,
    DEFAULT_TRANSFER_SOURCE,
    DEFAULT_TRANSFER_TARGETS,
    EvaluationConfig,
)
from .distributed import (
    MERGE_CLAIM,
    Workers,
    claim,
    clear_claims,
    detect_workers,
    my_units,
    open_run,
    scale_summary,
    unit_cost,
    write_plan,
    write_stats,
)
from .plan import TransferUnit, Unit, WhiteBoxUnit, plan_units, safe_name, skip_reason
from .records import concat_records, eps_units, read_records, records_from
from .seeding import attack_params, unit_seed
from .store import RunStore, now

logger = logging.getLogger(__name__)  # -v: what was loaded and each unit as it finishes


@dataclass
class EvaluationResult:
    """What :func:`evaluate` returns.

    ``records``: one row per sample x model x attack x backend x target x epsilon
    (columns :data:`~robustcaps.evaluation.records.RECORD_COLUMNS`); ``summary`` /
    ``per_target``: aggregations; ``disagreement``: largest backend difference (pp);
    ``paths``: written files by name (empty without ``out``); ``table``: console text;
    ``complete``: False for a process that ran a share and did not merge (its records only).
    """

    records: pd.DataFrame
    summary: pd.DataFrame
    per_target: pd.DataFrame
    disagreement: pd.DataFrame
    paths: dict[str, Path] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    table: str = ""
    complete: bool = True  # False: one process's share of a run on several processes


class RunLog:
    """Messages for the user (``echo``) and the warnings a run met, each once."""

    def __init__(self, echo: Callable[[str], None] | None) -> None:
        self.say = echo or (lambda _msg: None)
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            self.say(f"Warning: {message}")


@dataclass
class Models:
    """The loaded models: white-box ones, and the transfer source with its targets (the
    source first: the white-box diagonal of the transfer matrix)."""

    white: list[ModelAdapter]
    source: ModelAdapter | None = None
    targets: list[ModelAdapter] = field(default_factory=list)

    @property
    def all(self) -> list[ModelAdapter]:
        return self.white + self.targets


@dataclass
class UnitContext:
    """What every unit of a run shares."""

    data: Dataset
    epsilons: np.ndarray
    eps_units: str
    params: dict[str, Any]
    store: RunStore
    n_examples: int
    examples_backend: str
    seed: int = 0
    progress: bool = False
    figures: bool = True


# --------------------------------------------------------------------------- evaluate
def evaluate(config: EvaluationConfig, *, echo: Callable[[str], None] | None = None,
             command: str | None = None, workers: Workers | None = None) -> EvaluationResult:
    """Run the white-box and/or transfer sweeps ``config`` describes; see
    :func:`robustcaps.evaluate` for the keyword form. ``echo`` prints progress messages,
    ``command`` is the command line stored in the manifest, ``workers`` this process's place
    in a run on several processes (default: the torchrun group the environment names)."""
    t_start = time.perf_counter()
    workers = workers or detect_workers(config.run.device)
    config = _for_workers(config, workers)
    log, out = RunLog(echo), config.output
    seed_everything(config.run.seed)
    data, n_samples = load_data(config, log)
    models = load_models(config, data, log)
    data = fit_data(data, models)
    identity = run_identity(config, data, models, n_samples)
    manifest = start_manifest(config, data, models, identity, log, command)
    transfer = None if models.source is None else (
        config.transfer.transfer_attack, models.source, models.targets)
    _warn_skipped(config, models, log)
    units = plan_units(attacks=config.white_box, backends=config.threat.backend,
                       modes=config.threat.targeted.flags, models=models.white,
                       n=len(data), batch_size=config.batch_size, transfer=transfer)
    costs = [unit_cost(u, data.num_classes, config.threat.steps) for u in units]
    store = RunStore(out.out, workers.writer)
    open_run(store, identity, out.resume, workers,
             lambda: _setup(store, manifest, units, costs, workers))
    if store.complete:
        log.say(f"{store.root} is already complete: nothing to resume "
                f"(robustcaps report {store.root} rebuilds its tables and figures)")
        return stored_result(store)
    if store:
        log.say(f"run directory: {store.root}")
    ctx = UnitContext(data, np.asarray(config.threat.epsilons, dtype=np.float64),
                      identity["eps_units"], _attack_params(config), store, out.n_examples,
                      config.threat.backend[0], config.run.seed, out.progress, out.figures)
    try:
        return _run(units, costs, ctx, log, workers, manifest, t_start)
    except RobustcapsError as exc:  # the manifest says why the run has no results
        store.write_manifest({**manifest, "status": "failed", "error": str(exc)})
        raise


def _run(units: list[Unit], costs: list[float], ctx: UnitContext, log: RunLog,
         workers: Workers, manifest: dict[str, Any], t_start: float) -> EvaluationResult:
    if workers.mode == "single":
        records, timings = run_units(units, ctx, log, progress=ctx.progress)
        return finish(records, ctx.store, manifest, timings, t_start, figures=ctx.figures)
    return run_shared(units, costs, ctx, log, workers, manifest, t_start)


def _for_workers(config: EvaluationConfig, workers: Workers) -> EvaluationConfig:
    """Check the output settings; each torchrun rank on its own GPU."""
    out = config.output
    if out.resume and out.out is None:
        raise RobustcapsError("resume needs the run directory to continue (--out DIR)")
    if workers.mode != "single" and out.out is None:
        raise RobustcapsError("a run on several processes shares its run directory: give --out DIR")
    device = workers.device(config.run.device)
    return config if device == config.run.device else config.replace(device=device)


def _setup(store: RunStore, manifest: dict[str, Any], units: list[Unit], costs: list[float],
           workers: Workers) -> None:
    """What the first process writes before the others start: manifest, plan; and, for a
    new launch, no claims left from a launch that died."""
    if not store:
        return
    manifest.update(store.keep_history(manifest))  # a resume keeps the first command
    store.write_manifest(manifest)
    write_plan(store, units, costs)
    if workers.mode != "shard":
        clear_claims(store)


def _warn_skipped(config: EvaluationConfig, models: Models, log: RunLog) -> None:
    """Say which (attack, backend, model) combinations the plan leaves out, and why."""
    for a in config.white_box:
        for bk in config.threat.backend:
            for m in models.white:
                reason = skip_reason(a, bk, m)
                if reason is not None:
                    log.warn(f"skipped: {reason}")


def _attack_params(config: EvaluationConfig) -> dict[str, Any]:
    """Settings for every attack (each drops those it does not take; None: its default)."""
    t = config.threat
    given = {"steps": t.steps, "step_size": t.step_size, "components": t.components}
    return {**{k: v for k, v in given.items() if v is not None},
            "early_stop": t.early_stop, "batch_size": config.batch_size}




# --------------------------------------------------------------------------- data
def load_data(config: EvaluationConfig, log: RunLog) -> tuple[Dataset, int]:
    """The samples to attack and the run's sample count (the default one when none was
    given: all there is when the dataset holds fewer)."""
    sel = config.data
    n = sel.n_samples if sel.n_samples is not None else config.default_n_samples()

    def load(count: int | None) -> Dataset:
        return as_dataset(sel.dataset, sel.split, n_samples=count, seed=config.run.seed,
                          data_dir=sel.data_dir, progress=config.output.progress)

    try:
        data = load(n)
    except RobustcapsError as exc:
        if sel.n_samples is not None or "exceeds" not in str(exc):
            raise
        data = load(None)
    if sel.n_samples is None:
        n = len(data)
        modes = "+".join("targeted" if t else "untargeted" for t in config.threat.targeted.flags)
        log.say(f"n-samples: {n} (default for attack {'+'.join(config.threat.attack)}, "
                f"{modes}; change with --n-samples)")
    if len(data) == 0:
        raise RobustcapsError("the dataset selection is empty")
    return data, n


# --------------------------------------------------------------------------- models
def load_models(config: EvaluationConfig, data: Dataset, log: RunLog) -> Models:
    """Resolve every model once (white-box and transfer share them) and check them
    against the data and each other."""
    options: dict[str, Any] = {"device": config.run.device}
    if config.threat.loss is not None:  # else each model keeps its own (a request's option)
        options["loss"] = config.threat.loss
    defaults = data.model_defaults()
    loaded: dict[str, ModelAdapter] = {}

    def get(m: Any) -> ModelAdapter:
        spec = model_spec(m)
        key = None if spec is None else json.dumps(spec, sort_keys=True)
        if key is None or key not in loaded:
            adapter = _resolve(m, defaults, options, log)
            if key is None:
                return adapter
            loaded[key] = adapter
        return loaded[key]

    models = Models([get(m) for m in config.models])
    names = [a.name for a in models.white]
    if len(set(names)) != len(names):
        raise RobustcapsError(f"model names must be unique, got {names}")
    if "transfer" in config.threat.attack:
        _load_transfer(config, models, get)
    for a in models.all:
        _check_model_shape(a, data)
    return models


def fit_data(data: Dataset, models: Models) -> Dataset:
    """The data with the models' class count (labels alone give only a lower bound)."""
    for a in models.all:
        data = fit_classes(data, a.num_classes, a.name, a.num_classes_from)
    logger.info("data: %s (%s), %d samples, %d classes (from %s), fingerprint %s", data.name,
                data.split, len(data), data.num_classes, data.classes_from, data.fingerprint)
    logger.info("models: %s", "; ".join(repr(a) for a in models.all))
    return data


def _resolve(m: Any, defaults: dict[str, Any], options: dict[str, Any],
             log: RunLog) -> ModelAdapter:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = resolve_model(m, defaults=defaults, **options)
    for w in caught:
        log.warn(f"{w.message}")
    return adapter


def _load_transfer(config: EvaluationConfig, models: Models,
                   get: Callable[[Any], ModelAdapter]) -> None:
    tr = config.transfer
    source = get(tr.source if tr.source is not None else DEFAULT_TRANSFER_SOURCE)
    specs = list(tr.transfer_targets) if tr.transfer_targets else default_transfer_targets()
    targets = [source] + [t for t in map(get, specs) if t.name != source.name]
    if len({t.name for t in targets}) != len(targets):
        raise RobustcapsError(f"transfer target names must be unique, got {[t.name for t in targets]}")
    for t in targets:
        _check_compatible(source, t)
    models.source, models.targets = source, targets


def default_transfer_targets() -> list[str]:
    """The zoo's default transfer targets, else the architectures of those names."""
    from ..models.registry import architectures
    from ..models.zoo import list_zoo

    found = [t for t in DEFAULT_TRANSFER_TARGETS if t in list_zoo()]
    return found or [t for t in DEFAULT_TRANSFER_TARGETS if t in architectures()]


def _check_model_shape(a: ModelAdapter, data: Dataset) -> None:
    shape = tuple(data.x.shape[1:])
    if a.input_shape is not None and tuple(a.input_shape) != shape:
        raise RobustcapsError(
            f"model {a.name!r} takes inputs of shape {tuple(a.input_shape)} but dataset "
            f"{data.name!r} has {shape}")


# --------------------------------------------------------------------------- provenance
def run_identity(config: EvaluationConfig, data: Dataset, models: Models,
                 n_samples: int) -> dict[str, Any]:
    """What must match for a resume (``config.json``): settings as used, the data's
    fingerprint and the models' weights."""
    t = config.threat

    def model_id(a: ModelAdapter) -> dict[str, Any]:
        return {"name": a.name, "state_sha256": state_sha256(a.model), "loss": a.loss_name,
                "bounds": list(a.bounds) if a.bounds else None}

    from ..attacks.native import BIM_TRAVEL

    return {
        "attacks": list(t.attack), "modes": ["targeted" if m else "untargeted" for m in t.targeted.flags],
        "backends": list(t.backend), "epsilons": list(t.epsilons), "eps_units": eps_units(data.bounds),
        "steps": t.steps, "step_size": t.step_size,
        "step_size_rule": "step_size" if t.step_size is not None else f"{BIM_TRAVEL} * eps / steps",
        "early_stop": t.early_stop, "loss": t.loss, "n_samples": int(n_samples),
        **({"auto_components": list(t.components or AUTO_COMPONENTS)} if "auto" in t.attack else {}),
        "batch_size": config.batch_size, "seed": config.run.seed,
        "dataset": {"name": data.name, "split": config.data.split, "n": len(data),
                    "fingerprint": data.fingerprint},
        "models": [model_id(a) for a in models.white],
        "transfer": None if models.source is None else {
            "source": models.source.name, "attack": config.transfer.transfer_attack,
            "targets": [model_id(a) for a in models.targets]},
    }


def start_manifest(config: EvaluationConfig, data: Dataset, models: Models,
                   identity: dict[str, Any], log: RunLog, command: str | None) -> dict[str, Any]:
    """The manifest of a running run (completed by :func:`finish`)."""
    device = resolve_device(config.run.device)
    return {
        "robustcaps_run": 1, "status": "running", "command": command, "started": now(),
        "config": identity, "versions": _versions(), "device": _device_info(device),
        "seed": config.run.seed,
        "data": {"name": data.name, "split": config.data.split, "n": len(data),
                 "fingerprint": data.fingerprint, "num_classes": data.num_classes,
                 "class_names": data.class_names,
                 "bounds": list(data.bounds) if data.bounds else None,
                 "eps_units": identity["eps_units"]},
        "models": {a.name: _model_manifest(a) for a in models.all},
        "warnings": log.warnings,
        "invocation": config.to_manifest(),
    }


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("robustcaps", "torch", "numpy", "pandas", "foolbox", "torchattacks", "eagerpy",
                "seaborn", "matplotlib", "scipy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _model_manifest(a: ModelAdapter) -> dict[str, Any]:
    meta = dict(getattr(a.model, "robustcaps_meta", {}) or {})
    d = a.describe()
    d["checkpoint_sha256"] = meta.get("sha256")
    d["state_sha256"] = state_sha256(a.model)
    d["zoo"] = bool(meta.get("zoo", False))
    d["arch"] = meta.get("arch")
    return d


# --------------------------------------------------------------------------- units
def run_units(units: list[Unit], ctx: UnitContext, log: RunLog, *,
              progress: bool) -> tuple[list[pd.DataFrame], dict[str, float]]:
    """Every unit's records (stored ones read back, the others run and stored) and the
    seconds each took."""
    from tqdm.auto import tqdm

    chunks: list[pd.DataFrame] = []
    timings = ctx.store.unit_seconds()
    skipped = 0
    # at -v the per-unit log lines replace the bar (they would garble each other)
    bar = tqdm(units, desc="evaluate", unit="unit", leave=False,
               disable=not progress or logger.isEnabledFor(logging.INFO))
    for unit in bar:
        df = ctx.store.load_chunk(unit.key)
        if df is None:
            bar.set_postfix_str(unit.key.split("__b")[0], refresh=False)
            t0 = time.perf_counter()
            df = run_unit(unit, ctx)
            timings[unit.key] = time.perf_counter() - t0
            df = ctx.store.save_chunk(unit.key, df, timings[unit.key])
            logger.info("unit %s: %d records in %.2f s", unit.key, len(df), timings[unit.key])
        else:
            skipped += 1
        chunks.append(df)
    bar.close()
    if skipped:
        log.say(f"resume: {skipped} of {len(units)} units were already done")
    return chunks, timings


def run_shared(units: list[Unit], costs: list[float], ctx: UnitContext, log: RunLog,
               workers: Workers, manifest: dict[str, Any], t_start: float) -> EvaluationResult:
    """Run this process's share; then the process that merges (rank 0, or the shard that
    finds every unit done) writes the records and report of the whole run."""
    from tqdm.auto import tqdm

    t0, ran, frames = time.perf_counter(), {}, []
    todo = tqdm(my_units(units, costs, ctx.store, workers), desc=f"evaluate ({workers.label})",
                unit="unit", disable=not (ctx.progress and workers.rank == 0), leave=False)
    for unit in todo:
        t = time.perf_counter()
        df = run_unit(unit, ctx)
        ran[unit.key] = time.perf_counter() - t
        frames.append(ctx.store.save_chunk(unit.key, df, ran[unit.key]))
        logger.info("%s: unit %s: %d records in %.2f s", workers.label, unit.key, len(df),
                    ran[unit.key])
    write_stats(ctx.store, workers, ran, time.perf_counter() - t0)
    log.say(f"{workers.label}: {len(ran)} units in {time.perf_counter() - t0:.1f} s")
    workers.barrier()
    merges = workers.main or (workers.mode == "shard" and _all_done(units, ctx.store)
                              and claim(ctx.store.root / MERGE_CLAIM, workers))
    result = _merge(units, ctx, manifest, workers, t_start) if merges else EvaluationResult(
        concat_records(frames), *(pd.DataFrame(),) * 3, complete=False)
    workers.barrier()  # every rank returns once the merged run is on disk
    return result


def _all_done(units: list[Unit], store: RunStore) -> bool:
    return all(store.has_chunk(u.key) for u in units)


def _merge(units: list[Unit], ctx: UnitContext, manifest: dict[str, Any], workers: Workers,
           t_start: float) -> EvaluationResult:
    """The whole run from every unit's chunk, in plan order (as a single process has it)."""
    missing = [u.key for u in units if not ctx.store.has_chunk(u.key)]
    if missing:
        raise RobustcapsError(f"{len(missing)} units have no records after every rank finished "
                              f"(first: {missing[0]}); continue with --resume")
    chunks = [ctx.store.load_chunk(u.key) for u in units]
    manifest["scale"] = scale_summary(ctx.store.root, workers)
    return finish(chunks, ctx.store, manifest, ctx.store.unit_seconds(), t_start,
                  figures=ctx.figures)


def run_unit(unit: Unit, ctx: UnitContext) -> pd.DataFrame:
    """One unit's records, or a one-line error when a model raises or returns NaN/Inf
    scores or gradients (a non-finite score would count as prediction 0: never counted)."""
    models = [unit.model] if isinstance(unit, WhiteBoxUnit) else [unit.source, *unit.targets]
    saved = [a.check_finite for a in models]
    try:
        for a in models:
            a.check_finite = True
        return _attack_unit(unit, ctx)
    except (NonFiniteError, ModelRuntimeError) as exc:
        kind = NonFiniteError if isinstance(exc, NonFiniteError) else RobustcapsError
        raise kind(f"{exc} during attack {unit.attack} (unit {unit.key}); the run stopped "
                   "and counted nothing of this unit") from exc
    finally:
        for a, flag in zip(models, saved, strict=True):
            a.check_finite = flag


def _attack_unit(unit: Unit, ctx: UnitContext) -> pd.DataFrame:
    """One unit's records (targeted units attack every sample towards each wrong class)."""
    seed_everything(unit_seed(ctx.seed, unit.key))  # for code drawing from the global RNGs
    pos = unit.positions
    x, y, samples = ctx.data.x[pos], ctx.data.y[pos], ctx.data.meta["index"][pos]
    targets = None
    if unit.targeted:
        x, y, targets, rows = expand_targets(x, y, ctx.data.num_classes)
        samples = samples[rows]
    if isinstance(unit, TransferUnit):
        return _run_transfer(unit, ctx, x, y, targets, samples)
    return _run_white_box(unit, ctx, x, y, targets, samples)


def _run_white_box(unit: WhiteBoxUnit, ctx: UnitContext, x: torch.Tensor, y: torch.Tensor,
                   targets: torch.Tensor | None, samples: np.ndarray) -> pd.DataFrame:
    keep = (unit.batch == 0 and not unit.targeted and unit.backend == ctx.examples_backend)
    attack = get_attack(unit.attack, backend=unit.backend, **_unit_params(unit, ctx))
    res = attack.run(unit.model, x, y, ctx.epsilons, targets=targets, return_adv=keep)
    path = ctx.store.examples_path(f"{unit.attack}__{safe_name(unit.model.name)}")
    if keep and path is not None and ctx.n_examples > 0:
        save_examples(path, res, x, unit.model.name, unit.attack, ctx.n_examples)
    return records_from(res, model=unit.model.name, attack=unit.attack, backend=unit.backend,
                        source="", samples=samples, units=ctx.eps_units)


def _run_transfer(unit: TransferUnit, ctx: UnitContext, x: torch.Tensor, y: torch.Tensor,
                  targets: torch.Tensor | None, samples: np.ndarray) -> pd.DataFrame:
    """Craft once on the source, evaluate every target on the same inputs."""
    crafter = get_attack(unit.attack, backend=unit.backend, **_unit_params(unit, ctx))
    crafted = crafter.run(unit.source, x, y, ctx.epsilons, targets=targets, return_adv=True)
    name = unit.source.name
    frames = [records_from(evaluate_on(t, crafted, x.cpu(), name, ctx.params["batch_size"]),
                           model=t.name, attack=f"transfer-{unit.attack}",
                           backend=f"transfer:{name}", source=name, samples=samples,
                           units=ctx.eps_units)
              for t in unit.targets]
    return pd.concat(frames, ignore_index=True)


def _unit_params(unit: Unit, ctx: UnitContext) -> dict[str, Any]:
    """The attack's parameters, with the unit's own seed for an attack that takes one."""
    return attack_params(unit.attack, unit.backend, ctx.params, unit_seed(ctx.seed, unit.key))


def expand_targets(x: torch.Tensor, y: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Every sample towards every wrong class: x (N*(K-1), ...), y, targets, row -> sample."""
    offsets = torch.arange(1, k)  # target = (y + offset) mod K covers the K-1 wrong classes
    t, _ = ((y[:, None] + offsets[None]) % k).sort(dim=1)  # by target class within a sample
    rows = np.repeat(np.arange(y.shape[0]), k - 1)
    return x[rows], y[rows], t.reshape(-1), rows


def save_examples(path: Path, res: AttackResult, x: torch.Tensor, model: str, attack: str,
                  n: int) -> None:
    n = min(n, x.shape[0])
    atomic_write(path, lambda p: np.savez_compressed(
        p, x=x[:n].cpu().float().numpy(), x_adv=res.x_adv[:, :n].float().numpy(),
        epsilons=res.epsilons, label=res.y[:n].numpy(), clean_pred=res.clean_pred[:n].numpy(),
        adv_pred=res.adv_pred[:, :n].numpy(), model=np.str_(model), attack=np.str_(attack),
    ), suffix=".part.npz")


# --------------------------------------------------------------------------- finish
def stored_result(store: RunStore) -> EvaluationResult:
    """A complete run's result read back from its directory (nothing is rewritten)."""
    from ..report.tables import backend_disagreement, console_table, summarize

    records = read_records(store.root / "records.csv.gz")
    summary, per_target = summarize(records)
    names = ("records.csv.gz", "summary.csv", "summary_per_target.csv", "manifest.json")
    paths = {n.split(".")[0]: store.root / n for n in names if (store.root / n).is_file()}
    return EvaluationResult(records, summary, per_target, backend_disagreement(summary),
                            paths=paths, manifest=json.loads(paths["manifest"].read_text()),
                            table=console_table(summary))


def finish(chunks: list[pd.DataFrame], store: RunStore, manifest: dict[str, Any],
           timings: dict[str, float], t_start: float, *, figures: bool) -> EvaluationResult:
    """Records, tables and (with a run directory) the report, manifest and COMPLETE marker."""
    from ..report import build_report
    from ..report.tables import backend_disagreement, console_table, summarize

    records = concat_records(chunks)
    if not store:
        summary, per_target = summarize(records)
        disagreement = backend_disagreement(summary)
        return EvaluationResult(records, summary, per_target, disagreement,
                                table=console_table(summary))
    paths = {"records": store.write_records(records)}
    manifest["timings"] = {"units_seconds": timings,
                           "total_seconds_this_invocation": time.perf_counter() - t_start}
    manifest["n_records"] = len(records)
    report = build_report(store.root, records=records, figures=figures, manifest=manifest)
    paths.update(report)
    manifest["backend_disagreement_pp"] = (
        None if report.disagreement.empty else float(report.disagreement["max_abs_diff_pp"].max()))
    manifest.update(status="complete", finished=now())
    manifest["timings"]["total_seconds_this_invocation"] = time.perf_counter() - t_start
    paths["manifest"] = store.write_manifest(manifest)
    paths["complete"] = store.mark_complete()
    return EvaluationResult(records, report.summary, report.per_target, report.disagreement,
                            paths=paths, manifest=manifest, table=report.table)
