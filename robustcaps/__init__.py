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

    from .attacks.engine import EvaluationResult
    from .diagnostics import DiagnosticsResult

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


def evaluate(models: Any = None, dataset: Any = "synthnorb", attack: str | list[str] = "bim", *,
             out: str | Path | None = None, **kwargs: Any) -> EvaluationResult:
    """Run attack sweeps from Python (e.g. a notebook); nothing is written without ``out``.

    Args:
        models: one model or a list: specs, ``nn.Module``\\ s, ``ModelAdapter``\\ s or suite
            tables (``{"spec": ..., "output_key": ...}``); default ``capsnet-small`` and ``cnn``.
        dataset: ``synthnorb``, ``smallnorb``, ``mnist``, ``npz:PATH``, a Dataset or ``(x, y)``.
        attack: ``fgsm``, ``bim``, ``transfer``, ``all`` or a list.
        out: run directory for CSV/JSON/figures/manifest (resumable), or None.
        **kwargs: see :func:`robustcaps.attacks.engine.evaluate` (``epsilons``, ``targeted``,
            ``n_samples``, ``steps``, ``backend``, ``device``, ``seed``, ``progress``, ...).

    Returns:
        An ``EvaluationResult``: ``.records`` and ``.summary`` (pandas DataFrames, plus
        ``.per_target`` and ``.disagreement``) and ``.paths`` (files written; empty
        without ``out``).
    """
    from .attacks.engine import evaluate as _evaluate

    return _evaluate(_as_list(models), dataset, attack, out=out, **kwargs)


def diagnose(models: Any = ("capsnet-small", "cnn"), dataset: Any = "synthnorb", *,
             split: str = "test", data_dir: str | Path | None = None, n_samples: int | None = 32,
             seed: int = 0, device: str = "auto", loss: str | None = None,
             out: str | Path | None = None, progress: bool = True, **kwargs: Any) -> DiagnosticsResult:
    """Gradient statistics and masking indicators from Python (e.g. a notebook).

    Args:
        models: one model or a list (specs, ``nn.Module``\\ s, ``ModelAdapter``\\ s, suite tables).
        dataset: a dataset name or ``npz:PATH`` (loaded with ``split``, ``data_dir``,
            ``n_samples``, ``seed``), a Dataset object, or an ``(x, y)`` tensor pair
            (x: (N, C, H, W), y: (N,)).
        loss: attack loss for every model loaded here (default: each adapter's).
        out: folder for the report, JSON/CSV and figures, or None (nothing written).
        **kwargs: see :func:`robustcaps.diagnostics.run_diagnostics` (``epsilons``,
            ``steps``, ``attacks``, ``float64``, ``finite_differences``, ``figures``, ...).

    Returns:
        A ``DiagnosticsResult``: ``.stats`` (one row per model) and ``.verdicts`` (pandas
        DataFrames, plus ``.curves``, ``.magnitudes``, ...) and ``.paths`` (files written).
    """
    import torch

    from .diagnostics import run_diagnostics
    from .models.loading import resolve_model
    from .utils import seed_everything

    seed_everything(seed)
    description = None
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        x, y = dataset
        x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
        defaults = {"num_classes": int(y.max()) + 1 if y.numel() else None,
                    "input_shape": tuple(x.shape[1:])}
    else:
        if isinstance(dataset, (str, Path)):
            from .data import load_dataset

            dataset = load_dataset(str(dataset), split, data_dir=data_dir, n_samples=n_samples,
                                   seed=seed, progress=progress)
        x, y = dataset.x, dataset.y
        defaults = {"num_classes": dataset.num_classes, "input_shape": dataset.input_shape,
                    "bounds": dataset.bounds}
        description = (f"{dataset.name} {getattr(dataset, 'split', '')} split, "
                       f"fingerprint {getattr(dataset, 'fingerprint', '?')}")
    options: dict[str, Any] = {"device": device}
    if loss is not None:
        options["loss"] = loss
    adapters = []
    for m in _as_list(models) or []:
        if isinstance(m, ModelAdapter) and loss is not None and loss != m.loss_name:
            raise RobustcapsError(f"loss={loss!r} cannot be applied to the ready adapter {m.name!r}")
        adapters.append(resolve_model(m, defaults=defaults,
                                      **(options if not isinstance(m, ModelAdapter) else {"device": device})))
    kwargs.setdefault("dataset", description)
    return run_diagnostics(adapters, x, y, out=out, seed=seed, progress=progress, **kwargs)


def _as_list(models: Any) -> list[Any] | None:
    """One model or a sequence of them -> a list (None stays None)."""
    if models is None:
        return None
    if isinstance(models, (str, Path, dict, ModelAdapter)) or hasattr(models, "forward") \
            or (hasattr(models, "spec") and hasattr(models, "load")):
        return [models]
    return list(models)
