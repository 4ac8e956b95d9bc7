"""Evaluation orchestration: models x attacks x backends x modes x batches -> records.

:func:`evaluate` is what ``robustcaps evaluate`` calls. Work is split into *units*
(one model, attack, backend, targeted flag and batch of samples; for transfer: one
source, crafting attack, targeted flag and batch, evaluated on every target). Each unit's
records are written atomically to ``chunks/<unit>.csv.gz`` as soon as it finishes, so an
interrupted run loses at most the unit in flight; ``resume=True`` skips units whose chunk
exists and checks that the settings have not changed. Only when every unit is done are
``records.csv.gz``, the summaries, figures and the ``COMPLETE`` marker written.

Epsilons are L-infinity sizes in the model's input space: per-image standardised units for
the paper's NORB inputs (no box), [0, 1] units for MNIST/npz images.

Defaults (documented in the README):

- epsilon grid ``0:0.5:0.05`` (11 values). The paper's Fig. 3 spans epsilon up to 0.5 on
  per-image standardised images (its text quotes 0.2, Fig. B.3 shows 0.1 and 0.4); a
  standardised image has unit per-image standard deviation, so 0.5 is half of it.
- BIM: 10 steps of ``1.25 * eps / steps`` (see :mod:`robustcaps.attacks.native`), early
  stopping per sample on.
- loss: the adapter's (``ce``: softmax cross-entropy on the scores, for capsule networks
  on the logits of the class activations; ``spread`` is available, but saturates to a zero
  gradient once all margins hold, which masks gradients rather than measures robustness).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import RobustcapsError
from ..models.adapter import LOSSES, ModelAdapter, adapt
from ..report import COMPLETE_MARKER, build_report
from ..report.tables import RECORD_COLUMNS, normalise_records
from ..utils import resolve_device, seed_everything
from . import ATTACKS, BACKENDS, get_attack
from .base import AttackResult
from .native import BIM_DEFAULT_STEPS, BIM_TRAVEL, check_epsilons
from .transfer import _check_compatible, evaluate_on

DEFAULT_EPSILONS: tuple[float, ...] = tuple(round(0.05 * i, 10) for i in range(11))
#: samples per run when --n-samples is not given, sized so that the default run (zoo
#: capsnet-small + cnn, 11 epsilons) stays within ~3 minutes on 2 CPU cores: capsnet-small
#: dominates at roughly 0.025 s per sample for a forward+backward pass there (measured: the
#: default BIM run 17 s, targeted BIM 58 s, with the zoo models). FGSM costs
#: 1 fwd+bwd + 10 fwd per sample, BIM up to 10 x 10 fwd+bwd (fewer with early stopping),
#: targeted runs attack K-1 = 4 (sample, target) pairs per sample.
DEFAULT_N_SAMPLES = {"fgsm": 500, "bim": 200, "transfer": 500}
DEFAULT_TARGETED_N_SAMPLES = {"fgsm": 100, "bim": 40, "transfer": 100}
DEFAULT_BATCH_SIZE = 100
DEFAULT_MODELS = ("capsnet-small", "cnn")
DEFAULT_TRANSFER_SOURCE = "cnn"
DEFAULT_TRANSFER_TARGETS = ("capsnet-small", "cnn-b")
ALL_ATTACKS = ("fgsm", "bim", "transfer")
MODES = ("untargeted", "targeted", "both")


# --------------------------------------------------------------------------- parsing
def parse_epsilons(text: str) -> list[float]:
    """``"0,0.05,0.1"`` -> [0.0, 0.05, 0.1]; raises RobustcapsError naming the bad item."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise RobustcapsError("--epsilons: give a comma-separated list such as 0,0.05,0.1")
    values = []
    for t in items:
        try:
            values.append(float(t))
        except ValueError:
            raise RobustcapsError(f"--epsilons: {t!r} is not a number") from None
    return check_epsilons(values).tolist()


