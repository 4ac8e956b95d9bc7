"""The training, validation and test splits of a run (uncropped: 48x48 for NORB)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..utils import tensor_fingerprint
from .config import TrainConfig


@dataclass
class Split:
    """An in-memory split: x float32 (N, C, H, W) (48x48 for NORB), y int64 (N,)."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    fingerprint: str


@dataclass
class TrainData:
    train: Split
    test: Split
    val: Split | None
    num_classes: int
    class_names: list[str]
    bounds: tuple[float, float] | None
    dataset: str


def _fingerprint(ds: Any, x: torch.Tensor, y: torch.Tensor) -> str:
    fp = getattr(ds, "fingerprint", None)
    return fp if isinstance(fp, str) and fp else tensor_fingerprint(x, y)


def subset_split(split: Split, idx: torch.Tensor, name: str) -> Split:
    x, y = split.x[idx], split.y[idx]
    return Split(name, x, y, tensor_fingerprint(x, y))


def _split_val(train: Split, meta: dict[str, Any], cfg: TrainConfig) -> tuple[Split, Split | None]:
    """Hold out part of the training data for validation (never touches the test split)."""
    n = len(train.y)
    if cfg.val_instances:
        inst = meta.get("instance") if meta else None
        if inst is None:
            raise DataError(f"dataset {cfg.dataset!r} has no instance metadata; use --val-fraction")
        inst = np.asarray(inst)
        present = set(np.unique(inst).tolist())
        missing = sorted(set(cfg.val_instances) - present)
        if missing:
            raise DataError(f"val instances {missing} are not in the training split "
                            f"(its instances: {sorted(present)})")
        is_val = torch.from_numpy(np.isin(inst, list(cfg.val_instances)))
    elif cfg.val_fraction is not None:
        # Class-stratified random hold-out, fixed by the data seed (not the training seed).
        rng = np.random.default_rng(np.random.SeedSequence([cfg.data_seed, 7919]))
        y = train.y.numpy()
        is_val_np = np.zeros(n, dtype=bool)
        for c in np.unique(y):
            members = np.flatnonzero(y == c)
            k = int(round(cfg.val_fraction * len(members)))
            is_val_np[rng.choice(members, size=k, replace=False)] = True
        is_val = torch.from_numpy(is_val_np)
    else:
        return train, None
    if bool(is_val.all()) or not bool(is_val.any()):
        raise DataError("the validation hold-out leaves no training (or no validation) samples")
    tr = subset_split(train, torch.nonzero(~is_val).squeeze(1), train.name)
    va = subset_split(train, torch.nonzero(is_val).squeeze(1), f"{train.name}[val]")
    return tr, va


def load_train_data(cfg: TrainConfig, train_ds: Any = None, test_ds: Any = None) -> TrainData:
    """Load the training and test splits uncropped (48x48 for NORB), plus the validation hold-out.

    The test split comes from ``cfg.test_dataset`` when set (e.g. a second ``npz:`` file), else
    from ``cfg.dataset``. ``train_ds``/``test_ds``: already loaded datasets (anything with ``x``, ``y``,
    ``num_classes`` and optionally ``meta``, ``fingerprint``, ``bounds``, ``class_names``).
    """
    if train_ds is None or test_ds is None:
        from ..data import load_dataset

        common = dict(data_dir=cfg.data_dir, seed=cfg.data_seed, stereo=cfg.stereo, crop="none",
                      progress=cfg.progress)
        if train_ds is None:
            train_ds = load_dataset(cfg.dataset, cfg.train_split, n_samples=cfg.max_train_samples,
                                    **common)
        if test_ds is None:
            test_ds = load_dataset(cfg.test_dataset or cfg.dataset, cfg.test_split,
                                   n_samples=cfg.max_test_samples, **common)
    else:  # in-memory datasets: apply the sample limits here (first rows of a fixed permutation)
        train_ds = _limit(train_ds, cfg.max_train_samples, cfg.data_seed)
        test_ds = _limit(test_ds, cfg.max_test_samples, cfg.data_seed)
    splits = []
    for ds, name in ((train_ds, cfg.train_split), (test_ds, cfg.test_split)):
        x, y = ds.x, ds.y
        if x.dim() != 4 or y.dim() != 1 or len(x) != len(y) or len(y) == 0:
            raise DataError(f"split {name!r}: expected x (N, C, H, W) and y (N,), got "
                            f"{tuple(x.shape)} and {tuple(y.shape)}")
        splits.append(Split(name, x.float().contiguous(), y.long(), _fingerprint(ds, x, y)))
    train, test = splits
    if train.fingerprint == test.fingerprint:
        warnings.warn(f"the test split of {cfg.dataset!r} is the training data itself: its test "
                      "error says nothing about generalisation (give --test-dataset)", stacklevel=3)
    if train.x.shape[1:] != test.x.shape[1:]:
        raise DataError(f"train images {tuple(train.x.shape[1:])} and test images "
                        f"{tuple(test.x.shape[1:])} differ in shape")
    train, val = _split_val(train, dict(getattr(train_ds, "meta", {}) or {}), cfg)
    k = int(getattr(train_ds, "num_classes", 0) or int(train_ds.y.max()) + 1)
    names = list(getattr(train_ds, "class_names", []) or [str(i) for i in range(k)])
    bounds = getattr(train_ds, "bounds", None)
    return TrainData(train, test, val, k, names, tuple(bounds) if bounds else None,
                     str(getattr(train_ds, "name", cfg.dataset)))


def _limit(ds: Any, n: int | None, seed: int) -> Any:
    if n is None or n >= len(ds.y):
        return ds
    idx = torch.from_numpy(np.random.default_rng(seed).permutation(len(ds.y))[:n])
    return _View(ds, idx)


class _View:
    """Rows ``idx`` of an in-memory dataset."""

    def __init__(self, ds: Any, idx: torch.Tensor) -> None:
        self.x, self.y = ds.x[idx], ds.y[idx]
        self.meta = {k: np.asarray(v)[idx.numpy()] for k, v in (getattr(ds, "meta", {}) or {}).items()}
        for attr in ("num_classes", "class_names", "bounds", "name"):
            setattr(self, attr, getattr(ds, attr, None))
        self.fingerprint = tensor_fingerprint(self.x, self.y)
