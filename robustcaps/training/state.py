"""Exact resumption: derived seeds, RNG state, checkpoint writes, finite weights."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils import atomic_write


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (independent streams for data order, augmentation...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(derived_seed(seed, 1, epoch))
    return torch.randperm(n, generator=g)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global RNG is what code may use
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))  # noqa: NPY002
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp), suffix=".tmp")


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.state_dict().values()
               if torch.is_floating_point(p))
