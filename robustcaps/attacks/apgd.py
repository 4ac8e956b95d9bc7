"""Native APGD and APGD-T (Croce & Hein, ICML 2020), L-inf and L2.

The algorithm follows AutoAttack's ``autopgd_base.py``, per sample:

- start at ``x0 + eps * t / ||t||`` (``t`` uniform in [-1, 1]^d for L-inf, Gaussian for
  L2), projected; step size ``eta = 2 eps``;
- ``z = P(x_k + eta * d(grad))``, ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))``
  with momentum ``a = 0.75`` (1 at the first step), ``d`` the sign (L-inf) or the
  L2-normalised gradient, ``P`` the projection into the ball and the adapter's bounds;
- checkpoints ``w_j`` with gaps ``p = 0.22 N`` decreasing by ``0.03 N`` down to ``0.06 N``
  (``N = steps``); at a checkpoint, a sample whose loss rose in at most ``rho = 0.75`` of
  the gap's steps, or whose step was not halved at the previous checkpoint and whose best
  loss has not improved since, halves ``eta`` and restarts from its best (highest-loss)
  point with that point's gradient. (AutoAttack compares the first step of the first gap
  with a zero-initialised row; here with the loss of the random start, as in the paper.)

``restarts`` new random starts attack the samples still robust. Kept per sample: the first
successful iterate (AutoAttack keeps the last; both are adversarial) or, when no run
succeeds, the highest-loss one. Sweep, ``early_stop`` (which only saves passes: samples
are independent, so dropping fooled ones changes no other sample's run), seeding, the
``info`` cost keys and the ``tracker`` hook: see :mod:`robustcaps.attacks.sweep`.

**Losses.** ``ce`` (cross-entropy on the scores) and ``dlr``, the difference of logits
ratio ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)`` (``z_pi`` the sorted scores), or any
other adapter loss (``cw``, ``margin``, ``spread``). With ``targets`` the attack is
targeted: CE becomes ``-CE(target)``, DLR the targeted DLR
``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``.

**APGD-T** (:class:`APGDT`): untargeted by its success criterion; it runs the targeted
DLR towards each of the ``n_target_classes`` highest-scoring wrong classes of the clean
input in turn (``restarts`` runs each) on the samples still correctly classified.

**Few classes.** DLR's denominator uses the third largest score, so it needs K >= 3
classes; the targeted DLR's uses the third and fourth, K >= 4 (AutoAttack crashes below).
Rule, recorded in ``info["loss_used"]``: with K = 3 the targeted DLR's denominator is
``z_pi1 - z_pi3`` (``dlr-targeted-3``); with K = 2 DLR is replaced by its numerator, the
logit margin (``cw``: ``max_{j != y} z_j - z_y``; ``cw-targeted``: ``z_t - max_{j != t} z_j``).
Not CE: a saturated softmax gives CE an exactly zero float32 gradient, which a random
start in a large ball reaches (measured: APGD-CE left 22.5% of a fitted 2-class model
unfooled at eps 50 in the few-classes test, the margin 0%). APGD-T attacks ``n_target_classes = min(9, K - 1)``
targets by default (AutoAttack's 9 on CIFAR-10; NORB's 5 classes give 4, i.e. every wrong
class); a larger request is capped at K - 1.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import RobustcapsError
from ..models.adapter import LOSSES, ModelAdapter
from ..models.losses import cw_margin
from .sweep import (
    Batch,
    RestartAttack,
    RunOutcome,
    ascent_direction,
    check_norm,
    check_positive_int,
    project_ball,
)

APGD_LOSSES = ("ce", "dlr", *(k for k in LOSSES if k != "ce"))
APGD_DEFAULT_STEPS = 100
MOMENTUM = 0.75


def dlr_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR loss per sample (needs K >= 3): ascend it to misclassify."""
    zs, ind = z.sort(dim=1)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    best_other = torch.where(ind[:, -1] == y, zs[:, -2], zs[:, -1])
    return -(z_y - best_other) / (zs[:, -1] - zs[:, -3] + 1e-12)


