"""Randomness per unit: seeded from the run seed and the unit's key, never from the rank or
the order units run in, so a run split over any number of processes gives the records of a
single process."""

from __future__ import annotations

import hashlib
from typing import Any

from ..attacks.registry import accepted_parameters, attack_entry


def unit_seed(run_seed: int, key: str) -> int:
    """A 63-bit seed for unit ``key`` of a run seeded with ``run_seed``."""
    digest = hashlib.sha256(f"{run_seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def takes_seed(attack: str, backend: str) -> bool:
    """Whether the implementation's constructor accepts ``seed`` (random starts, restarts)."""
    cls = attack_entry(attack).implementations.get(backend)
    return cls is not None and "seed" in accepted_parameters(cls)


def attack_params(attack: str, backend: str, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """``params`` plus ``seed`` for an attack that takes one."""
    return {**params, "seed": seed} if takes_seed(attack, backend) else params