def parse_eps_range(text: str) -> list[float]:
    """``"START:STOP:STEP"`` (STOP included) -> list, e.g. ``0:0.5:0.05`` gives 11 values."""
    parts = str(text).split(":")
    if len(parts) != 3:
        raise RobustcapsError(f"--eps-range: expected START:STOP:STEP, got {text!r}")
    try:
        start, stop, step = (float(p) for p in parts)
    except ValueError:
        raise RobustcapsError(f"--eps-range: expected numbers in START:STOP:STEP, got {text!r}") from None
    if not step > 0 or not stop >= start:
        raise RobustcapsError(f"--eps-range: need STEP > 0 and STOP >= START, got {text!r}")
    n = int(np.floor((stop - start) / step + 1e-9)) + 1
    if n > 1000:
        raise RobustcapsError(f"--eps-range: {n} epsilons is too many (at most 1000)")
    return check_epsilons([round(start + i * step, 10) for i in range(n)]).tolist()


def eps_units(bounds: tuple[float, float] | None) -> str:
    """Human-readable epsilon units for outputs."""
    if bounds is None:
        return "L-inf, per-image standardised input units"
    return f"L-inf, input units in [{bounds[0]:g}, {bounds[1]:g}]"


def _mode_flags(targeted: bool | str) -> list[bool]:
    if isinstance(targeted, bool):
        return [targeted]
    mode = str(targeted).strip().lower()
    if mode not in MODES:
        raise RobustcapsError(f"unknown mode {targeted!r}; use one of {', '.join(MODES)}")
    return {"untargeted": [False], "targeted": [True], "both": [False, True]}[mode]


def _as_list(value: str | Sequence[str], known: Sequence[str], what: str,
             all_value: Sequence[str]) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        item = str(item).strip().lower()
        expanded = list(all_value) if item == "all" else [item]
        for v in expanded:
            if v not in known:
                raise RobustcapsError(f"unknown {what} {item!r}; known: {', '.join(known)}, all")
            if v not in out:
                out.append(v)
    if not out:
        raise RobustcapsError(f"no {what} given")
    return out


# --------------------------------------------------------------------------- data
@dataclass
class _Data:
    x: torch.Tensor
    y: torch.Tensor
    index: np.ndarray
    name: str
    num_classes: int
    class_names: list[str]
    bounds: tuple[float, float] | None
    fingerprint: str
    split: str


def _load_data(dataset: Any, split: str, n_samples: int, seed: int, data_dir: Any,
               progress: bool) -> _Data:
    if isinstance(dataset, str):
        try:
            from ..data import load_dataset
        except ImportError:
            raise RobustcapsError(
                "dataset loading (robustcaps.data.load_dataset) is not available in this version"
            ) from None
        ds = load_dataset(dataset, split, data_dir=data_dir, n_samples=n_samples, seed=seed,
                          progress=progress)
    elif isinstance(dataset, tuple) and len(dataset) == 2:
        from ..utils import tensor_fingerprint

        x, y = dataset
        x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
        if n_samples is not None:
            x, y = x[:n_samples], y[:n_samples]  # the first n (tensors carry no strata)
        k = int(y.max()) + 1 if y.numel() else 0
        ds = type("Tensors", (), {})()
        ds.x, ds.y, ds.meta, ds.name, ds.num_classes = x, y, {}, "tensors", k
        ds.class_names, ds.bounds = [str(i) for i in range(k)], None
        ds.fingerprint = tensor_fingerprint(x, y)
    else:
        ds = dataset  # a Dataset-like object
    x, y = ds.x, ds.y
    if n_samples is not None and x.shape[0] > n_samples:
        x, y = x[:n_samples], y[:n_samples]
    meta = getattr(ds, "meta", {}) or {}
    index = np.asarray(meta.get("index", np.arange(len(ds.y))))[: x.shape[0]]
    num_classes = int(getattr(ds, "num_classes", int(y.max()) + 1))
    names = list(getattr(ds, "class_names", None) or [str(i) for i in range(num_classes)])
    bounds = getattr(ds, "bounds", None)
    return _Data(x=x, y=y, index=index, name=str(getattr(ds, "name", "dataset")),
                 num_classes=num_classes, class_names=names,
                 bounds=None if bounds is None else (float(bounds[0]), float(bounds[1])),
                 fingerprint=str(getattr(ds, "fingerprint", "")), split=split)


