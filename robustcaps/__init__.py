"""robustcaps: adversarial-robustness evaluation for capsule networks and any PyTorch model.

Python API (the CLI is a thin layer over it)::

    import robustcaps
    adapter = robustcaps.load_model("capsnet-small")                   # zoo / built-in
    adapter = robustcaps.load_model("models/examples/third_party_net.py:build",
                                    output_key="class_scores", input_shape=(1, 28, 28),
                                    bounds=(0, 1))                     # user code
    adapter = robustcaps.adapt(my_module, num_classes=10, input_shape=(1, 28, 28), bounds=(0, 1))

    res = robustcaps.evaluate([adapter], dataset="mnist", split="t10k-test", attack="fgsm",
                              epsilons=[0, 0.1, 0.2], n_samples=200, out="runs/mnist")
    res.summary, res.records, res.paths                # pandas DataFrames + written files

    diag = robustcaps.diagnose([adapter], dataset="mnist", split="t10k-test", out="runs/diag")
    diag.stats, diag.verdicts, diag.paths

Model specs (everywhere a model is named): a zoo or built-in name, ``package.module:factory``,
``path/to/file.py:factory``, a TorchScript file, ``NAME@path/to/state_dict.pt`` or the name of
an entry point in group ``robustcaps.models``; see :mod:`robustcaps.models.loading`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from .errors import DataError, ModelLoadError, RobustcapsError  # noqa: E402
from .models.adapter import ModelAdapter  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .diagnostics import DiagnosticsResult
    from .evaluation.run import EvaluationResult

__all__ = [
    "DataError",
    "ModelAdapter",
    "ModelLoadError",
    "RobustcapsError",
    "__version__",
    "adapt",
    "diagnose",
    "evaluate",
    "load_model",
]


def load_model(spec: str | Path, *, trust_pickle: bool = False, **options: Any) -> ModelAdapter:
    """Load a model by spec as a checked :class:`ModelAdapter` (eval mode, on ``device``,
    probed once for (N, num_classes) finite scores).

    ``options``: ``num_classes``, ``input_shape`` (C, H, W), ``bounds`` (lo, hi),
    ``mean``/``std`` (normalisation inside the adapter), ``outputs``
    (``logits``/``probabilities``/``capsule_logits``), ``output_key`` (dict key or tuple
    index), ``loss``, ``name``, ``device``, ``defaults`` (fallbacks, e.g. a dataset's).
    ``trust_pickle=True`` allows unpickling full-module files (runs code from the file).
    See :func:`robustcaps.models.loading.load_model`.
    """
    from .models.loading import load_model as _load

    return _load(spec, trust_pickle=trust_pickle, **options)


def adapt(module: nn.Module | ModelAdapter, **options: Any) -> ModelAdapter:
    """Wrap an in-memory ``nn.Module`` in a :class:`ModelAdapter` (same options as
    :func:`load_model`, except ``defaults``/``trust_pickle``; an adapter is returned as is).
    The probe batch runs when ``input_shape`` is known (given or in ``robustcaps_meta``)."""
    from .models.adapter import adapt as _adapt

    return _adapt(module, **options)


def evaluate(models: Any = None, dataset: Any = None, attack: str | list[str] | None = None, *,
             out: str | Path | None = None, resume: bool = False, n_examples: int = 3,
             figures: bool = True, progress: bool = True, echo: Any = None,
             shard: str | None = None, **settings: Any) -> EvaluationResult:
    """Run attack sweeps from Python (e.g. a notebook); nothing is written without ``out``.

    Args:
        models: one model or a list: specs, ``nn.Module``\\ s, ``ModelAdapter``\\ s or suite
            tables (``{"spec": ..., "output_key": ...}``); default ``capsnet-small`` and ``cnn``.
        dataset: ``synthnorb`` (default), ``smallnorb``, ``mnist``, ``npz:PATH``, a Dataset
            or ``(x, y)``.
        attack: a registered attack (``robustcaps.attacks.list_attacks()``: ``fgsm``,
            ``bim``, ...), ``transfer``, ``all`` or a list; default ``bim``.
        out: run directory for CSV/JSON/figures/manifest (resumable), or None.
        resume: continue the run in ``out``; settings not given are read from it, so
            ``evaluate(resume=True, out=DIR)`` alone continues an interrupted run.
        shard: ``"I/N"``: run share I of N into ``out`` (independent processes); the share
            that finds every unit done merges. Under torchrun the ranks split the run
            without it.
        **settings: the settings of :mod:`robustcaps.evaluation.config` (``epsilons``,
            ``targeted``, ``n_samples``, ``steps``, ``backend``, ``device``, ``seed``, ...).

    Returns:
        An ``EvaluationResult``: ``.records`` and ``.summary`` (pandas DataFrames, plus
        ``.per_target`` and ``.disagreement``) and ``.paths`` (files written; empty
        without ``out``).
    """
    from .evaluation.config import EvaluationConfig, OutputSettings
    from .evaluation.distributed import parse_shard
    from .evaluation.run import evaluate as _evaluate

    output = OutputSettings(out=None if out is None else Path(out), resume=resume,
                            n_examples=n_examples, figures=figures, progress=progress)
    given = {"models": _as_list(models), "dataset": dataset, "attack": attack, **settings}
    if resume and out is not None:
        config = EvaluationConfig.from_run_dir(out, output=output, **given)
    else:
        config = EvaluationConfig.from_kwargs(**given, output=output)
    return _evaluate(config, echo=echo, workers=None if shard is None else parse_shard(shard))


def diagnose(models: Any = ("capsnet-small", "cnn"), dataset: Any = "synthnorb", *,
             split: str = "test", data_dir: str | Path | None = None, n_samples: int | None = 32,
             seed: int = 0, device: str = "auto", loss: str | None = None,
             out: str | Path | None = None, progress: bool = True, **kwargs: Any) -> DiagnosticsResult:
    """Gradient statistics and masking indicators from Python (e.g. a notebook).

    Args:
        models: one model or a list (specs, ``nn.Module``\\ s, ``ModelAdapter``\\ s, suite tables).
        dataset: a dataset name or ``npz:PATH`` (loaded with ``split``, ``data_dir``,
            ``n_samples``, ``seed``), a Dataset object, or an ``(x, y)`` tensor pair
            (x: (N, C, H, W), y: (N,)); Dataset objects and pairs are cut to their first
            ``n_samples`` rows.
        loss: attack loss for every model (default: each adapter's).
        out: folder for the report, JSON/CSV and figures, or None (nothing written).
        **kwargs: see :func:`robustcaps.diagnostics.run_diagnostics` (``epsilons``,
            ``steps``, ``attacks``, ``float64``, ``finite_differences``, ``figures``, ...).

    Returns:
        A ``DiagnosticsResult``: ``.stats`` (one row per model) and ``.verdicts`` (pandas
        DataFrames, plus ``.curves``, ``.magnitudes``, ...) and ``.paths`` (files written).
    """
    from .data.coerce import as_dataset
    from .diagnostics import run_diagnostics
    from .models.resolve import resolve_model
    from .utils import seed_everything

    seed_everything(seed)
    data = as_dataset(dataset, split, n_samples=n_samples, seed=seed, data_dir=data_dir,
                      progress=progress)
    adapters = [resolve_model(m, defaults=data.model_defaults(), device=device, loss=loss)
                for m in _as_list(models) or []]
    kwargs.setdefault("dataset", f"{data.name} {data.split} split, fingerprint {data.fingerprint}")
    return run_diagnostics(adapters, data.x, data.y, out=out, seed=seed, progress=progress, **kwargs)


def _as_list(models: Any) -> list[Any] | None:
    """One model or a sequence of them -> a list (None stays None)."""
    if models is None:
        return None
    if isinstance(models, (str, Path, dict, ModelAdapter)) or hasattr(models, "forward") \
            or (hasattr(models, "spec") and hasattr(models, "load")):
        return [models]
    return list(models)
