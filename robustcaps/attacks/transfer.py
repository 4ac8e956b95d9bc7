"""Black-box transfer: adversarial examples crafted on a source model, evaluated on targets.

The source is attacked white-box (FGSM or BIM, any backend) over the epsilon sweep; the
resulting inputs (E, N, ...) are then classified by every target model. The outcome for
each target is an :class:`AttackResult` with ``backend = "transfer:<source name>"``, so
a source x target x epsilon matrix is just these results side by side. Including the
source among the targets gives the white-box reference on the diagonal.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import RobustcapsError
from ..models.adapter import ModelAdapter
from .base import AttackResult
from .native import check_epsilons, perturbation_norms
from .registry import get_attack


def _check_compatible(source: ModelAdapter, target: ModelAdapter) -> None:
    if source.input_shape and target.input_shape and tuple(source.input_shape) != tuple(target.input_shape):
        raise RobustcapsError(
            f"transfer: source {source.name!r} takes inputs {source.input_shape} but target "
            f"{target.name!r} takes {target.input_shape}"
        )
    if source.num_classes and target.num_classes and source.num_classes != target.num_classes:
        raise RobustcapsError(
            f"transfer: source {source.name!r} has {source.num_classes} classes, target "
            f"{target.name!r} has {target.num_classes}"
        )


@torch.no_grad()
def evaluate_on(target: ModelAdapter, crafted: AttackResult, x: torch.Tensor,
                source_name: str, batch_size: int | None = None,
                return_adv: bool = False) -> AttackResult:
    """Classify the crafted inputs ``crafted.x_adv`` (E, N, ...) with ``target``."""
    if crafted.x_adv is None:
        raise RobustcapsError("transfer: the crafted result holds no adversarial inputs")
    e_count, n = crafted.x_adv.shape[:2]
    x_adv = crafted.x_adv
    if target.bounds is not None:  # the target's own box applies to what it is fed
        x_adv = x_adv.clamp(*target.bounds)
    clean_pred = target.predict(x, batch_size=batch_size).cpu()
    adv_pred = torch.stack([target.predict(x_adv[e], batch_size=batch_size).cpu()
                            for e in range(e_count)])
    labels = crafted.targets if crafted.targeted else crafted.y
    success = adv_pred == labels[None] if crafted.targeted else adv_pred != labels[None]
    linf = torch.empty(e_count, n, dtype=torch.float64)
    l2 = torch.empty_like(linf)
    for e in range(e_count):
        linf[e], l2[e] = perturbation_norms(x_adv[e], x.cpu())
    return AttackResult(
        attack=crafted.attack, backend=f"transfer:{source_name}", targeted=crafted.targeted,
        epsilons=crafted.epsilons, y=crafted.y, targets=crafted.targets, clean_pred=clean_pred,
        adv_pred=adv_pred, success=success, linf=linf, l2=l2,
        x_adv=x_adv if return_adv else None,
        info={"source": source_name, "crafted_with": crafted.backend, **crafted.info},
    )


def transfer_attack(
    source: ModelAdapter,
    targets: list[ModelAdapter],
    x: torch.Tensor,
    y: torch.Tensor,
    epsilons: Sequence[float],
    attack: str = "fgsm",
    *,
    backend: str = "native",
    target_labels: torch.Tensor | None = None,
    batch_size: int | None = None,
    return_adv: bool = False,
    **params: Any,
) -> dict[str, AttackResult]:
    """Craft on ``source``, evaluate on every target; returns ``{target name: AttackResult}``.

    Args:
        source: the white-box model the examples are crafted on.
        targets: models to evaluate (names must be unique).
        x: (N, *input_shape) clean inputs; y: (N,) true labels.
        epsilons: (E,) L-inf budgets in input space.
        attack: ``fgsm`` or ``bim``; ``params`` go to :func:`get_attack` (steps, ...).
        backend: the backend crafting the examples.
        target_labels: (N,) classes for a targeted transfer attack (None: untargeted).
    """
    eps = check_epsilons(epsilons)
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise RobustcapsError(f"transfer: target names must be unique, got {names}")
    for t in targets:
        _check_compatible(source, t)
    t0 = time.perf_counter()
    crafter = get_attack(attack, backend=backend, batch_size=batch_size, **params)
    crafted = crafter.run(source, x, y, eps, targets=target_labels, return_adv=True)
    craft_s = time.perf_counter() - t0
    out = {}
    for t in targets:
        res = evaluate_on(t, crafted, x.cpu(), source.name, batch_size, return_adv)
        res.info["craft_seconds"] = craft_s
        out[t.name] = res
    return out
