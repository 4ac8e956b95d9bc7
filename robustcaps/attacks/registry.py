"""The attack registry (in the manner of timm's model registry).

An implementation registers itself with ``@register_attack(name, backend=..., description=...)``
on its :class:`~robustcaps.attacks.base.Attack` subclass; attack names, CLI choices, suite
validation and ``robustcaps attacks`` all read this one table. The registry imports no
implementation: :mod:`robustcaps.attacks` imports them (which runs their decorators), so
adding an attack is one decorated class in a new module plus its name in that import.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import RobustcapsError

#: the built-in sweep engine's backend name (robustcaps.attacks.native; not the C routing
#: kernels of robustcaps.models.native)
DEFAULT_BACKEND = "native"
#: sweep settings the evaluation passes to every attack; an implementation whose
#: constructor does not take one (FGSM has no steps, the libraries no early stop) drops it
SWEEP_SETTINGS = ("steps", "step_size", "early_stop", "seed")


@dataclass
class AttackEntry:
    """One attack: its description and the implementing class per backend."""

    name: str
    description: str
    implementations: dict[str, type] = field(default_factory=dict)

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self.implementations)


_ATTACKS: dict[str, AttackEntry] = {}


def register_attack(name: str, *, backend: str = DEFAULT_BACKEND,
                    description: str | None = None) -> Callable[[type], type]:
    """Class decorator: ``cls`` implements attack ``name`` on ``backend``.

    The first registration of a name should give its ``description`` (later backends may
    omit it). Registering the same (name, backend) twice is an error.
    """

    def deco(cls: type) -> type:
        entry = _ATTACKS.setdefault(name, AttackEntry(name, description or ""))
        if backend in entry.implementations:
            raise ValueError(f"attack {name!r} registered twice for backend {backend!r}")
        if description and not entry.description:
            entry.description = description
        entry.implementations[backend] = cls
        return cls

    return deco


def list_attacks() -> tuple[str, ...]:
    """Registered attack names, in registration order."""
    return tuple(_ATTACKS)


def list_backends() -> tuple[str, ...]:
    """Every backend some attack is registered for (the built-in engine first)."""
    seen = [DEFAULT_BACKEND]
    for entry in _ATTACKS.values():
        seen += [b for b in entry.backends if b not in seen]
    return tuple(seen)


def attack_entry(name: str) -> AttackEntry:
    """The registry entry of ``name``; RobustcapsError listing the known names otherwise."""
    entry = _ATTACKS.get((name or "").strip().lower())
    if entry is None:
        raise RobustcapsError(f"unknown attack {name!r}; known: {', '.join(list_attacks())}")
    return entry


def accepted_parameters(cls: type) -> set[str]:
    """Keyword parameters ``cls(...)`` takes, following ``**settings`` up the MRO (a
    subclass that forwards its settings to its parent takes the parent's)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind is p.KEYWORD_ONLY or
                  p.kind is p.POSITIONAL_OR_KEYWORD}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names - {"self"}


def get_attack(name: str, backend: str = DEFAULT_BACKEND, **params: Any):
    """Build attack ``name`` as implemented by ``backend``.

    ``params``: ``loss`` (``ce``/``spread``/``margin``/``cw``; default the adapter's),
    ``batch_size`` and the sweep settings (``steps``, ``step_size``, ``early_stop``), which
    are dropped for implementations that do not take them.
    """
    entry = attack_entry(name)
    backend = (backend or "").strip().lower()
    if backend not in list_backends():
        raise RobustcapsError(f"unknown backend {backend!r}; known: {', '.join(list_backends())}")
    cls = entry.implementations.get(backend)
    if cls is None:
        raise RobustcapsError(f"attack {entry.name!r} has no {backend} implementation; "
                              f"available: {', '.join(entry.backends)}")
    accepted = accepted_parameters(cls)
    for key in SWEEP_SETTINGS:
        if key not in accepted:
            params.pop(key, None)
    try:
        return cls(**params)
    except TypeError as exc:
        raise RobustcapsError(f"bad parameters for {entry.name} ({backend}): {exc}") from None
