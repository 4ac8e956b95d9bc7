"""Attacks: the Attack protocol, native FGSM/BIM sweeps, torchattacks/foolbox backends, transfer.

>>> from robustcaps.attacks import get_attack
>>> attack = get_attack("bim", backend="native", steps=10)      # doctest: +SKIP
>>> result = attack.run(adapter, x, y, epsilons=[0, 0.1, 0.2])  # doctest: +SKIP

Epsilons are L-infinity sizes in the model's input space (per-image standardised units
for the built-in models on NORB data).
"""

from __future__ import annotations

from typing import Any

from ..errors import RobustcapsError
from .base import Attack, AttackResult

ATTACKS = ("fgsm", "bim")
BACKENDS = ("native", "torchattacks", "foolbox")

__all__ = ["ATTACKS", "BACKENDS", "Attack", "AttackResult", "get_attack"]


def get_attack(name: str, backend: str = "native", **params: Any) -> Attack:
    """Build an attack by name and backend.

    Args:
        name: ``fgsm`` or ``bim``.
        backend: ``native`` (default, the fast sweep engine), ``torchattacks`` or ``foolbox``.
        **params: ``loss`` (``ce``/``spread``/``margin``/``cw``; default the adapter's),
            ``batch_size``; for BIM also ``steps`` (default 10), ``step_size`` (absolute,
            default ``1.25 * eps / steps``) and, native only, ``early_stop`` (default True).
    """
    from . import backends, native

    name = (name or "").strip().lower()
    backend = (backend or "").strip().lower()
    table = {
        ("fgsm", "native"): native.FGSM,
        ("bim", "native"): native.BIM,
        ("fgsm", "torchattacks"): backends.TorchattacksFGSM,
        ("bim", "torchattacks"): backends.TorchattacksBIM,
        ("fgsm", "foolbox"): backends.FoolboxFGSM,
        ("bim", "foolbox"): backends.FoolboxBIM,
    }
    if name not in ATTACKS:
        raise RobustcapsError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    if backend not in BACKENDS:
        raise RobustcapsError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    cls = table[(name, backend)]
    # FGSM is one step of size eps; the libraries always run every step (no early stop).
    drop = ("steps", "step_size", "early_stop") if name == "fgsm" else ()
    drop += ("early_stop",) if backend != "native" else ()
    for key in drop:
        params.pop(key, None)
    try:
        return cls(**params)
    except TypeError as exc:
        raise RobustcapsError(f"bad parameters for {name} ({backend}): {exc}") from None
