"""``load_dataset``: every dataset by name, as tensors in the model's input space.

Names: ``synthnorb`` (the default; rendered locally), ``smallnorb`` (official files in
``data_dir``), ``mnist`` (idx files in ``data_dir``) and ``npz:PATH`` (users' own data).

NORB-format data (synthnorb, smallnorb) go through the paper's preprocessing: 96 -> 48 area
downsampling, per-image standardisation, then the centre 32x32 crop (``crop="center"``), no
crop (``"none"``: 48x48, e.g. for training with :func:`transforms.train_augment`) or 48x48
kept for multi-crop testing (``"multi"``: use :func:`transforms.multi_crop_scores`).
Split names for NORB data include the viewpoint splits of :mod:`robustcaps.data.splits`;
MNIST has "train", "test", "t10k-train" (first 8,000 of t10k) and "t10k-test" (last 2,000).

With ``n_samples`` the subset is deterministic given ``seed`` and class-stratified, and is
chosen from the labels alone, so SynthNORB can render just those rows: the same subset comes
out whether the full files are cached or not.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, RobustcapsError
from . import smallnorb, splits, transforms

log = logging.getLogger(__name__)

DATASET_NAMES = ("synthnorb", "smallnorb", "mnist", "npz:PATH")
CROPS = ("center", "none", "multi")
CROP_SIZE = 32
NORB_SIZE = 48
#: ``Dataset.classes_from`` of a class count taken as the largest label + 1
LABELS = "the largest label + 1"
SYNTHNORB_SEED = 0  # the rendering seed of the built-in SynthNORB dataset
_RENDER_CHUNK = 256


@dataclass
class Dataset:
    """Samples in the model's input space plus their metadata.

    x: float32 (N, C, H, W). NORB: standardised, (N, C, 32, 32) with crop="center",
    (N, C, 48, 48) with crop="none" or "multi" (C = 2 for stereo, 1 otherwise).
    MNIST: (N, 1, 28, 28) in [0, 1]. y: int64 (N,).
    meta: int64 (N,) arrays: "index" (row in the source file) always; "instance",
    "elevation", "azimuth", "lighting" for NORB-format data.
    bounds: None for standardised NORB (no box constraint), (0, 1) for MNIST / uint8 npz.
    fingerprint: 16 hex digits of sha256 over x and y (as ``utils.tensor_fingerprint(x, y)``).
    """

    x: torch.Tensor
    y: torch.Tensor
    meta: dict[str, np.ndarray]
    name: str
    num_classes: int
    class_names: list[str]
    bounds: tuple[float, float] | None
    fingerprint: str
    split: str = "test"
    crop: str = "center"
    crop_size: int = CROP_SIZE
    source: str = ""  # where the samples came from (files read, or "rendered")
    extra: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) the model sees: the crop size for crop="multi", else x's own shape."""
        c, h, w = (int(s) for s in self.x.shape[1:])
        if self.crop == "multi":
            return (c, self.crop_size, self.crop_size)
        return (c, h, w)

    def model_defaults(self) -> dict:
        """What a model built for this data takes from it where neither the user nor the
        model says otherwise (``defaults`` of :func:`robustcaps.models.resolve.resolve_model`)."""
        return {"num_classes": self.num_classes, "input_shape": self.input_shape,
                "bounds": self.bounds}

    @property
    def classes_from(self) -> str:
        """How ``num_classes`` was determined, for error messages."""
        return self.extra.get("classes_from", f"the class list of dataset {self.name!r}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, indices: np.ndarray | torch.Tensor | list[int]) -> Dataset:
        """The rows ``indices`` (positions in this dataset) as a new Dataset."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        x, y = self.x[idx], self.y[idx]
        return Dataset(x, y, {k: v[idx.numpy()] for k, v in self.meta.items()}, self.name,
                       self.num_classes, list(self.class_names), self.bounds, fingerprint(x, y),
                       self.split, self.crop, self.crop_size, self.source, dict(self.extra))

    def summary(self) -> dict:
        """A JSON-able description (no data)."""
        counts = np.bincount(self.y.numpy(), minlength=self.num_classes).tolist() if len(self) else []
        return {
            "name": self.name,
            "split": self.split,
            "n": len(self),
            "x_shape": list(self.x.shape),
            "input_shape": list(self.input_shape),
            "crop": self.crop,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "class_counts": counts,
            "bounds": list(self.bounds) if self.bounds else None,
            "x_range": [float(self.x.min()), float(self.x.max())] if len(self) else None,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "meta": sorted(self.meta),
        }


def fingerprint(x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> str:
    """sha256-based id of (x, y), streamed in row chunks (no full-size copy).

    Equal to :func:`robustcaps.utils.tensor_fingerprint` ``(x, y)`` for CPU tensors.
    """
    h = hashlib.sha256()
    for t in (x, y):
        t = t.detach().cpu()
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.dim() == 0 or t.shape[0] == 0:
            h.update(t.contiguous().numpy().tobytes())
            continue
        for start in range(0, t.shape[0], chunk):
            h.update(t[start:start + chunk].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def stratified_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` positions into ``labels`` (int (M,)), class-balanced, sorted ascending.

    Each class's positions are shuffled by ``np.random.default_rng(seed)``; positions are then
    taken rank by rank across classes (classes visited in a seeded random order), so counts
    per class differ by at most one while every class has enough rows.
    """
    labels = np.asarray(labels)
    if n < 1:
        raise RobustcapsError(f"n_samples must be >= 1, got {n}")
    if n > labels.shape[0]:
        raise RobustcapsError(f"n_samples={n} exceeds the {labels.shape[0]} samples of this split")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    order = rng.permutation(len(classes))
    ranks = np.empty(labels.shape[0], dtype=np.int64)
    class_rank = np.empty(labels.shape[0], dtype=np.int64)
    for pos, ci in enumerate(order):
        members = np.flatnonzero(labels == classes[ci])
        perm = rng.permutation(members)
        ranks[perm] = np.arange(len(perm))
        class_rank[perm] = pos
    chosen = np.lexsort((class_rank, ranks))[:n]
    return np.sort(chosen)


# -- NORB-format data ---------------------------------------------------------------------------

def _cache_root() -> Path:
    """robustcaps' cache root ($ROBUSTCAPS_CACHE, else $XDG_CACHE_HOME/robustcaps or ~/.cache)."""
    from . import synthnorb

    return Path(synthnorb.default_cache_dir())


def _synth_table(file_split: str) -> tuple[np.ndarray, np.ndarray]:
    """(cat int32 (24300,), info int32 (24300, 4)) of SynthNORB without rendering anything."""
    from . import synthnorb

    cat, info = synthnorb.metadata(file_split)
    return np.asarray(cat, dtype=np.int32), np.asarray(info, dtype=np.int32)


def protocol_table(file_split: str) -> tuple[np.ndarray, np.ndarray]:
    """The smallNORB protocol in nested order (category, instance, elevation, azimuth,
    lighting): cat int32 (24300,), info int32 (24300, 4). Training instances 4, 6, 7, 8, 9;
    testing instances 0, 1, 2, 3, 5. An independent statement of SynthNORB's record order
    (tests check ``synthnorb.metadata`` against it)."""
    instances = (4, 6, 7, 8, 9) if file_split == "training" else (0, 1, 2, 3, 5)
    grid = np.stack(np.meshgrid(np.arange(5), np.asarray(instances), np.arange(9),
                                np.arange(0, 36, 2), np.arange(6), indexing="ij"), -1).reshape(-1, 5)
    return grid[:, 0].astype(np.int32), grid[:, 1:].astype(np.int32)


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)