# --------------------------------------------------------------------------- models
def state_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _resolve_model(m: Any, options: dict[str, Any], defaults: dict[str, Any],
                   warn: Callable[[str], None]) -> ModelAdapter:
    """Spec / ModelRequest / suite table / nn.Module / ModelAdapter -> ModelAdapter.

    ``options``: device and loss; ``defaults``: the dataset's num_classes, input_shape and
    bounds, used where neither the user nor the model sets them.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if isinstance(m, ModelAdapter):
            adapter = m
            if options.get("loss") and options["loss"] != adapter.loss_name:
                adapter = copy.copy(adapter)  # same module, another attack loss
                adapter.loss_name = options["loss"]
        elif isinstance(m, torch.nn.Module):
            meta = dict(getattr(m, "robustcaps_meta", {}) or {})
            extra = {k: v for k, v in defaults.items() if meta.get(k) is None}
            adapter = adapt(m, **{**extra, **options})
        elif isinstance(m, str):
            from ..models.loading import load_model

            adapter = load_model(m, defaults=defaults, **options)
        elif isinstance(m, dict):  # a suite/manifest table {spec = ..., <adapter options>}
            from ..commands._model_options import ModelRequest

            adapter = ModelRequest.from_mapping(m).load(defaults=defaults, **options)
        elif hasattr(m, "load"):  # a ModelRequest from the CLI
            adapter = m.load(defaults=defaults, **options)
        else:
            raise RobustcapsError(f"cannot use {m!r} as a model")
    for w in caught:
        warn(f"{w.message}")
    return adapter


def model_spec(m: Any) -> Any:
    """JSON form of a model argument (None when it is a Python object)."""
    if isinstance(m, str):
        return m
    if isinstance(m, dict):
        return m
    spec = getattr(m, "spec", None)
    if isinstance(spec, str):
        opts = {k: list(v) if isinstance(v, tuple) else v
                for k, v in (getattr(m, "options", {}) or {}).items()}
        return {"spec": spec, **opts} if opts else spec
    return None


@dataclass
class EvaluationResult:
    """What :func:`evaluate` returns.

    ``records``: one row per sample x model x attack x backend x target x epsilon
    (columns :data:`~robustcaps.report.tables.RECORD_COLUMNS`); ``summary`` /
    ``per_target``: aggregations; ``disagreement``: largest backend difference (pp);
    ``paths``: written files by name (empty without ``out``); ``table``: console text.
    """

    records: pd.DataFrame
    summary: pd.DataFrame
    per_target: pd.DataFrame
    disagreement: pd.DataFrame
    paths: dict[str, Path] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    table: str = ""


@dataclass
class _Unit:
    key: str
    kind: str  # "white" | "transfer"
    attack: str
    backend: str
    targeted: bool
    batch: int
    positions: np.ndarray
    model: ModelAdapter | None = None
    source: ModelAdapter | None = None
    targets: list[ModelAdapter] = field(default_factory=list)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    from importlib import metadata

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


def _expand_targets(x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                        torch.Tensor, np.ndarray]:
    """Every sample towards every wrong class: returns x (N*(K-1), ...), y, targets, row->sample."""
    n = y.shape[0]
    offsets = torch.arange(1, k)  # target = (y + offset) mod K covers the K-1 wrong classes
    t = (y[:, None] + offsets[None]) % k
    # order by target class within a sample for readability
    t, _ = t.sort(dim=1)
    rows = np.repeat(np.arange(n), k - 1)
    return x[rows], y[rows], t.reshape(-1), rows


def _records_from(res: AttackResult, model: str, attack: str, backend: str, source: str,
                  samples: np.ndarray, units: str) -> pd.DataFrame:
    """AttackResult (E, M) -> DataFrame with E*M rows (epsilon-major)."""
    e_count, m = res.adv_pred.shape
    eps = np.repeat(res.epsilons, m)
    tile = lambda a: np.tile(np.asarray(a), e_count)  # noqa: E731
    target = (pd.array(tile(res.targets.numpy()), dtype="Int64") if res.targets is not None
              else pd.array([pd.NA] * (e_count * m), dtype="Int64"))
    return pd.DataFrame({
        "model": model, "attack": attack, "backend": backend, "source": source,
        "targeted": res.targeted, "target": target, "epsilon": eps,
        "sample": tile(samples), "label": tile(res.y.numpy()),
        "clean_pred": tile(res.clean_pred.numpy()), "adv_pred": res.adv_pred.numpy().reshape(-1),
        "success": res.success.numpy().reshape(-1), "linf": res.linf.numpy().reshape(-1),
        "l2": res.l2.numpy().reshape(-1), "eps_units": units,
    }, columns=RECORD_COLUMNS)


def _write_atomic_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    df.to_csv(tmp, index=False, compression="gzip")
    os.replace(tmp, path)


def _save_examples(path: Path, res: AttackResult, x: torch.Tensor, model: str, attack: str,
                   n: int) -> None:
    n = min(n, x.shape[0])
    tmp = path.with_name(path.name + ".part.npz")
    np.savez_compressed(
        tmp, x=x[:n].cpu().float().numpy(), x_adv=res.x_adv[:, :n].float().numpy(),
        epsilons=res.epsilons, label=res.y[:n].numpy(), clean_pred=res.clean_pred[:n].numpy(),
        adv_pred=res.adv_pred[:, :n].numpy(), model=np.str_(model), attack=np.str_(attack),
    )
    os.replace(tmp, path)


def default_n_samples(attacks: Sequence[str], targeted_modes: Sequence[bool]) -> int:
    """The default sample count for a run: the smallest default among its attacks/modes."""
    values = []
    for a in attacks:
        for t in targeted_modes:
            values.append((DEFAULT_TARGETED_N_SAMPLES if t else DEFAULT_N_SAMPLES)[a])
    return min(values)


def _default_transfer_targets() -> list[str]:
    from ..models.registry import architectures
    from ..models.zoo import list_zoo

    zoo = list_zoo()
    found = [t for t in DEFAULT_TRANSFER_TARGETS if t in zoo]
    if found:
        return found
    return [t for t in DEFAULT_TRANSFER_TARGETS if t in architectures()]


# --------------------------------------------------------------------------- evaluate
def evaluate(
    models: Sequence[Any] | None = None,
    dataset: Any = "synthnorb",
    attack: str | Sequence[str] = "bim",
    *,
    targeted: bool | str = False,
    epsilons: Sequence[float] | None = None,
    steps: int = BIM_DEFAULT_STEPS,
    step_size: float | None = None,
    early_stop: bool = True,
    loss: str | None = None,
    n_samples: int | None = None,
    batch_size: int | None = None,
    backend: str | Sequence[str] = "native",
    device: str | torch.device = "auto",
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    source: Any = None,
    transfer_targets: Sequence[Any] | None = None,
    transfer_attack: str = "fgsm",
    split: str = "test",
    data_dir: str | Path | None = None,
    n_examples: int = 3,
    figures: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    command: str | None = None,
    invocation: dict[str, Any] | None = None,
) -> EvaluationResult:
    """Run white-box and/or transfer attack sweeps and collect per-sample records.

    Args:
        models: specs (zoo or architecture names, plugin specs), ``ModelAdapter``\\ s or
            ``nn.Module``\\ s; default ``capsnet-small`` and ``cnn``.
        dataset: ``synthnorb``, ``smallnorb``, ``mnist``, ``npz:PATH``, a Dataset object
            (``x`` (N, C, H, W), ``y`` (N,), ``bounds``, ...) or an ``(x, y)`` pair.
        attack: ``fgsm``, ``bim``, ``transfer``, ``all`` or a list of them.
        targeted: ``False``/"untargeted", ``True``/"targeted" (each sample towards each
            wrong class) or "both".
        epsilons: L-inf budgets in input space; default ``0:0.5:0.05``.
        steps, step_size, early_stop: BIM settings (see :mod:`robustcaps.attacks.native`).
        loss: attack loss (``ce``, ``spread``, ``margin``, ``cw``); default the adapter's
            (``ce``). Applied to every model loaded from a spec.
        n_samples: samples to attack (class-stratified subset); default per attack, printed.
        batch_size: samples per unit (default 100).
        backend: ``native``, ``torchattacks``, ``foolbox``, ``all`` or a list.
        source, transfer_targets: transfer source (default ``cnn``) and targets (default
            the zoo's ``capsnet-small`` and ``cnn-b``); the source is evaluated too (the
            white-box diagonal). ``transfer_attack``: crafting attack (``fgsm``/``bim``).
        out: run directory; None keeps everything in memory.
        resume: continue the run in ``out``, skipping finished units.
        echo: where to print progress messages (default: nowhere).
        command, invocation: the command line and the JSON-able arguments to store in the
            manifest (``robustcaps evaluate --resume`` reads ``invocation`` back).

    Returns:
        :class:`EvaluationResult`.
    """
    t_start = time.perf_counter()
    say = echo or (lambda _msg: None)
    warnings_seen: list[str] = []

    def warn(msg: str) -> None:
        if msg not in warnings_seen:
            warnings_seen.append(msg)
            say(f"Warning: {msg}")

    attacks = _as_list(attack, ALL_ATTACKS, "attack", ALL_ATTACKS)
    backends = _as_list(backend, BACKENDS, "backend", BACKENDS)
    modes = _mode_flags(targeted)
    eps = check_epsilons(DEFAULT_EPSILONS if epsilons is None else epsilons)
    if len(set(eps.tolist())) != len(eps):
        raise RobustcapsError("epsilons: the list contains duplicates")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise RobustcapsError(f"steps must be an integer >= 1, got {steps!r}")
    if step_size is not None and not (np.isfinite(step_size) and step_size > 0):
        raise RobustcapsError(f"step size must be a positive number, got {step_size!r}")
    if loss is not None and loss not in LOSSES:
        raise RobustcapsError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
    if transfer_attack not in ATTACKS:
        raise RobustcapsError(f"unknown transfer attack {transfer_attack!r}; known: fgsm, bim")
    if n_samples is not None and n_samples < 1:
        raise RobustcapsError(f"n_samples must be >= 1, got {n_samples}")
    if batch_size is not None and batch_size < 1:
        raise RobustcapsError(f"batch size must be >= 1, got {batch_size}")
    if resume and out is None:
        raise RobustcapsError("resume needs the run directory to continue (--out DIR)")
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    n_defaulted = n_samples is None
    if n_defaulted:
        n_samples = default_n_samples(attacks, modes)
    dev = resolve_device(device)
    seed_everything(seed)

    white = [a for a in attacks if a != "transfer"]
    model_specs = (list(models) if models else list(DEFAULT_MODELS)) if white else []
    options: dict[str, Any] = {"device": dev}
    if loss is not None:
        options["loss"] = loss

    # ---- data
    try:
        data = _load_data(dataset, split, n_samples, seed, data_dir, progress)
    except RobustcapsError as exc:
        if not (n_defaulted and "exceeds" in str(exc)):
            raise
        data = _load_data(dataset, split, None, seed, data_dir, progress)  # all there is
    if n_defaulted:
        n_samples = int(data.x.shape[0])
        say(f"n-samples: {n_samples} (default for attack {'+'.join(attacks)}, "
            f"{'+'.join('targeted' if m else 'untargeted' for m in modes)}; "
            "change with --n-samples)")
    if data.x.shape[0] == 0:
        raise RobustcapsError("the dataset selection is empty")
    units_text = eps_units(data.bounds)

    # ---- models (loaded once each, shared between white-box and transfer)
    loaded: dict[str, ModelAdapter] = {}

    defaults = {"num_classes": data.num_classes, "input_shape": tuple(data.x.shape[1:]),
                "bounds": data.bounds}

    def get(m: Any) -> ModelAdapter:
        key = json.dumps(model_spec(m), sort_keys=True) if model_spec(m) is not None else None
        if key is not None and key in loaded:
            return loaded[key]
        a = _resolve_model(m, options, defaults, warn)
        if key is not None:
            loaded[key] = a
        return a

    adapters = [get(m) for m in model_specs]
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise RobustcapsError(f"model names must be unique, got {names}")
    src: ModelAdapter | None = None
    tgts: list[ModelAdapter] = []
    if "transfer" in attacks:
        src = get(source if source is not None else DEFAULT_TRANSFER_SOURCE)
        t_specs = list(transfer_targets) if transfer_targets else _default_transfer_targets()
        tgts = [src] + [t for t in (get(s) for s in t_specs) if t.name != src.name]
        if len({t.name for t in tgts}) != len(tgts):
            raise RobustcapsError(f"transfer target names must be unique, got {[t.name for t in tgts]}")
        for t in tgts:
            _check_compatible(src, t)
    for a in adapters + tgts:
        _check_model_data(a, data)

    # ---- config (what must match for --resume)
    def model_id(a: ModelAdapter) -> dict[str, Any]:
        return {"name": a.name, "state_sha256": state_sha256(a.model), "loss": a.loss_name,
                "bounds": list(a.bounds) if a.bounds else None}

    config = {
        "attacks": attacks, "modes": ["targeted" if m else "untargeted" for m in modes],
        "backends": backends, "epsilons": eps.tolist(), "eps_units": units_text,
        "steps": int(steps), "step_size": step_size,
        "step_size_rule": "step_size" if step_size is not None else f"{BIM_TRAVEL} * eps / steps",
        "early_stop": bool(early_stop), "loss": loss, "n_samples": int(n_samples),
        "batch_size": int(batch_size), "seed": int(seed),
        "dataset": {"name": data.name, "split": split, "n": int(data.x.shape[0]),
                    "fingerprint": data.fingerprint},
        "models": [model_id(a) for a in adapters],
        "transfer": None if src is None else {
            "source": src.name, "attack": transfer_attack,
            "targets": [model_id(t) for t in tgts]},
    }

    # ---- units
    n = data.x.shape[0]
    batches = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    units: list[_Unit] = []
    for a_name in white:
        for model in adapters:
            for bk in backends:
                for t in modes:
                    for b, pos in enumerate(batches):
                        key = f"{a_name}__{_safe(model.name)}__{bk}__{'t' if t else 'u'}__b{b:05d}"
                        units.append(_Unit(key, "white", a_name, bk, t, b, pos, model=model))
    if src is not None:
        for t in modes:
            for b, pos in enumerate(batches):
                key = f"transfer-{transfer_attack}__{_safe(src.name)}__native__{'t' if t else 'u'}__b{b:05d}"
                units.append(_Unit(key, "transfer", transfer_attack, "native", t, b, pos,
                                   source=src, targets=tgts))

    # ---- run directory
    run_dir = Path(out) if out is not None else None
    manifest: dict[str, Any] = {}
    if run_dir is not None:
        _prepare_run_dir(run_dir, config, resume)
        say(f"run directory: {run_dir}")
        manifest = {
            "robustcaps_run": 1, "status": "running", "command": command,
            "started": datetime.now().isoformat(timespec="seconds"), "config": config,
            "versions": _versions(), "device": _device_info(dev), "seed": int(seed),
            "data": {"name": data.name, "split": split, "n": int(n), "fingerprint": data.fingerprint,
                     "num_classes": data.num_classes, "class_names": data.class_names,
                     "bounds": list(data.bounds) if data.bounds else None, "eps_units": units_text},
            "models": {a.name: _model_manifest(a) for a in adapters + tgts},
            "warnings": warnings_seen,
            "invocation": invocation if invocation is not None else _invocation(
                models, dataset, attack, targeted, eps, steps, step_size, early_stop, loss,
                n_samples, batch_size, backend, seed, source, transfer_targets,
                transfer_attack, split, data_dir),
        }
        _write_json(run_dir / "manifest.json", manifest)

    # ---- run the units
    chunks: list[pd.DataFrame] = []
    timings: dict[str, float] = {}
    done_log = run_dir / "chunks" / "done.jsonl" if run_dir else None
    if done_log is not None and done_log.is_file():
        for line in done_log.read_text().splitlines():
            try:
                d = json.loads(line)
                timings[d["unit"]] = d["seconds"]
            except (json.JSONDecodeError, KeyError):
                continue  # a torn last line from an interruption
    skipped = 0
    from tqdm.auto import tqdm

    bar = tqdm(units, desc="evaluate", unit="unit", disable=not progress, leave=False)
    for unit in bar:
        chunk_path = run_dir / "chunks" / f"{unit.key}.csv.gz" if run_dir else None
        if chunk_path is not None and chunk_path.is_file():
            chunks.append(pd.read_csv(chunk_path, dtype={"source": "string", "eps_units": "string"}))
            skipped += 1
            continue
        bar.set_postfix_str(unit.key.split("__b")[0], refresh=False)
        t0 = time.perf_counter()
        df = _run_unit(unit, data, eps, units_text, steps=int(steps), step_size=step_size,
                       early_stop=early_stop, batch_size=batch_size, run_dir=run_dir,
                       n_examples=n_examples, save_examples=(unit.batch == 0 and not unit.targeted
                                                             and unit.backend == backends[0]))
        seconds = time.perf_counter() - t0
        timings[unit.key] = seconds
        if chunk_path is not None:
            _write_atomic_csv(df, chunk_path)
            with open(done_log, "a") as f:
                f.write(json.dumps({"unit": unit.key, "seconds": seconds, "rows": len(df)}) + "\n")
            df = pd.read_csv(chunk_path, dtype={"source": "string", "eps_units": "string"})
        chunks.append(df)
    bar.close()
    if skipped:
        say(f"resume: {skipped} of {len(units)} units were already done")

    records = normalise_records(pd.concat(chunks, ignore_index=True)) if chunks else \
        normalise_records(pd.DataFrame(columns=RECORD_COLUMNS))
    paths: dict[str, Path] = {}
    if run_dir is not None:
        rec_path = run_dir / "records.csv.gz"
        _write_atomic_csv(records, rec_path)
        paths["records"] = rec_path
        manifest["timings"] = {"units_seconds": timings,
                               "total_seconds_this_invocation": time.perf_counter() - t_start}
        manifest["n_records"] = len(records)
        report = build_report(run_dir, records=records, figures=figures, manifest=manifest)
        paths.update({k: v for k, v in report.items()})
        summary, per_target, disagreement, table = (report.summary, report.per_target,
                                                    report.disagreement, report.table)
        manifest["backend_disagreement_pp"] = (
            None if disagreement.empty else float(disagreement["max_abs_diff_pp"].max()))
        manifest["status"] = "complete"
        manifest["finished"] = datetime.now().isoformat(timespec="seconds")
        manifest["timings"]["total_seconds_this_invocation"] = time.perf_counter() - t_start
        _write_json(run_dir / "manifest.json", manifest)
        paths["manifest"] = run_dir / "manifest.json"
        (run_dir / COMPLETE_MARKER).write_text(datetime.now().isoformat(timespec="seconds") + "\n")
        paths["complete"] = run_dir / COMPLETE_MARKER
    else:
        from ..report.tables import backend_disagreement, console_table, summarize

        summary, per_target = summarize(records)
        disagreement = backend_disagreement(summary)
        table = console_table(summary)
    return EvaluationResult(records=records, summary=summary, per_target=per_target,
                            disagreement=disagreement, paths=paths, manifest=manifest, table=table)


def _invocation(models, dataset, attack, targeted, eps, steps, step_size, early_stop, loss,
                n_samples, batch_size, backend, seed, source, transfer_targets, transfer_attack,
                split, data_dir) -> dict[str, Any]:
    """The arguments of an API call, where they can be written as JSON (specs, names)."""

    spec = model_spec
    inv = {"attack": attack, "targeted": targeted, "epsilons": eps.tolist(), "steps": steps,
           "step_size": step_size, "early_stop": early_stop, "loss": loss,
           "n_samples": n_samples, "batch_size": batch_size, "backend": backend, "seed": seed,
           "transfer_attack": transfer_attack, "split": split,
           "data_dir": None if data_dir is None else str(data_dir)}
    if isinstance(dataset, str):
        inv["dataset"] = dataset
    if models is None or all(spec(m) is not None for m in models):
        inv["models"] = None if models is None else [spec(m) for m in models]
    if source is None or spec(source) is not None:
        inv["source"] = None if source is None else spec(source)
    if transfer_targets is None or all(spec(m) is not None for m in transfer_targets):
        inv["transfer_targets"] = (None if transfer_targets is None
                                   else [spec(m) for m in transfer_targets])
    return inv


def _check_model_data(a: ModelAdapter, data: _Data) -> None:
    shape = tuple(data.x.shape[1:])
    if a.input_shape is not None and tuple(a.input_shape) != shape:
        raise RobustcapsError(
            f"model {a.name!r} takes inputs of shape {tuple(a.input_shape)} but dataset "
            f"{data.name!r} has {shape}"
        )
    if a.num_classes is not None and a.num_classes != data.num_classes:
        raise RobustcapsError(
            f"model {a.name!r} has {a.num_classes} classes but dataset {data.name!r} has "
            f"{data.num_classes}"
        )


def _model_manifest(a: ModelAdapter) -> dict[str, Any]:
    meta = dict(getattr(a.model, "robustcaps_meta", {}) or {})
    d = a.describe()
    d["checkpoint_sha256"] = meta.get("sha256")
    d["state_sha256"] = state_sha256(a.model)
    d["zoo"] = bool(meta.get("zoo", False))
    d["arch"] = meta.get("arch")
    return d


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _prepare_run_dir(run_dir: Path, config: dict[str, Any], resume: bool) -> None:
    cfg_path = run_dir / "config.json"
    if run_dir.exists() and not run_dir.is_dir():
        raise RobustcapsError(f"--out {run_dir} exists and is not a directory")
    if cfg_path.is_file():
        if not resume:
            raise RobustcapsError(
                f"{run_dir} already holds a run; continue it with --resume or choose another --out"
            )
        old = json.loads(cfg_path.read_text())
        diff = [k for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)]
        if diff:
            raise RobustcapsError(
                f"cannot resume {run_dir}: it was run with different settings ({', '.join(diff)})"
            )
        (run_dir / COMPLETE_MARKER).unlink(missing_ok=True)  # re-finalised below
        return
    if run_dir.is_dir() and any(run_dir.iterdir()) and not resume:
        raise RobustcapsError(f"--out {run_dir} is not empty; choose a new directory")
    (run_dir / "chunks").mkdir(parents=True, exist_ok=True)
    (run_dir / "examples").mkdir(exist_ok=True)
    _write_json(cfg_path, config)


def _run_unit(unit: _Unit, data: _Data, eps: np.ndarray, units_text: str, *, steps: int,
              step_size: float | None, early_stop: bool, batch_size: int, run_dir: Path | None,
              n_examples: int, save_examples: bool) -> pd.DataFrame:
    pos = unit.positions
    x, y = data.x[pos], data.y[pos]
    samples = data.index[pos]
    k = data.num_classes
    if unit.targeted:
        xr, yr, tr, rows = _expand_targets(x, y, k)
        samples_r = samples[rows]
    else:
        xr, yr, tr, samples_r = x, y, None, samples
    params = {"steps": steps, "step_size": step_size, "early_stop": early_stop,
              "batch_size": batch_size}
    if unit.kind == "white":
        atk = get_attack(unit.attack, backend=unit.backend, **params)
        res = atk.run(unit.model, xr, yr, eps, targets=tr, return_adv=save_examples)
        if save_examples and run_dir is not None and n_examples > 0:
            _save_examples(run_dir / "examples" / f"{unit.attack}__{_safe(unit.model.name)}.npz",
                           res, xr, unit.model.name, unit.attack, n_examples)
        return _records_from(res, unit.model.name, unit.attack, unit.backend, "", samples_r,
                             units_text)
    # transfer: craft once on the source, evaluate every target on the same inputs
    crafter = get_attack(unit.attack, backend=unit.backend, **params)
    crafted = crafter.run(unit.source, xr, yr, eps, targets=tr, return_adv=True)
    frames = []
    for t in unit.targets:
        res = evaluate_on(t, crafted, xr.cpu(), unit.source.name, batch_size)
        frames.append(_records_from(res, t.name, f"transfer-{unit.attack}",
                                    f"transfer:{unit.source.name}", unit.source.name, samples_r,
                                    units_text))
    return pd.concat(frames, ignore_index=True)