def dlr_loss_targeted(z: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss per sample: ascend it to reach ``t`` from ``y``. K >= 4; with
    K = 3 the denominator is ``z_pi1 - z_pi3`` (module docstring)."""
    zs = z.sort(dim=1).values
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z_t = z.gather(1, t[:, None]).squeeze(1)
    low = 0.5 * (zs[:, -3] + zs[:, -4]) if z.shape[1] >= 4 else zs[:, -3]
    return -(z_y - z_t) / (zs[:, -1] - low + 1e-12)


def loss_used(kind: str, num_classes: int, targeted: bool) -> str:
    """The loss actually optimised under the few-classes rule (module docstring)."""
    if kind != "dlr":
        return kind
    if targeted:
        return {2: "cw-targeted", 3: "dlr-targeted-3"}.get(num_classes, "dlr-targeted")
    return "dlr" if num_classes >= 3 else "cw"


def checkpoint_gaps(steps: int) -> tuple[int, int, int]:
    """AutoAttack's ``(p_1 N, decrease, minimum)`` checkpoint gaps in iterations."""
    return max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)


class APGD(RestartAttack):
    """Auto-PGD with the CE or DLR loss (untargeted, or targeted given ``targets``).

    Args:
        loss: ``ce`` (default), ``dlr`` or another adapter loss (``cw``, ``margin``, ``spread``).
        norm: ``linf`` (default) or ``l2``.
        steps: iterations per run (default 100, AutoAttack's).
        restarts: random starts (default 1).
        rho: the checkpoints' oscillation threshold (default 0.75).
        seed, early_stop, tracker, batch_size: see :mod:`robustcaps.attacks.sweep`.
    """

    name = "apgd"

    def __init__(self, *, loss: str = "ce", norm: str = "linf", steps: int = APGD_DEFAULT_STEPS,
                 restarts: int = 1, rho: float = 0.75, seed: int = 0, early_stop: bool = True,
                 tracker: Any = None, batch_size: int | None = None) -> None:
        super().__init__(seed=seed, early_stop=early_stop, tracker=tracker, batch_size=batch_size)
        if loss not in APGD_LOSSES:
            raise RobustcapsError(f"loss must be one of {', '.join(APGD_LOSSES)}, got {loss!r}")
        if not 0.0 < float(rho) < 1.0:
            raise RobustcapsError(f"rho must lie in (0, 1), got {rho!r}")
        self.loss = loss
        self.norm = check_norm(norm)
        self.steps = check_positive_int("steps", steps)
        self.restarts = check_positive_int("restarts", restarts)
        self.rho = float(rho)

    def params(self) -> dict[str, Any]:
        return {"loss": self.loss, "norm": self.norm, "steps": self.steps,
                "restarts": self.restarts, "rho": self.rho, "seed": self.seed,
                "early_stop": self.early_stop}

    def _check_model(self, adapter: ModelAdapter, targeted: bool) -> None:
        if adapter.num_classes is None or adapter.num_classes < 2:
            raise RobustcapsError(f"{self.name} needs a model with >= 2 classes, got {adapter.num_classes}")

    def _batch_info(self, b: Batch) -> dict[str, Any]:
        return {"loss_used": loss_used(self.loss, b.adapter.num_classes, b.targeted)}

    def _prepare(self, b: Batch, rows, clean_scores, target_rank) -> None:
        b.loss_fn = self._loss_fn(b, loss_used(self.loss, b.adapter.num_classes, b.targeted),
                                  b.targets)

    @staticmethod
    def _loss_fn(b: Batch, kind: str, targets: torch.Tensor | None):
        """``loss_fn(scores, rows)`` for the loss ``kind`` (targets: batch-long or None)."""
        def fn(s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            if kind == "dlr":
                return dlr_loss(s, b.y[r])
            if kind.startswith("dlr-targeted"):
                return dlr_loss_targeted(s, b.y[r], targets[r])
            if kind == "cw-targeted":
                return -cw_margin(s, targets[r])
            return b.adapter.loss(s, b.labels[r], targeted=b.targeted, kind=kind)

        return fn

    def _single(self, b: Batch, rows: torch.Tensor, eps: float, run: int) -> RunOutcome:
        return _APGDRun(self, b, rows, eps, run).run()


class APGDT(APGD):
    """APGD-T: the targeted DLR towards each of the top wrong classes in turn.

    Untargeted (success = misclassification) when ``run`` gets no ``targets``; with
    ``targets`` it is APGD with the targeted DLR towards them.

    Args:
        n_target_classes: wrong classes to try, by clean score (default ``min(9, K - 1)``,
            always capped at K - 1).
        restarts: runs per target class (default 1).
        Other arguments as :class:`APGD` (the loss is DLR).
    """

    name = "apgd-t"

    def __init__(self, *, n_target_classes: int | None = None, norm: str = "linf",
                 steps: int = APGD_DEFAULT_STEPS, restarts: int = 1, rho: float = 0.75,
                 seed: int = 0, early_stop: bool = True, tracker: Any = None,
                 batch_size: int | None = None) -> None:
        super().__init__(loss="dlr", norm=norm, steps=steps, restarts=restarts, rho=rho,
                         seed=seed, early_stop=early_stop, tracker=tracker, batch_size=batch_size)
        if n_target_classes is not None:
            check_positive_int("n_target_classes", n_target_classes)
        self.n_target_classes = n_target_classes

    def params(self) -> dict[str, Any]:
        return {**super().params(), "n_target_classes": self.n_target_classes}

    def targets_for(self, num_classes: int) -> int:
        n = min(9, num_classes - 1) if self.n_target_classes is None else self.n_target_classes
        return max(1, min(n, num_classes - 1))

    def _batch_info(self, b: Batch) -> dict[str, Any]:
        k = b.adapter.num_classes
        return {"loss_used": loss_used("dlr", k, True),
                "n_target_classes_used": 1 if b.targeted else self.targets_for(k)}

    def _runs(self, b: Batch) -> list[tuple[int, int | None]]:
        if b.targeted:
            return [(r, None) for r in range(self.restarts)]
        ranks = range(2, self.targets_for(b.adapter.num_classes) + 2)
        # run numbers differ per target so that every run has its own random start
        return [(i * self.restarts + r, rank) for i, rank in enumerate(ranks)
                for r in range(self.restarts)]

    def _prepare(self, b: Batch, rows, clean_scores, target_rank) -> None:
        kind = loss_used("dlr", b.adapter.num_classes, True)
        if target_rank is None:
            b.loss_fn = self._loss_fn(b, kind, b.targets)
            return
        # the rank-th highest clean score (rank 2: the best wrong class of a correct sample)
        t = clean_scores.sort(dim=1).indices[:, -target_rank]
        b.loss_fn = self._loss_fn(b, kind, t)


class _APGDRun:
    """One APGD run on the batch rows ``rows`` (state per run sample)."""

    def __init__(self, atk: APGD, b: Batch, rows: torch.Tensor, eps: float, run: int) -> None:
        self.atk, self.b, self.rows, self.eps, self.run_no = atk, b, rows, eps, run
        self.x0 = b.x[rows]
        self.m = len(rows)
        dev, dt = self.x0.device, self.x0.dtype
        self.done = torch.zeros(self.m, dtype=torch.bool, device=dev)
        self.keep_x = self.x0.clone()
        self.keep_pred = torch.zeros(self.m, dtype=torch.long, device=dev)
        self.keep_loss = torch.full((self.m,), float("-inf"), dtype=dt, device=dev)

    def _active(self) -> torch.Tensor:
        if self.atk.early_stop:
            return (~self.done).nonzero().squeeze(1)
        return torch.arange(self.m, device=self.x0.device)

    def _observe(self, step: int, act: torch.Tensor, xa: torch.Tensor, need_grad: bool):
        """Evaluate the iterates ``xa`` of run samples ``act``; keep first successes."""
        loss, grad, s = self.b.evaluate(xa, self.rows[act], need_grad=need_grad)
        pred = s.argmax(dim=1)
        succ = self.b.success(pred, self.rows[act])
        open_ = ~self.done[act]
        take = open_ & (succ | (loss > self.keep_loss[act]))
        t = act[take]
        self.keep_x[t], self.keep_pred[t], self.keep_loss[t] = xa[take], pred[take], loss[take]
        self.done[act[open_ & succ]] = True
        self.b.track(step, act, loss, grad, succ, self.atk.norm)
        return loss, grad

    def _proj(self, x: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return project_ball(x, self.x0[act], self.eps, self.atk.norm, self.b.adapter.bounds)

    def run(self) -> RunOutcome:
        steps = self.atk.steps
        xa = self.atk._start(self.b, self.rows, self.eps, self.run_no, "autoattack")
        loss, grad = self._observe(0, torch.arange(self.m, device=xa.device), xa, need_grad=True)
        # The highest-loss point (where halving restarts from) is tracked apart from the
        # kept output: the output freezes at the first success, the search does not.
        self.x_best, self.loss_best, self.grad_best = xa.clone(), loss.clone(), grad.clone()
        self.history = [loss.clone()]
        self.eta = torch.full((self.m,), 2.0 * self.eps, dtype=xa.dtype, device=xa.device)
        self.gap, self.since, self.last_best = checkpoint_gaps(steps)[0], 0, loss.clone()
        self.reduced = torch.ones(self.m, dtype=torch.bool, device=xa.device)
        x_old = xa.clone()
        for i in range(steps):
            act = self._active()
            if act.numel() == 0:
                break
            with torch.no_grad():
                new = self._step(xa[act], x_old[act], grad[act], self.eta[act], act,
                                 1.0 if i == 0 else MOMENTUM)
                x_old[act], xa[act] = xa[act], new
            last = i == steps - 1
            loss, g = self._observe(i + 1, act, xa[act], need_grad=not last)
            if g is not None:
                grad[act] = g
            self._record(act, xa, loss, g)
            self.since += 1
            if self.since == self.gap and not last:
                self._halve(xa, grad)
        return RunOutcome(self.keep_x, self.keep_pred, self.keep_loss, self.done)

    def _record(self, act, xa, loss, g) -> None:
        """Loss history (for the oscillation count) and the highest-loss point."""
        cur = self.history[-1].clone()
        cur[act] = loss
        self.history.append(cur)
        up = loss > self.loss_best[act]
        t = act[up]
        self.x_best[t], self.loss_best[t] = xa[t], loss[up]
        if g is not None:
            self.grad_best[t] = g[up]

    def _halve(self, xa, grad) -> None:
        """A checkpoint: halve the step of the samples that need it and send them back to
        their best point; the next gap is shorter."""
        halve = self._checkpoint(self.history, self.gap, self.loss_best, self.last_best, self.reduced)
        self.reduced, self.last_best = halve, self.loss_best.clone()
        self.eta[halve] /= 2.0
        xa[halve], grad[halve] = self.x_best[halve], self.grad_best[halve]
        _, decrease, min_gap = checkpoint_gaps(self.atk.steps)
        self.gap, self.since = max(self.gap - decrease, min_gap), 0

    def _step(self, x, x_prev, grad, eta, act, a) -> torch.Tensor:
        view = eta.view(-1, *([1] * (x.ndim - 1)))
        z = self._proj(x + view * ascent_direction(grad, self.atk.norm), act)
        return self._proj(x + a * (z - x) + (1.0 - a) * (x - x_prev), act)

    def _checkpoint(self, history, gap, loss_best, last_best, reduced) -> torch.Tensor:
        """Which samples halve their step: too few loss increases over the last ``gap``
        steps, or no halving last time and no improvement since."""
        ups = sum((history[-1 - c] > history[-2 - c]).to(torch.int64) for c in range(gap))
        oscillating = ups <= gap * self.atk.rho
        stalled = ~reduced & (last_best >= loss_best)
        return oscillating | stalled
