"""Small shared helpers: device resolution, seeding, hashing."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import RobustcapsError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a usable ``torch.device``.

    ``auto`` picks the first CUDA device when one is available, else the CPU.
    """
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec.partition(":")[2]
        if index and not index.isdigit():
            raise RobustcapsError(f"invalid device {spec!r}: expected cuda:N with N an integer")
        if not torch.cuda.is_available():
            raise RobustcapsError(f"device {spec!r} requested but CUDA is not available here")
        if index and int(index) >= torch.cuda.device_count():
            raise RobustcapsError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device(spec)
    raise RobustcapsError(f"invalid device {spec!r}: use auto, cpu, cuda or cuda:N")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code may use the global RNG
    torch.manual_seed(seed)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """A short stable hash of tensors' dtype, shape and bytes (identifies a data sample)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def repo_root() -> Path | None:
    """The source checkout's root when running from one (holds pyproject.toml), else None."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def atomic_write(path: str | Path, write: Callable[[Path], Any], suffix: str = ".part") -> Path:
    """``write(tmp)`` then rename ``tmp`` onto ``path``: readers never see half a file.

    ``suffix`` is appended to the temporary name (numpy needs ``.npz`` at the end).
    """
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    write(tmp)
    os.replace(tmp, path)
    return path


def ensure_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` (and its parents) or raise a one-line error saying why not, e.g.
    ``--out /proc/x`` or a path under a regular file."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RobustcapsError(f"{what} {path} cannot be created: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RobustcapsError(f"{what} {path} is not writable")
    return path