def _norb_x(pairs, stereo: bool, crop: str, progress: bool, desc: str) -> torch.Tensor:
    n = int(pairs.shape[0])
    with _bar(n, desc, progress and n >= 2000) as bar:
        x = transforms.preprocess_norb(pairs, stereo=stereo, size=NORB_SIZE,
                                       crop=CROP_SIZE if crop == "center" else None,
                                       progress=bar.update)
    return x


def _load_norb(name: str, split: str, data_dir, n_samples, seed, stereo, crop, progress) -> Dataset:
    spec = splits.resolve_split(split)
    fs = spec.file_split
    if name == "smallnorb":
        folder = Path(data_dir) if data_dir is not None else _cache_root() / "smallnorb"
        if not smallnorb.has_split(folder, fs):
            raise DataError(
                f"{folder}: smallNORB {fs} files not found "
                "(run 'robustcaps data fetch smallnorb --dir DIR' and pass --data-dir DIR)"
            )
        files_dir: Path | None = folder
    else:
        from . import synthnorb

        # data_dir: a folder written by `robustcaps data synthnorb --out DIR` (files directly
        # in it); without it, the per-seed cache folder of synthnorb.ensure_generated.
        folder = (Path(data_dir) if data_dir is not None
                  else synthnorb.cache_dir_for(None, SYNTHNORB_SEED))
        files_dir = folder if synthnorb.is_generated(folder, [fs]) else None
        if files_dir is None and n_samples is None:
            if data_dir is not None:
                synthnorb.generate(folder, seed=SYNTHNORB_SEED, splits=[fs], progress=progress)
                files_dir = folder
            else:
                files_dir = Path(synthnorb.ensure_generated(None, seed=SYNTHNORB_SEED, splits=[fs],
                                                            progress=progress))

    if files_dir is not None:
        source = smallnorb.NorbSplit(files_dir, fs)
        cat, info = source.labels, source.info
    else:
        source = None
        cat, info = _synth_table(fs)
    rows = np.flatnonzero(spec.mask(info))
    if n_samples is not None:
        rows = rows[stratified_indices(cat[rows], int(n_samples), seed)]

    if source is not None:
        where = str(files_dir)
        x = _norb_x(_RowView(source, rows), stereo, crop, progress, f"{name} {split}")
    else:
        where = f"rendered (SynthNORB seed {SYNTHNORB_SEED})"
        x = _render_rows(fs, rows, stereo, crop, progress, cat, info)
    y = torch.from_numpy(cat[rows].astype(np.int64))
    meta = {"index": rows.astype(np.int64)}
    for i, col in enumerate(smallnorb.INFO_COLUMNS):
        meta[col] = info[rows, i].astype(np.int64)
    return Dataset(x, y, meta, name, 5, list(smallnorb.CLASS_NAMES), None, fingerprint(x, y),
                   spec.name, crop, CROP_SIZE, where)


