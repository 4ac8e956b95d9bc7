"""Shared machinery of the restart-based native attacks (PGD, APGD, APGD-T).

Each attack runs per batch, per epsilon (in increasing order), per *run* (a restart, and
for APGD-T a target class) on the samples that are still robust, and keeps per sample
the first successful iterate or, when no run succeeds, the highest-loss iterate.

**Seeding.** Random starts come from a ``torch.Generator`` seeded per sample from
``(seed, global sample index, epsilon, run number)`` (numpy ``SeedSequence``), where the
global index is the sample's row in the ``x`` given to ``run``. A fixed seed thus gives
the same start for a sample whatever the batch size or the other epsilons of the sweep.

**Clean successes.** Samples already misclassified (untargeted) or already at their
target (targeted) are not attacked: their clean input is returned at no cost.

**Cost.** ``info["forwards"]`` / ``info["backwards"]`` count batched model calls (as for
native BIM); ``info["sample_forwards"]`` / ``info["sample_backwards"]`` are (E, N) int64
arrays: the passes each sample took at each epsilon (the shared clean pass excluded).

**Tracker.** ``tracker`` (optional) is any callable
``tracker(step, loss, grad_norm, success)``, called after every model pass of a run:
``step`` (int, 0 = the random start) and three tensors over the run's samples (stable
length within a run): ``loss`` (float, the attack loss of the current iterate),
``grad_norm`` (float, the dual norm of its gradient: L1 for L-inf attacks, L2 for L2;
NaN at the last step, which needs no gradient) and ``success`` (bool, the current iterate
succeeds). A sample that stopped early reads loss/grad_norm NaN and success True. If the
tracker has a ``begin(context)`` method it is called before each run with a dict:
``attack``, ``eps``, ``run`` (restart number), ``target_rank`` (APGD-T, else None) and
``index`` (the global sample indices of the run's samples). :class:`HistoryTracker`
records everything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import RobustcapsError
from ..models.adapter import ModelAdapter
from .base import Attack, AttackResult
from .native import _concat, _is_success, _result, check_epsilons, check_inputs, check_targets

NORMS = ("linf", "l2")


def check_norm(norm: str) -> str:
    norm = str(norm).lower().replace("-", "")
    if norm in ("inf", "linfinity"):
        norm = "linf"
    if norm not in NORMS:
        raise RobustcapsError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return norm


def check_positive_int(name: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise RobustcapsError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view(-1, *([1] * (ndim - 1)))


def flat_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    """(N, ...) -> (N,) L-inf or L2 norms."""
    f = v.flatten(1)
    if f.shape[1] == 0:
        return f.new_zeros(f.shape[0])
    return f.abs().amax(dim=1) if norm == "linf" else f.norm(dim=1)


def dual_norm(g: torch.Tensor, norm: str) -> torch.Tensor:
    """The norm that measures a gradient's first-order gain in a ``norm`` ball."""
    f = g.flatten(1)
    return f.abs().sum(dim=1) if norm == "linf" else f.norm(dim=1)


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest ascent for a unit step: sign (L-inf) or the L2-normalised gradient."""
    grad = torch.nan_to_num(grad, nan=0.0)  # a NaN gradient must not become a NaN input
    if norm == "linf":
        return grad.sign()
    return grad / _per_sample(flat_norm(grad, "l2").clamp_min(1e-12), grad.ndim)


def project_ball(x: torch.Tensor, x0: torch.Tensor, eps: float, norm: str,
                 bounds: tuple[float, float] | None) -> torch.Tensor:
    """Project into the ``norm`` ball of radius ``eps`` around ``x0``, then the bounds.

    Clamping to a box that contains ``x0`` only shrinks every coordinate of the
    perturbation, so the result stays in the ball."""
    d = x - x0
    if norm == "linf":
        d = d.clamp(-eps, eps)
    else:
        n = flat_norm(d, "l2")
        d = d * _per_sample(torch.clamp(eps / n.clamp_min(1e-12), max=1.0), d.ndim)
    x = x0 + d
    return x if bounds is None else x.clamp(*bounds)


def sample_generator(seed: int, index: int, eps: float, run: int) -> torch.Generator:
    """The generator of one sample's random start (see the module docstring)."""
    eps_bits = int(np.float64(eps).view(np.uint64))
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index), eps_bits, int(run)])
    return torch.Generator().manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] >> 1))


def random_start(shape: Sequence[int], index: torch.Tensor, seed: int, eps: float, run: int,
                 norm: str, mode: str) -> torch.Tensor:
    """(M, *shape) perturbations on the CPU, one generator per sample.

    ``mode="ball"``: uniform in the ball (L2: direction uniform, radius ``eps u^(1/d)``);
    ``mode="autoattack"``: AutoAttack's start, ``eps * t / ||t||`` with ``t`` uniform in
    [-1, 1] (L-inf) or Gaussian (L2), i.e. on the sphere of the norm.
    """
    d = int(np.prod(shape))
    out = torch.empty(len(index), d, dtype=torch.float64)
    for row, i in enumerate(index.tolist()):
        g = sample_generator(seed, i, eps, run)
        if norm == "linf":
            t = 2.0 * torch.rand(d, generator=g, dtype=torch.float64) - 1.0
            out[row] = eps * (t if mode == "ball" else t / t.abs().max().clamp_min(1e-12))
        else:
            t = torch.randn(d, generator=g, dtype=torch.float64)
            r = eps * (float(torch.rand(1, generator=g, dtype=torch.float64)) ** (1.0 / d)
                       if mode == "ball" else 1.0)
            out[row] = r * t / t.norm().clamp_min(1e-12)
    return out.view(len(index), *shape)


