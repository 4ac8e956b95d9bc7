"""Attacks: the Attack protocol, the registry, the built-in sweep engine (backend
``native``: FGSM, BIM, PGD, APGD-CE/DLR/T), torchattacks/foolbox backends, transfer, the
capsule-aware attacks (``pgd-bpda``, ``apgd-bpda``, ``vote-attack``: gradients from a
routing surrogate, success judged on the true model; :mod:`.capsule`) and ``auto``, the
per-sample worst case over a list of them (:mod:`.auto`).

>>> from robustcaps.attacks import get_attack
>>> attack = get_attack("bim", backend="native", steps=10)      # doctest: +SKIP
>>> result = attack.run(adapter, x, y, epsilons=[0, 0.1, 0.2])  # doctest: +SKIP

Epsilons are L-infinity sizes in the model's input space (per-image standardised units
for the built-in models on NORB data). A new attack is an :class:`Attack` subclass decorated
with ``@register_attack("name", description=...)`` in its own module, listed in the import
below; ``robustcaps evaluate --attack name`` then runs it.
"""

from __future__ import annotations

# Importing the implementations runs their @register_attack decorators.
from . import apgd, auto, backends, capsule, native, pgd  # noqa: F401
from .base import Attack, AttackResult
from .registry import (
    DEFAULT_BACKEND,
    attack_entry,
    get_attack,
    list_attacks,
    list_backends,
    register_attack,
)

#: registered attack names and backends (see :mod:`robustcaps.attacks.registry`)
ATTACKS = list_attacks()
BACKENDS = list_backends()

__all__ = ["ATTACKS", "BACKENDS", "DEFAULT_BACKEND", "Attack", "AttackResult", "attack_entry",
           "get_attack", "list_attacks", "list_backends", "register_attack"]