class _RowView:
    """Selected rows of a split's images, sliceable like an array (read from disk on demand)."""

    def __init__(self, split: smallnorb.NorbSplit, rows: np.ndarray) -> None:
        self.split, self.rows = split, rows

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.split.images.shape[1:])

    def __getitem__(self, item: slice) -> np.ndarray:
        return self.split.read_rows(self.rows[item])


def _render_rows(fs: str, rows: np.ndarray, stereo: bool, crop: str, progress: bool,
                 cat: np.ndarray, info: np.ndarray) -> torch.Tensor:
    from . import synthnorb

    parts = []
    with _bar(len(rows), f"rendering SynthNORB {fs}", progress and len(rows) > 64) as bar:
        for start in range(0, len(rows), _RENDER_CHUNK):
            sel = rows[start:start + _RENDER_CHUNK]
            dat, c, inf = synthnorb.render_subset(fs, sel, seed=SYNTHNORB_SEED)
            if not (np.array_equal(np.asarray(c), cat[sel]) and np.array_equal(np.asarray(inf), info[sel])):
                raise RuntimeError(
                    "SynthNORB metadata table disagrees with render_subset's labels; "
                    "the subset would differ from the cached files (report this bug)")
            parts.append(transforms.preprocess_norb(
                dat, stereo=stereo, size=NORB_SIZE, crop=CROP_SIZE if crop == "center" else None))
            bar.update(len(sel))
    c_out = 2 if stereo else 1
    size = CROP_SIZE if crop == "center" else NORB_SIZE
    return torch.cat(parts) if parts else torch.empty((0, c_out, size, size))