class HistoryTracker:
    """A tracker that records every call: ``runs`` is a list of dicts with the run's
    ``context`` and ``steps``/``loss``/``grad_norm``/``success`` lists (CPU tensors)."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []

    def begin(self, context: dict[str, Any]) -> None:
        self.runs.append({"context": context, "steps": [], "loss": [], "grad_norm": [],
                          "success": []})

    def __call__(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
                 success: torch.Tensor) -> None:
        if not self.runs:
            self.begin({})
        run = self.runs[-1]
        run["steps"].append(int(step))
        run["loss"].append(loss.detach().cpu())
        run["grad_norm"].append(grad_norm.detach().cpu())
        run["success"].append(success.detach().cpu())


class Batch:
    """One batch under attack: inputs, labels, costs, the tracker and the loss to ascend.

    ``loss_fn(scores, rows) -> (M,)`` is the attack loss of the batch rows ``rows``."""

    def __init__(self, attack: RestartAttack, adapter: ModelAdapter, x: torch.Tensor,
                 y: torch.Tensor, targets: torch.Tensor | None, offset: int, n_eps: int) -> None:
        dev = adapter.device
        self.adapter, self.attack, self.offset = adapter, attack, offset
        self.x = x.to(device=dev, dtype=adapter.dtype)
        self.y = y.to(dev)
        self.targets = None if targets is None else targets.to(dev)
        self.targeted = targets is not None
        self.labels = self.targets if self.targeted else self.y
        n = x.shape[0]
        self.fw = torch.zeros(n_eps, n, dtype=torch.int64)
        self.bw = torch.zeros(n_eps, n, dtype=torch.int64)
        self.calls = {"forwards": 0, "backwards": 0}
        self.e = 0  # the epsilon row being attacked
        self.loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self._run_rows: torch.Tensor | None = None

    def success(self, pred: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return _is_success(pred, self.labels[rows], self.targeted)

    def evaluate(self, xa: torch.Tensor, rows: torch.Tensor, need_grad: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(loss (M,), gradient or None, scores) at ``xa`` for batch rows ``rows``."""
        self.fw[self.e, rows.cpu()] += 1
        self.calls["forwards"] += 1
        if not need_grad:
            with torch.no_grad():
                s = self.adapter.scores(xa)
                return self.loss_fn(s, rows), None, s
        self.bw[self.e, rows.cpu()] += 1
        self.calls["backwards"] += 1
        xg = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            s = self.adapter.scores(xg)
            value = self.loss_fn(s, rows)
            (grad,) = torch.autograd.grad(value.sum(), xg)
        return value.detach(), grad.detach(), s.detach()

    def begin(self, rows: torch.Tensor, eps: float, run: int, target_rank: int | None) -> None:
        self._run_rows = rows
        tracker = self.attack.tracker
        if tracker is not None and hasattr(tracker, "begin"):
            tracker.begin({"attack": self.attack.name, "eps": float(eps), "run": int(run),
                           "target_rank": target_rank,
                           "index": (rows.cpu() + self.offset).clone()})

    def track(self, step: int, act: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor | None,
              succ: torch.Tensor, norm: str) -> None:
        """Report one pass over the run positions ``act`` to the tracker (if any)."""
        tracker = self.attack.tracker
        if tracker is None:
            return
        m = len(self._run_rows)
        dev = loss.device
        full_loss = torch.full((m,), float("nan"), dtype=loss.dtype, device=dev)
        full_gn = torch.full_like(full_loss, float("nan"))
        full_succ = torch.ones(m, dtype=torch.bool, device=dev)
        full_loss[act], full_succ[act] = loss, succ
        if grad is not None:
            full_gn[act] = dual_norm(grad, norm).to(loss.dtype)
        tracker(step, full_loss, full_gn, full_succ)


class RunOutcome:
    """What one run returns per run sample: the kept point, its prediction and loss, and
    whether it succeeded."""

    def __init__(self, x: torch.Tensor, pred: torch.Tensor, loss: torch.Tensor,
                 success: torch.Tensor) -> None:
        self.x, self.pred, self.loss, self.success = x, pred, loss, success


