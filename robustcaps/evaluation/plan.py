"""The units of work of a run, each with a stable key.

A unit is what one chunk of the run directory holds: a white-box unit attacks one model
with one attack and backend, in one targeting mode, on one batch of samples; a transfer
unit crafts one batch on the source model and evaluates every target on it. The keys name
the chunk files, so they stay exactly as earlier versions wrote them (old run directories
resume).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..attacks.capsule import is_capsule_model
from ..attacks.registry import DEFAULT_BACKEND, attack_entry
from ..models.adapter import ModelAdapter


def safe_name(name: str) -> str:
    """A model name as it may appear in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _mode(targeted: bool) -> str:
    return "t" if targeted else "u"


@dataclass(frozen=True, eq=False)
class WhiteBoxUnit:
    """``attack`` (its ``backend`` implementation) on ``model``, samples ``positions``."""

    attack: str
    backend: str
    model: ModelAdapter
    targeted: bool
    batch: int
    positions: np.ndarray

    @property
    def key(self) -> str:
        return (f"{self.attack}__{safe_name(self.model.name)}__{self.backend}__"
                f"{_mode(self.targeted)}__b{self.batch:05d}")


@dataclass(frozen=True, eq=False)
class TransferUnit:
    """Craft ``attack`` (built-in engine) on ``source``; evaluate every model of ``targets``."""

    attack: str
    source: ModelAdapter
    targets: tuple[ModelAdapter, ...]
    targeted: bool
    batch: int
    positions: np.ndarray
    backend: str = DEFAULT_BACKEND

    @property
    def key(self) -> str:
        return (f"transfer-{self.attack}__{safe_name(self.source.name)}__{self.backend}__"
                f"{_mode(self.targeted)}__b{self.batch:05d}")


Unit = WhiteBoxUnit | TransferUnit


def batches(n: int, batch_size: int) -> list[np.ndarray]:
    """Sample positions 0..n-1 in consecutive batches."""
    return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def skip_reason(attack: str, backend: str, model: ModelAdapter) -> str | None:
    """Why ``attack`` (``backend``) does not run on ``model`` (None: it does): no such
    implementation (``--backend all``), or a capsule-aware attack on another model."""
    cls = attack_entry(attack).implementations.get(backend)
    if cls is None:
        return f"{attack} has no {backend} implementation"
    if getattr(cls, "capsule_only", False) and not is_capsule_model(model):
        return f"{attack} needs an EM-routing capsule network; {model.name} is not one"
    return None


def plan_units(*, attacks: tuple[str, ...], backends: tuple[str, ...], modes: tuple[bool, ...],
               models: list[ModelAdapter], n: int, batch_size: int,
               transfer: tuple[str, ModelAdapter, list[ModelAdapter]] | None = None) -> list[Unit]:
    """Every unit, white-box first (attack, model, backend, mode, batch; pairs with a
    :func:`skip_reason` left out), then transfer (mode, batch). ``transfer``: (crafting
    attack, source, targets) or None."""
    parts = batches(n, batch_size)
    units: list[Unit] = [WhiteBoxUnit(a, bk, m, t, b, pos)
                         for a in attacks for m in models for bk in backends
                         if skip_reason(a, bk, m) is None
                         for t in modes for b, pos in enumerate(parts)]
    if transfer is not None:
        attack, source, targets = transfer
        units += [TransferUnit(attack, source, tuple(targets), t, b, pos)
                  for t in modes for b, pos in enumerate(parts)]
    return units