# -- MNIST and npz ------------------------------------------------------------------------------

def _finish_flat(name: str, split: str, x: np.ndarray, y: np.ndarray, index: np.ndarray,
                 class_names: list[str], bounds, n_samples, seed, source: str,
                 classes_from: str | None = None) -> Dataset:
    if n_samples is not None:
        pick = stratified_indices(y, int(n_samples), seed)
        x, y, index = x[pick], y[pick], index[pick]
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return Dataset(xt, yt, {"index": np.asarray(index, dtype=np.int64)}, name, len(class_names),
                   class_names, bounds, fingerprint(xt, yt), split, "none", CROP_SIZE, source,
                   {} if classes_from is None else {"classes_from": classes_from})


def _load_mnist(split: str, data_dir, n_samples, seed) -> Dataset:
    from .mnist import CLASS_NAMES, T10K_TRAIN, load_mnist

    folder = Path(data_dir) if data_dir is not None else _cache_root() / "mnist"
    images, labels = load_mnist(folder, split)
    offset = T10K_TRAIN if split == "t10k-test" else 0
    x = images[:, None].astype(np.float32) / 255.0  # (N, 1, 28, 28) in [0, 1]
    index = np.arange(len(labels)) + offset
    return _finish_flat("mnist", split, x, labels, index, list(CLASS_NAMES), (0.0, 1.0),
                        n_samples, seed, str(folder))


def _load_npz(name: str, split: str, n_samples, seed) -> Dataset:
    from .npz import load_npz

    path = name.partition(":")[2]
    if not path:
        raise RobustcapsError("dataset 'npz:' needs a file path, e.g. npz:data/mine.npz")
    if split not in ("test", "train", "all"):
        raise RobustcapsError(f"an npz dataset has no split {split!r}: its file is used as a whole")
    data = load_npz(path)
    return _finish_flat(name, split, data.x, data.y, np.arange(len(data.y)), data.class_names,
                        data.bounds, n_samples, seed, str(Path(path)),
                        f"'class_names' in {path}" if data.named_classes else LABELS)


def load_dataset(
    name: str = "synthnorb",
    split: str = "test",
    *,
    data_dir: str | os.PathLike | None = None,
    n_samples: int | None = None,
    seed: int = 0,
    stereo: bool = True,
    crop: str = "center",
    progress: bool = True,
) -> Dataset:
    """Load a dataset by name (see the module docstring) as a :class:`Dataset`.

    data_dir: smallNORB / MNIST folder, or a SynthNORB folder written by ``generate`` (default:
    the SynthNORB cache). n_samples: a class-stratified subset, deterministic given ``seed``.
    stereo: NORB pairs as two channels (True) or the left image only. crop: "center" | "none" |
    "multi" (NORB only; other datasets are never cropped, "center"/"none" leave them as is).
    """
    if crop not in CROPS:
        raise RobustcapsError(f"unknown crop {crop!r}: use one of {', '.join(CROPS)}")
    if n_samples is not None and int(n_samples) < 1:
        raise RobustcapsError(f"n_samples must be >= 1, got {n_samples}")
    if name in ("synthnorb", "smallnorb"):
        return _load_norb(name, split, data_dir, n_samples, seed, stereo, crop, progress)
    if crop == "multi":
        raise RobustcapsError(f"crop='multi' applies only to NORB-format data, not {name!r}")
    if name == "mnist":
        return _load_mnist(split, data_dir, n_samples, seed)
    if name.startswith("npz:"):
        return _load_npz(name, split, n_samples, seed)
    raise RobustcapsError(f"unknown dataset {name!r}: use synthnorb, smallnorb, mnist or npz:PATH")
