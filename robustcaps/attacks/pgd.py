"""Native PGD (Madry et al. 2018), L-inf and L2, untargeted and targeted.

Per epsilon and restart: a random start uniform in the ball (L2: uniform in the ball,
not on its sphere), then ``steps`` iterations of
``x <- P(x + alpha * d(grad))`` with ``d`` the sign (L-inf) or the L2-normalised gradient
(L2) of the adapter's attack loss (``loss=``: ``ce``, ``cw``, ``margin``, ``spread``;
targeted attacks ascend minus the target's loss), ``P`` the projection into the ball and
then the adapter's bounds when it declares them (unbounded inputs have none). Default
``alpha = 2.5 * eps / steps`` (Madry et al.'s rule: the iterate can cross the ball and
come back). Every iterate, the random start included, is evaluated; per sample the first
successful one is kept, or the highest-loss one over all steps and restarts when none
succeeds. Restarts only attack the samples not yet fooled.

The epsilon sweep, ``early_stop``, seeding, cost accounting (``info`` keys) and the
``tracker`` hook are those of :mod:`robustcaps.attacks.sweep`: in short, with
``early_stop=True`` (default) a sample leaves the batch once fooled and its example is
reused for larger epsilons; ``False`` runs every step for every sample (the examples kept
are the same, the cost is not) and attacks every epsilon afresh. ``tracker(step, loss,
grad_norm, success)`` is called after every pass (``grad_norm``: L1 norm of the gradient
for L-inf, L2 norm for L2).

A run costs ``steps`` forward+backward passes plus one forward (the last iterate needs no
gradient) per sample still attacked.

For an unbounded sanity check (a huge eps) prefer ``loss="cw"``: a random start far out
in the ball can land where the softmax saturates and the float32 CE gradient is exactly
zero (measured on the tests' fitted MLP at eps 100: PGD-CE left 7.5% unfooled, the
CW margin 0%).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import RobustcapsError
from .sweep import (
    Batch,
    RestartAttack,
    RunOutcome,
    ascent_direction,
    check_norm,
    check_positive_int,
    project_ball,
)

#: total PGD travel ``steps * alpha`` as a multiple of eps when no step size is given
PGD_TRAVEL = 2.5
PGD_DEFAULT_STEPS = 50


class PGD(RestartAttack):
    """Projected gradient descent with random starts.

    Args:
        norm: ``linf`` (default) or ``l2``; epsilons are radii in that norm.
        steps: iterations per run (default 50).
        step_size: absolute step ``alpha``; default ``2.5 * eps / steps``.
        restarts: random starts per epsilon (default 1).
        random_start: False starts at the clean input (then restarts repeat the same run).
        seed: seeds every sample's random starts (see :mod:`robustcaps.attacks.sweep`).
        early_stop: drop fooled samples from the batch and reuse their example for larger
            epsilons (default True).
        tracker: per-iteration hook, see :mod:`robustcaps.attacks.sweep`.
        loss: adapter loss (``ce``, ``cw``, ``margin``, ``spread``); default the adapter's.
        batch_size: samples per batch (default all).
    """

    name = "pgd"

    def __init__(self, *, norm: str = "linf", steps: int = PGD_DEFAULT_STEPS,
                 step_size: float | None = None, restarts: int = 1, random_start: bool = True,
                 seed: int = 0, early_stop: bool = True, tracker: Any = None,
                 loss: str | None = None, batch_size: int | None = None) -> None:
        super().__init__(seed=seed, early_stop=early_stop, tracker=tracker, loss=loss,
                         batch_size=batch_size)
        self.norm = check_norm(norm)
        self.steps = check_positive_int("steps", steps)
        self.restarts = check_positive_int("restarts", restarts)
        if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
            raise RobustcapsError(f"step_size must be a positive number, got {step_size!r}")
        self.step_size = None if step_size is None else float(step_size)
        self.random_start = bool(random_start)

    def params(self) -> dict[str, Any]:
        return {"loss": self.loss, "norm": self.norm, "steps": self.steps,
                "step_size": self.step_size, "restarts": self.restarts,
                "random_start": self.random_start, "seed": self.seed,
                "early_stop": self.early_stop}

    def alpha(self, eps: float) -> float:
        return self.step_size if self.step_size is not None else PGD_TRAVEL * eps / self.steps

    def _prepare(self, b: Batch, rows, clean_scores, target_rank) -> None:
        kind = self.loss

        def loss_fn(scores: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return b.adapter.loss(scores, b.labels[r], targeted=b.targeted, kind=kind)

        b.loss_fn = loss_fn

    def _single(self, b: Batch, rows: torch.Tensor, eps: float, run: int) -> RunOutcome:
        x0 = b.x[rows]
        xa = self._start(b, rows, eps, run, "ball") if self.random_start else x0.clone()
        m, alpha = len(rows), self.alpha(eps)
        keep_x = xa.clone()
        keep_pred = torch.zeros(m, dtype=torch.long, device=xa.device)
        keep_loss = torch.full((m,), float("-inf"), dtype=xa.dtype, device=xa.device)
        done = torch.zeros(m, dtype=torch.bool, device=xa.device)
        for step in range(self.steps + 1):
            act = (~done).nonzero().squeeze(1) if self.early_stop else torch.arange(m, device=xa.device)
            if act.numel() == 0:
                break
            last = step == self.steps
            loss, grad, s = b.evaluate(xa[act], rows[act], need_grad=not last)
            pred = s.argmax(dim=1)
            succ = b.success(pred, rows[act])
            # A sample keeps its first success; until then, its highest-loss iterate.
            open_ = ~done[act]
            take = open_ & (succ | (loss > keep_loss[act]))
            t = act[take]
            keep_x[t], keep_pred[t], keep_loss[t] = xa[act][take], pred[take], loss[take]
            done[act[open_ & succ]] = True
            b.track(step, act, loss, grad, succ, self.norm)
            if last:
                break
            with torch.no_grad():
                stepped = xa[act] + alpha * ascent_direction(grad, self.norm)
                xa[act] = project_ball(stepped, x0[act], eps, self.norm, b.adapter.bounds)
        return RunOutcome(keep_x, keep_pred, keep_loss, done)
