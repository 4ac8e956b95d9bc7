"""One coercion from whatever a caller passes as data to a :class:`Dataset`.

evaluate, diagnose, train and the CLI all take a dataset name (loaded with
:func:`load_dataset`), a :class:`Dataset` (or an object with its attributes) or an
``(x, y)`` tensor pair, and hand it here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch

from ..errors import RobustcapsError
from .datasets import LABELS, Dataset, fingerprint, load_dataset


def as_dataset(data: Any, split: str = "test", *, n_samples: int | None = None, seed: int = 0,
               data_dir: str | os.PathLike | None = None, progress: bool = True) -> Dataset:
    """A name, Dataset(-like) object or ``(x, y)`` pair -> :class:`Dataset`.

    A name is loaded with a class-stratified ``n_samples`` subset (deterministic given
    ``seed``); tensors and Dataset objects are cut to their first ``n_samples`` rows
    (tensors carry no strata). ``(x, y)``: x (N, C, H, W) float, y (N,) class indices; it
    has no bounds and classes ``0..max(y)``.
    """
    if isinstance(data, (str, os.PathLike)):
        return load_dataset(str(data), split, data_dir=data_dir, n_samples=n_samples, seed=seed,
                            progress=progress)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return _from_tensors(*data, split=split, n_samples=n_samples)
    if isinstance(data, Dataset):
        return data if n_samples is None or len(data) <= n_samples else \
            data.subset(np.arange(n_samples))
    return _from_object(data, split, n_samples)


def _from_tensors(x: Any, y: Any, *, split: str, n_samples: int | None) -> Dataset:
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    if n_samples is not None:
        x, y = x[:n_samples], y[:n_samples]
    k = int(y.max()) + 1 if y.numel() else 0
    return Dataset(x, y, {"index": np.arange(len(y))}, "tensors", k, [str(i) for i in range(k)],
                   None, fingerprint(x, y), split=split, extra={"classes_from": LABELS})


def _from_object(ds: Any, split: str, n_samples: int | None) -> Dataset:
    """A Dataset-like object (``x``, ``y`` and optionally the other Dataset attributes)."""
    x, y = ds.x, ds.y
    if n_samples is not None and x.shape[0] > n_samples:
        x, y = x[:n_samples], y[:n_samples]
    meta = dict(getattr(ds, "meta", {}) or {})
    meta["index"] = np.asarray(meta.get("index", np.arange(len(ds.y))))[: x.shape[0]]
    k = int(getattr(ds, "num_classes", int(y.max()) + 1))
    bounds = getattr(ds, "bounds", None)
    return Dataset(x, y, {"index": meta["index"]}, str(getattr(ds, "name", "dataset")), k,
                   list(getattr(ds, "class_names", None) or [str(i) for i in range(k)]),
                   None if bounds is None else (float(bounds[0]), float(bounds[1])),
                   str(getattr(ds, "fingerprint", "")), split=getattr(ds, "split", split),
                   crop=getattr(ds, "crop", "center"))


def fit_classes(data: Dataset, k: int | None, model: str, k_from: str) -> Dataset:
    """``data`` as the ``k``-class dataset of ``model`` (``k_from``: how the model's count
    was determined), or a one-line error naming both counts' origins.

    A count inferred from the labels (largest + 1) is only a lower bound: labels 0..3 of a
    5-class model are valid data in which class 4 is absent, so the model's count wins.
    """
    if k is None or k == data.num_classes:
        return data
    top = int(data.y.max()) if len(data) else -1
    if top >= k:
        raise RobustcapsError(
            f"label {top} is out of range for a {k}-class model {model!r} (its class count "
            f"comes from {k_from}; dataset {data.name!r} has labels 0..{top})")
    if data.classes_from != LABELS:
        raise RobustcapsError(
            f"model {model!r} has {k} classes ({k_from}) but dataset {data.name!r} has "
            f"{data.num_classes} (from {data.classes_from})")
    names = list(data.class_names) + [str(i) for i in range(data.num_classes, k)]
    return dataclasses.replace(data, num_classes=k, class_names=names,
                               extra={**data.extra, "classes_from": f"model {model!r}"})
