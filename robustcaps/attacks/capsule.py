"""Capsule-aware attacks: gradients from a routing surrogate, judgement on the true model.

EM routing computes the assignment probabilities R by iterating; their dependence on the
input is where gradients can vanish or point nowhere (R saturates to 0/1). These attacks
change only where the *gradient* comes from (:func:`robustcaps.models.em_routing.routing_surrogate`):

- ``pgd-bpda`` / ``apgd-bpda``: routing-BPDA. The forward is the true routing bit for bit;
  the backward holds every R constant, so the gradient flows through the votes, means,
  variances and activations but not through R's dependence on them (bypassed: the
  derivative of the routing's fixed-point iteration). ``apgd-bpda`` is APGD on the run's
  loss (CE by default, the logit margin with ``--loss cw``).
- ``vote-attack`` (Gu, Wu & Tresp, ICLR 2021, carried over to EM routing): the routing of
  the chosen layers (default every routing layer) is replaced by one M-step with uniform
  assignment, i.e. the votes averaged with the child activations as weights (bypassed:
  the routing entirely). The scores used by the attack are *straight-through*: their value
  is the true network's, their gradient the surrogate's (``true + (surr - surr.detach())``),
  so the loss values APGD steers by and every success check are the true network's.

Why the evaluation stays sound: a surrogate only proposes perturbations. Every returned
example lies in the eps-ball (the inner attack projects), and its prediction, success and
norms are recomputed on the true model, without any surrogate, after the attack
(:func:`robustcaps.attacks.transfer.evaluate_on`). A surrogate can thus only make an attack
weaker or stronger, never report a success the true model does not confirm.

Only EM-routing capsule networks (models with ``routing_layers()``) are accepted; other
models get a one-line error (the ``auto`` attack skips these components for them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import RobustcapsError
from ..models.adapter import ModelAdapter
from .apgd import APGD
from .base import Attack, AttackResult
from .pgd import PGD
from .registry import accepted_parameters, register_attack
from .transfer import evaluate_on


def is_capsule_model(adapter: ModelAdapter) -> bool:
    """Whether ``adapter`` wraps a robustcaps EM-routing network (it names its routing layers)."""
    return callable(getattr(adapter.model, "routing_layers", None))


class SurrogateAdapter(ModelAdapter):
    """``adapter`` whose differentiated scores come from ``routing_surrogate(mode, layers)``.

    Without a gradient (predictions) it is the true model. With one: ``bpda`` modes keep the
    true forward (the surrogate changes only the backward); ``uniform`` returns the true
    scores with the surrogate's gradient (straight-through)."""

    def __init__(self, adapter: ModelAdapter, mode: str, layers: Sequence[str] | None) -> None:
        self.__dict__.update(adapter.__dict__)
        routing = adapter.model.routing_layers()
        unknown = [n for n in layers or () if n not in routing]
        if unknown:
            raise RobustcapsError(f"unknown routing layer(s) {unknown}; known: {', '.join(routing)}")
        self.mode = mode
        self.layers = None if layers is None else [routing[n] for n in layers]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        from ..models.em_routing import routing_surrogate

        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().scores(x)
        with routing_surrogate(self.mode, self.layers):
            s = super().scores(x)
        if self.mode.startswith("bpda"):
            return s
        with torch.no_grad():
            true = super().scores(x)
        return true + (s - s.detach())

    __call__ = scores


class _CapsuleAware(Attack):
    """An inner native attack run on a :class:`SurrogateAdapter`, judged on the true model."""

    mode = "bpda"
    #: the evaluation plans no unit of this attack for other models (a documented skip)
    capsule_only = True
    default_layers: tuple[str, ...] | None = None

    inner_cls: type = APGD

    def __init__(self, *, layers: Sequence[str] | None = None, steps: int | None = None,
                 step_size: float | None = None, restarts: int = 1, seed: int = 0,
                 early_stop: bool = True, loss: str | None = None,
                 batch_size: int | None = None) -> None:
        super().__init__(loss=loss, batch_size=batch_size)
        self.layers = tuple(layers) if layers is not None else self.default_layers
        settings = {"steps": steps, "step_size": step_size, "restarts": restarts, "seed": seed,
                    "early_stop": early_stop, "loss": loss, "batch_size": batch_size}
        # None: the inner attack's own default (PGD 50 steps, APGD 100; APGD has no step size)
        self.inner = self.inner_cls(**{k: v for k, v in settings.items()
                                       if k in accepted_parameters(self.inner_cls) and
                                       (v is not None or k == "loss")})

    @property
    def sample_index(self):
        return self.inner.sample_index

    @sample_index.setter
    def sample_index(self, value) -> None:
        self.inner.sample_index = value

    def params(self) -> dict[str, Any]:
        return {**self.inner.params(), "surrogate": self.mode,
                "layers": None if self.layers is None else list(self.layers)}

    def run(self, adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor,
            epsilons: Sequence[float], targets: torch.Tensor | None = None, *,
            return_adv: bool = False) -> AttackResult:
        if not is_capsule_model(adapter):
            raise RobustcapsError(f"attack {self.name} needs an EM-routing capsule network; "
                                  f"model {adapter.name!r} has no routing layers")
        surrogate = SurrogateAdapter(adapter, self.mode, self.layers)
        crafted = self.inner.run(surrogate, x, y, epsilons, targets=targets, return_adv=True)
        judged = evaluate_on(adapter, crafted, x.cpu(), adapter.name, self.batch_size,
                             return_adv=return_adv)
        info = {**crafted.info, **self.params(),
                "surrogate_successes": int(crafted.success.sum()),
                "true_successes": int(judged.success.sum())}
        return dataclasses.replace(judged, attack=self.name, backend=self.backend, info=info)


@register_attack("pgd-bpda", description="capsules: PGD with routing-BPDA gradients (R held "
                 "constant in the backward), judged on the true model")
class PGDBPDA(_CapsuleAware):
    name = "pgd-bpda"
    inner_cls = PGD


@register_attack("apgd-bpda", description="capsules: APGD (run's loss) with routing-BPDA "
                 "gradients, judged on the true model")
class APGDBPDA(_CapsuleAware):
    name = "apgd-bpda"


@register_attack("vote-attack", description="capsules: APGD on the vote surrogate (uniform "
                 "one-M-step routing), true values straight-through, judged on the true model")
class VoteAttack(_CapsuleAware):
    name = "vote-attack"
    mode = "uniform"