class RestartAttack(Attack):
    """Base of PGD/APGD: batches, the epsilon sweep, restarts and result assembly.

    Subclasses implement :meth:`_runs` (the run keys) and :meth:`_single` (one run)."""

    backend = "native"
    norm = "linf"

    def __init__(self, *, seed: int = 0, early_stop: bool = True, tracker: Any = None,
                 loss: str | None = None, batch_size: int | None = None) -> None:
        super().__init__(loss=loss, batch_size=batch_size)
        if tracker is not None and not callable(tracker):
            raise RobustcapsError("tracker must be callable: tracker(step, loss, grad_norm, success)")
        self.seed = int(seed)
        self.early_stop = bool(early_stop)
        self.tracker = tracker

    def run(self, adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor,
            epsilons: Sequence[float], targets: torch.Tensor | None = None, *,
            return_adv: bool = False) -> AttackResult:
        eps = check_epsilons(epsilons)
        check_inputs(adapter, x, y)
        check_targets(adapter, y, targets)
        self._check_model(adapter, targets is not None)
        t0 = time.perf_counter()
        bs = self.batch_size or max(1, x.shape[0])
        parts = []
        for i in range(0, max(1, x.shape[0]), bs):
            sl = slice(i, i + bs)
            batch = Batch(self, adapter, x[sl], y[sl], None if targets is None else targets[sl],
                          i, len(eps))
            parts.append(self._sweep(batch, eps, return_adv))
        res = parts[0] if len(parts) == 1 else _concat(parts)
        res.info.update(self.params())
        res.info["seconds"] = time.perf_counter() - t0
        return res

    def _check_model(self, adapter: ModelAdapter, targeted: bool) -> None:
        """Reject or adapt to models the attack cannot handle (e.g. too few classes)."""

    def _sweep(self, b: Batch, eps: np.ndarray, return_adv: bool) -> AttackResult:
        x, n = b.x, b.x.shape[0]
        with torch.no_grad():
            clean_scores = b.adapter.scores(x)
        b.calls["forwards"] += 1
        clean_pred = clean_scores.argmax(dim=1)
        clean_ok = b.success(clean_pred, torch.arange(n, device=x.device))
        found, best_x, best_pred = clean_ok.clone(), x.clone(), clean_pred.clone()
        adv_pred = torch.empty(len(eps), n, dtype=torch.long, device=x.device)
        xs: list[torch.Tensor | None] = [None] * len(eps)
        for e in np.argsort(eps, kind="stable"):
            b.e, epsilon = int(e), float(eps[e])
            carry = found if self.early_stop else clean_ok
            out_x = torch.where(_per_sample(carry, x.ndim), best_x, x)
            out_pred = torch.where(carry, best_pred, clean_pred)
            if epsilon > 0.0:
                out_x, out_pred = self._attack_eps(b, epsilon, clean_scores, ~carry, out_x, out_pred)
            xs[e], adv_pred[e] = out_x, out_pred
            newly = b.success(out_pred, torch.arange(n, device=x.device)) & ~found
            best_x[newly], best_pred[newly] = out_x[newly], out_pred[newly]
            found |= newly
        info = {**b.calls, "sample_forwards": b.fw.numpy(), "sample_backwards": b.bw.numpy()}
        info.update(self._batch_info(b))
        return _result(self.name, self.backend, b.targeted, eps, x, b.y, b.targets, clean_pred,
                       adv_pred, xs, return_adv, info, b.labels)

    def _attack_eps(self, b: Batch, eps: float, clean_scores: torch.Tensor, todo: torch.Tensor,
                    out_x: torch.Tensor, out_pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All runs at one epsilon on the rows ``todo``; keep successes, else the best loss."""
        best_loss = torch.full((b.x.shape[0],), float("-inf"), dtype=b.x.dtype, device=b.x.device)
        for run, target_rank in self._runs(b):
            rows = todo.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            b.begin(rows, eps, run, target_rank)
            self._prepare(b, rows, clean_scores, target_rank)
            r = self._single(b, rows, eps, run)
            better = r.success | (r.loss > best_loss[rows])
            take = rows[better]
            out_x[take], out_pred[take], best_loss[take] = r.x[better], r.pred[better], r.loss[better]
            todo[rows[r.success]] = False
        return out_x, out_pred

    def _runs(self, b: Batch) -> list[tuple[int, int | None]]:
        """(run number, target rank) pairs, in order."""
        return [(r, None) for r in range(self.restarts)]

    def _prepare(self, b: Batch, rows: torch.Tensor, clean_scores: torch.Tensor,
                 target_rank: int | None) -> None:
        """Set ``b.loss_fn`` for the next run."""

    def _batch_info(self, b: Batch) -> dict[str, Any]:
        return {}

    def _start(self, b: Batch, rows: torch.Tensor, eps: float, run: int, mode: str) -> torch.Tensor:
        x0 = b.x[rows]
        delta = random_start(x0.shape[1:], rows.cpu() + b.offset, self.seed, eps, run, self.norm, mode)
        return project_ball(x0 + delta.to(x0), x0, eps, self.norm, b.adapter.bounds)

    def _single(self, b: Batch, rows: torch.Tensor, eps: float, run: int) -> RunOutcome:  # pragma: no cover
        raise NotImplementedError
