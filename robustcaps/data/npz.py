"""Users' own data as an ``.npz`` file (``--dataset npz:PATH``).

The file holds ``x`` (N, C, H, W) and ``y`` (N,) integer labels, optionally ``class_names``
(N_classes,) strings and ``bounds`` (2,) floats. ``x`` is either

- float (float16/32/64): already in the model's input space; bounds come from ``bounds`` in
  the file if given, else None (unbounded, like standardised data), or
- uint8: pixel values, scaled to [0, 1]; bounds (0, 1).

Loaded with ``allow_pickle=False``: object arrays are refused.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError


@dataclass
class NpzData:
    """x float32 (N, C, H, W); y int64 (N,); class_names; bounds or None."""

    x: np.ndarray
    y: np.ndarray
    class_names: list[str]
    bounds: tuple[float, float] | None
    named_classes: bool = False  # class_names came from the file (else 0..max label)


def load_npz(path: str | os.PathLike) -> NpzData:
    """Load and validate an npz dataset file (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: npz dataset file not found")
    with open(path, "rb") as f:
        if f.read(2) != b"PK":  # np.load would try to unpickle anything that is not a zip
            raise DataError(f"{path}: not a valid .npz file (not a zip archive; write it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            missing = {"x", "y"} - keys
            if missing:
                raise DataError(
                    f"{path}: npz dataset needs arrays 'x' and 'y'; missing {sorted(missing)} "
                    f"(found {sorted(keys) or 'none'})"
                )
            x, y = f["x"], f["y"]
            names = f["class_names"] if "class_names" in keys else None
            bounds = f["bounds"] if "bounds" in keys else None
    except DataError:
        raise
    except ValueError:
        # np.load raises ValueError for object (pickled) arrays when allow_pickle=False.
        raise DataError(f"{path}: holds object arrays, which robustcaps never unpickles; "
                        "store plain numeric and string arrays") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a valid .npz file ({exc})") from None

    if x.ndim != 4:
        raise DataError(f"{path}: 'x' must have shape (N, C, H, W), found shape {x.shape}")
    if x.size == 0:
        raise DataError(f"{path}: 'x' holds no data (shape {x.shape})")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{path}: 'y' must have shape ({x.shape[0]},) to match 'x', found {y.shape}")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and y.size and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{path}: 'y' must hold integer labels, found dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise DataError(f"{path}: 'y' has negative labels (min {y.min()})")

    if x.dtype == np.uint8:
        xf = x.astype(np.float32) / 255.0
        file_bounds: tuple[float, float] | None = (0.0, 1.0)
    elif x.dtype.kind == "f":
        xf = x.astype(np.float32)
        if not np.all(np.isfinite(xf)):
            raise DataError(f"{path}: 'x' contains NaN or infinite values")
        file_bounds = None
    else:
        raise DataError(f"{path}: 'x' must be float (model input space) or uint8 (pixels), found {x.dtype}")

    if bounds is not None:
        b = np.asarray(bounds, dtype=np.float64).reshape(-1)
        if b.shape != (2,) or not b[0] < b[1]:
            raise DataError(f"{path}: 'bounds' must be two floats lo < hi, found {bounds!r}")
        if x.dtype == np.uint8:
            raise DataError(f"{path}: 'bounds' given for uint8 'x' (uint8 is always scaled to [0, 1])")
        if xf.size and (xf.min() < b[0] - 1e-6 or xf.max() > b[1] + 1e-6):
            raise DataError(
                f"{path}: 'x' values {xf.min():.4g}..{xf.max():.4g} lie outside 'bounds' {tuple(b)}"
            )
        file_bounds = (float(b[0]), float(b[1]))

    num_classes = int(y.max()) + 1 if y.size else 0
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DataError(f"{path}: 'class_names' must be a 1-D string array")
        class_names = [str(n) for n in names.tolist()]
        if len(class_names) < num_classes:
            raise DataError(
                f"{path}: 'class_names' has {len(class_names)} names but labels go up to {num_classes - 1}"
            )
    else:
        class_names = [str(i) for i in range(num_classes)]
    return NpzData(xf, y, class_names, file_bounds, names is not None)
