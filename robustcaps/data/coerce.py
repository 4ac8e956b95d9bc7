"""One coercion from whatever a caller passes as data to a :class:`Dataset`.

evaluate, diagnose, train and the CLI all take a dataset name (loaded with
:func:`load_dataset`), a :class:`Dataset` (or an object with its attributes) or an
``(x, y)`` tensor pair, and hand it here.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .datasets import Dataset, fingerprint, load_dataset


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
                   None, fingerprint(x, y), split=split)


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
