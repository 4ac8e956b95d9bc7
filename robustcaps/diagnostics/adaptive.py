"""Capsule-aware attacks to try when the checks point at attack failure on a capsule network.

When C, P4 or P6 flags a capsule network (outputs ``capsule_logits``), the gradient of the
routed output is the likely culprit, not the model's robustness: EM routing iterates a
clustering whose gradient can point away from the decision boundary. The remedies, in the
order to try them, are named in :data:`CAPSULE_ATTACKS`; ``adaptive=True`` runs those the
attack registry (:func:`robustcaps.attacks.registry.list_attacks`) holds and says which
ones it does not. The ``cw`` entry is the tracked PGD on the logit margin, always available.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from ..errors import RobustcapsError
from ..models.adapter import ModelAdapter
from .indicators import NA, PASS

#: the checks whose flags point at the attack, not the model
ATTACK_FAILURE_CHECKS = ("C", "P4", "P6")
#: name -> what it does differently (registry names, or "cw" for the loss)
CAPSULE_ATTACKS = {
    "pgd-bpda": "PGD whose backward pass treats the routing as fixed (routing-BPDA): the "
                "gradient no longer runs through the EM iterations",
    "vote-attack": "attacks the primary capsules' votes, before routing (Gu et al. 2021)",
    "cw": "PGD on the logit margin max_{j != y} z_j - z_y (`--loss cw`), which no "
          "saturated class activation flattens",
}
COLUMNS = ["model", "attack", "status", "epsilon", "success_rate"]


def is_capsule(adapter: ModelAdapter) -> bool:
    return adapter.outputs == "capsule_logits"


def flags(verdicts: pd.DataFrame, model: str) -> list[str]:
    """The attack-failure checks that flag ``model`` (WARN or FAIL)."""
    v = verdicts[(verdicts["model"] == model) & verdicts["id"].isin(ATTACK_FAILURE_CHECKS)]
    return v.loc[~v["verdict"].isin([PASS, NA]), "id"].tolist()


def available(name: str) -> bool:
    from ..attacks.registry import list_attacks

    return name == "cw" or name in list_attacks()


def recommendations(verdicts: pd.DataFrame, adapters: Sequence[ModelAdapter]) -> dict[str, list[str]]:
    """Capsule models flagged by an attack-failure check -> the attacks to run next."""
    return {a.name: list(CAPSULE_ATTACKS) for a in adapters
            if is_capsule(a) and flags(verdicts, a.name)}


def run_adaptive(adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor,
                 epsilons: Sequence[float], steps: int, batch_size: int | None) -> pd.DataFrame:
    """Run every recommended attack that exists; one row per (attack, epsilon), or one
    ``unavailable`` row per attack the registry lacks. Rates are over clean-correct samples."""
    rows = []
    for name in CAPSULE_ATTACKS:
        if not available(name):
            rows.append((adapter.name, name, "unavailable: not in the attack registry",
                         float("nan"), float("nan")))
            continue
        try:
            res = _attack(name, steps, batch_size).run(adapter, x, y, list(epsilons))
        except RobustcapsError as exc:  # e.g. capsule scores without EM-routing layers
            rows.append((adapter.name, name, f"unavailable: {exc}", float("nan"), float("nan")))
            continue
        cc = res.clean_pred == y.cpu()
        for e, eps in enumerate(res.epsilons):
            rate = float(res.success[e][cc].double().mean()) if cc.any() else float("nan")
            rows.append((adapter.name, name, "ran", float(eps), rate))
    return pd.DataFrame(rows, columns=COLUMNS)


def _attack(name: str, steps: int, batch_size: int | None):
    from .runs import RelativePGD

    if name == "cw":
        return RelativePGD(steps=steps, random_start=False, loss="cw", batch_size=batch_size)
    from ..attacks.registry import get_attack

    return get_attack(name, steps=steps, batch_size=batch_size)
