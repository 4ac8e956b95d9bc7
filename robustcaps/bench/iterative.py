"""Native PGD / APGD against torchattacks on identical inputs (``bench attacks`` addition).

Kept apart from :mod:`robustcaps.bench.attacks` (FGSM/BIM) so either can change alone;
the CLI wiring comes with the evaluation registry.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from .attacks import _time


def compare_iterative(adapter, x: torch.Tensor, y: torch.Tensor, epsilons=(0.1, 0.2), *,
                      pgd_steps: int = 50, apgd_steps: int = 100, repeats: int = 1,
                      progress: bool = False) -> dict[str, Any]:
    """Native PGD / APGD-CE / APGD-DLR / APGD-T against torchattacks on identical inputs.

    Per attack: seconds of each backend, their robust accuracies per epsilon, the time
    ratio torchattacks / native (> 1: native faster) and the largest accuracy excess of
    native over torchattacks (<= 0: native at least as strong at every epsilon).
    """
    from ..attacks.apgd import APGD, APGDT
    from ..attacks.backends import TorchattacksAPGD, TorchattacksAPGDT, TorchattacksPGD
    from ..attacks.pgd import PGD

    pairs = {
        "pgd": (PGD(steps=pgd_steps), TorchattacksPGD(steps=pgd_steps)),
        "apgd-ce": (APGD(loss="ce", steps=apgd_steps), TorchattacksAPGD(loss="ce", steps=apgd_steps)),
        "apgd-dlr": (APGD(loss="dlr", steps=apgd_steps), TorchattacksAPGD(loss="dlr", steps=apgd_steps)),
        "apgd-t": (APGDT(steps=apgd_steps), TorchattacksAPGDT(steps=apgd_steps)),
    }
    eps = [float(e) for e in epsilons]
    out: dict[str, Any] = {"epsilons": eps}
    for name, (native, library) in pairs.items():
        row: dict[str, Any] = {}
        for label, atk in (("native", native), ("torchattacks", library)):
            sec, res = _time(lambda a=atk: a.run(adapter, x, y, eps), repeats)
            row[f"{label}_s"] = sec
            row[f"{label}_adv_acc"] = [round(float(v), 4) for v in res.accuracy]
            if progress:
                print(f"  {name:8s} {label:12s} {sec:8.2f} s", file=sys.stderr)
        row["speedup_vs_torchattacks"] = row["torchattacks_s"] / row["native_s"]
        row["native_acc_minus_torchattacks_max"] = float(np.max(
            np.array(row["native_adv_acc"]) - np.array(row["torchattacks_adv_acc"])))
        out[name] = row
    return out
