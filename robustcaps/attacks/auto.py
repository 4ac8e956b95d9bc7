"""``auto``: the per-sample worst case over a list of attacks (AutoAttack-style).

The components run in the order given (cheapest first); each attacks only the samples
still robust at some epsilon, and a sample counts as broken at an epsilon by the first
component that succeeds there. ``info["broken_by"]`` (E, N) names it (``clean`` for a
sample misclassified without attack, ``""`` when none succeeded);
``info["sample_forwards"]``/``["sample_backwards"]`` (E, N) sum the passes every component
spent on that sample at that epsilon (per-sample counts where the component reports
them, else its batched call count, an upper bound); ``info["after"]`` is the robust
accuracy (untargeted) or success rate (targeted) after each component, cumulatively.

Each component seeds every sample's random start by the sample's row in the full input
(``sample_index``), so a sample gets the same start as in the component's own run on all
samples: the worst case is then at most every component's own robust accuracy at every
epsilon (samples are independent; a run on a subset changes no sample's outcome).

Capsule-aware components (``pgd-bpda``, ``apgd-bpda``, ``vote-attack``) run only on
EM-routing capsule networks and are skipped (``info["skipped"]``) for other models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import RobustcapsError
from ..models.adapter import ModelAdapter
from .base import Attack, AttackResult
from .capsule import _CapsuleAware, is_capsule_model
from .native import check_run
from .registry import attack_entry, get_attack, register_attack

#: the default components, cheapest first. The capsule-aware attacks are not among them:
#: measured on capsnet-small (results/capsule-aware) they break far fewer samples than
#: plain APGD-CE at several times its cost; add them with ``components``.
DEFAULT_COMPONENTS = ("fgsm", "pgd", "apgd-ce", "apgd-t")


@register_attack("auto", description="per-sample worst case over fgsm, pgd, apgd-ce, apgd-t "
                 "(configurable); each attacks only the samples still robust")
class AutoAttack(Attack):
    """The worst case per sample over ``components`` (registered attack names).

    ``steps``/``step_size``/``seed``/``early_stop``/``loss``/``batch_size`` go to every
    component that takes them (None: each component's own default)."""

    name = "auto"

    def __init__(self, *, components: Sequence[str] | None = None, steps: int | None = None,
                 step_size: float | None = None, seed: int = 0, early_stop: bool = True,
                 loss: str | None = None, batch_size: int | None = None) -> None:
        super().__init__(loss=loss, batch_size=batch_size)
        names = tuple(components) if components else DEFAULT_COMPONENTS
        for c in names:
            if attack_entry(c).name == self.name:
                raise RobustcapsError("auto cannot be a component of itself")
        self.components = names
        self.settings = {"steps": steps, "step_size": step_size, "seed": seed,
                         "early_stop": early_stop, "batch_size": batch_size}
        if loss is not None:
            self.settings["loss"] = loss

    def params(self) -> dict[str, Any]:
        return {"components": list(self.components), **self.settings}

    def _component(self, name: str) -> Attack:
        return get_attack(name, **{k: v for k, v in self.settings.items() if v is not None})

    def run(self, adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor,
            epsilons: Sequence[float], targets: torch.Tensor | None = None, *,
            return_adv: bool = False) -> AttackResult:
        eps = check_run(adapter, x, y, epsilons, targets)
        state = _WorstCase(adapter, x, y, eps, targets, return_adv)
        skipped = []
        for name in self.components:
            atk = self._component(name)
            if isinstance(atk, _CapsuleAware) and not is_capsule_model(adapter):
                skipped.append(name)
                continue
            state.attack_with(name, atk)
        return state.result(self, skipped)


def _costs(r: AttackResult) -> tuple[np.ndarray, np.ndarray]:
    """(E, M) forward and backward passes per sample; for attacks that count only batched
    calls (FGSM/BIM natively, the libraries) those counts, charged once (an upper bound)."""
    if "sample_forwards" in r.info:
        return r.info["sample_forwards"], r.info["sample_backwards"]
    fw, bw = (np.zeros(r.success.shape, dtype=np.int64) for _ in range(2))
    top = int(np.argmax(r.epsilons))
    fw[top], bw[top] = r.info.get("forwards", 0), r.info.get("backwards", 0)
    return fw, bw


class _WorstCase:
    """The running worst case: per (epsilon, sample) prediction, norms, breaker, cost."""

    def __init__(self, adapter, x, y, eps, targets, return_adv) -> None:
        self.adapter, self.x, self.y, self.eps, self.targets = adapter, x, y, eps, targets
        e, n = len(eps), x.shape[0]
        self.clean_pred = adapter.predict(x).cpu()
        self.labels = (targets if targets is not None else y).cpu()
        clean_success = self._success(self.clean_pred, self.labels)
        self.adv_pred = self.clean_pred[None].repeat(e, 1)
        self.robust = ~clean_success[None].repeat(e, 1)
        self.linf = torch.zeros(e, n, dtype=torch.float64)
        self.l2 = torch.zeros(e, n, dtype=torch.float64)
        self.broken_by = np.full((e, n), "", dtype=object)
        self.broken_by[:, clean_success.numpy()] = "clean"
        self.fw = np.zeros((e, n), dtype=np.int64)
        self.bw = np.zeros((e, n), dtype=np.int64)
        self.x_adv = x.cpu()[None].repeat(e, *([1] * x.ndim)) if return_adv else None
        self.after: dict[str, list[float]] = {}
        self.seconds: dict[str, float] = {}

    def _success(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return pred == labels if self.targets is not None else pred != labels

    def attack_with(self, name: str, atk: Attack) -> None:
        """Run ``atk`` on the samples still robust at some epsilon; keep its new successes."""
        # eps = 0 cannot be attacked: only robustness at a positive epsilon calls for work
        idx = self.robust[torch.as_tensor(self.eps > 0)].any(dim=0).nonzero().squeeze(1)
        if idx.numel() > 0:
            if hasattr(atk, "sample_index"):
                atk.sample_index = idx.clone()
            t = None if self.targets is None else self.targets[idx]
            r = atk.run(self.adapter, self.x[idx], self.y[idx], self.eps, targets=t,
                        return_adv=self.x_adv is not None)
            self._keep(name, idx, r)
            self.seconds[name] = float(r.info.get("seconds", 0.0))
        ok = self.robust.double().mean(dim=1)
        self.after[name] = (ok if self.targets is None else 1.0 - ok).tolist()

    def _keep(self, name: str, idx: torch.Tensor, r: AttackResult) -> None:
        cols = idx.numpy()
        fw, bw = _costs(r)
        self.fw[:, cols] += np.asarray(fw, dtype=np.int64)
        self.bw[:, cols] += np.asarray(bw, dtype=np.int64)
        new = self.robust[:, idx] & r.success.cpu()
        for e in range(len(self.eps)):
            rows = idx[new[e]]
            self.adv_pred[e, rows] = r.adv_pred[e, new[e]].cpu()
            self.linf[e, rows], self.l2[e, rows] = r.linf[e, new[e]], r.l2[e, new[e]]
            self.broken_by[e, rows.numpy()] = name
            if self.x_adv is not None:
                self.x_adv[e, rows] = r.x_adv[e, new[e]].to(self.x_adv)
            self.robust[e, rows] = False

    def result(self, atk: AutoAttack, skipped: list[str]) -> AttackResult:
        info = {**atk.params(), "broken_by": self.broken_by, "sample_forwards": self.fw,
                "sample_backwards": self.bw, "after": self.after, "skipped": skipped,
                "component_seconds": self.seconds}
        return AttackResult(
            attack=atk.name, backend=atk.backend, targeted=self.targets is not None,
            epsilons=self.eps, y=self.y.cpu(), targets=None if self.targets is None else self.targets.cpu(),
            clean_pred=self.clean_pred, adv_pred=self.adv_pred, success=~self.robust,
            linf=self.linf, l2=self.l2, x_adv=self.x_adv, info=info)
