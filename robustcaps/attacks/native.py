"""Native FGSM and BIM epsilon sweeps: the fast engine (default backend).

Both attacks ascend the adapter's per-sample attack loss (``adapter.loss``; CE on the
scores by default, see :mod:`robustcaps.models.adapter`) w.r.t. the input and stay in
the L-infinity ball of radius ``eps`` around the clean input and, when the adapter
declares them, inside its input bounds. Epsilons are in the model's input space.

Why the sweep is fast:

- **FGSM** (Goodfellow et al. 2014): ``x_adv = clip(x + eps * sign(grad))``. The sign does
  not depend on ``eps``, so a sweep costs one forward+backward plus one forward per
  non-zero epsilon (``eps = 0`` reuses the clean prediction from the gradient pass).
- **BIM** (Kurakin et al. 2016): ``steps`` iterations of
  ``x <- clip_{x0, eps}(x + alpha * sign(grad))``, ``alpha = step_size`` or, by default,
  ``1.25 * eps / steps`` (Kurakin's rule ``steps = min(eps + 4, 1.25 eps)`` with unit steps
  lets the iterate travel at most ``1.25 * eps``; we keep that total travel with a fixed
  number of steps). With ``early_stop=True`` (default) a sample whose attack succeeded
  keeps the first adversarial example found and stops costing compute: it is dropped from
  the active batch at the next step, and since that example also lies in every larger
  ball it is reused for the larger epsilons of the sweep (epsilons are processed in
  increasing order). This only ever *adds* successes compared with running every step
  (as torchattacks and foolbox do); ``early_stop=False`` runs all steps for every sample
  and epsilon, which reproduces torchattacks/foolbox exactly.

Targeted attacks (``targets`` given) descend the loss of the target class (the adapter's
``loss(..., targeted=True)``); success means the prediction equals the target.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import RobustcapsError
from ..models.adapter import ModelAdapter
from .base import Attack, AttackResult
from .registry import register_attack

#: total BIM travel ``steps * alpha`` as a multiple of eps when no step size is given
BIM_TRAVEL = 1.25
BIM_DEFAULT_STEPS = 10


def check_epsilons(epsilons: Sequence[float] | np.ndarray | float) -> np.ndarray:
    """Validate an epsilon list: finite, >= 0, at least one. Returns a float64 (E,) array."""
    if isinstance(epsilons, (int, float)):
        epsilons = [epsilons]
    try:
        eps = np.asarray(list(epsilons), dtype=np.float64)
    except (TypeError, ValueError):
        raise RobustcapsError(f"epsilons must be numbers, got {epsilons!r}") from None
    if eps.ndim != 1 or eps.size == 0:
        raise RobustcapsError("epsilons: give at least one epsilon")
    if not np.all(np.isfinite(eps)) or np.any(eps < 0):
        bad = [e for e in eps.tolist() if not (math.isfinite(e) and e >= 0)]
        raise RobustcapsError(f"epsilons must be finite and >= 0, got {bad[0]}")
    return eps


def check_targets(adapter: ModelAdapter, y: torch.Tensor, targets: torch.Tensor | None) -> None:
    if targets is None:
        return
    if targets.shape != y.shape:
        raise RobustcapsError(f"targets must have shape {tuple(y.shape)}, got {tuple(targets.shape)}")
    k = adapter.num_classes
    if k is not None and (int(targets.min()) < 0 or int(targets.max()) >= k):
        raise RobustcapsError(f"targets must be class indices in 0..{k - 1}")


def check_inputs(adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor) -> None:
    """Shapes agree and clean inputs respect the adapter's bounds."""
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise RobustcapsError(f"x (N, ...) and y (N,) disagree: {tuple(x.shape)} vs {tuple(y.shape)}")
    if adapter.bounds is not None and x.numel():
        lo, hi = adapter.bounds
        tol = 1e-6 * max(1.0, hi - lo)
        if float(x.min()) < lo - tol or float(x.max()) > hi + tol:
            raise RobustcapsError(
                f"inputs of model {adapter.name!r} lie outside its bounds {adapter.bounds}: "
                f"[{float(x.min()):.4g}, {float(x.max()):.4g}]"
            )


def perturbation_norms(x_adv: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, ...) pair -> (linf (N,), l2 (N,)) norms of ``x_adv - x`` in float64."""
    d = (x_adv.double() - x.double()).flatten(1)
    if d.shape[1] == 0:
        z = torch.zeros(d.shape[0], dtype=torch.float64, device=d.device)
        return z, z
    return d.abs().amax(dim=1), d.norm(dim=1)


def project(x: torch.Tensor, x0: torch.Tensor, eps: float, bounds: tuple[float, float] | None) -> torch.Tensor:
    """Clip into the eps-ball around ``x0`` and then into the bounds (if any)."""
    x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps)
    return x if bounds is None else x.clamp(*bounds)


def _is_success(pred: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    return pred == labels if targeted else pred != labels


def _sign(grad: torch.Tensor) -> torch.Tensor:
    # A NaN gradient must not turn into a NaN input (0 * NaN at eps=0 would too).
    return torch.nan_to_num(grad, nan=0.0).sign()


def check_bim_settings(steps: Any, step_size: Any) -> tuple[int, float | None]:
    """Validated BIM ``(steps, step_size)``, shared by every backend's BIM."""
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise RobustcapsError(f"steps must be an integer >= 1, got {steps!r}")
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise RobustcapsError(f"step_size must be a positive number, got {step_size!r}")
    return int(steps), None if step_size is None else float(step_size)


def bim_step_size(eps: float, steps: int, step_size: float | None) -> float:
    """The BIM step ``alpha`` for ``eps``: ``step_size`` or ``BIM_TRAVEL * eps / steps``."""
    return float(step_size) if step_size is not None else BIM_TRAVEL * float(eps) / steps


def _result(
    name: str, backend: str, targeted: bool, eps: np.ndarray, x: torch.Tensor, y: torch.Tensor,
    targets: torch.Tensor | None, clean_pred: torch.Tensor, adv_pred: torch.Tensor,
    x_adv_all: list[torch.Tensor] | torch.Tensor, return_adv: bool, info: dict[str, Any],
    labels: torch.Tensor,
) -> AttackResult:
    """Assemble an AttackResult from per-epsilon adversarial inputs (E, N, ...)."""
    linf = torch.empty(len(eps), x.shape[0], dtype=torch.float64)
    l2 = torch.empty_like(linf)
    for e in range(len(eps)):
        a, b = perturbation_norms(x_adv_all[e], x)
        linf[e], l2[e] = a.cpu(), b.cpu()
    adv_pred = adv_pred.cpu()
    return AttackResult(
        attack=name,
        backend=backend,
        targeted=targeted,
        epsilons=eps,
        y=y.cpu(),
        targets=None if targets is None else targets.cpu(),
        clean_pred=clean_pred.cpu(),
        adv_pred=adv_pred,
        success=_is_success(adv_pred, labels.cpu()[None], targeted),
        linf=linf,
        l2=l2,
        x_adv=torch.stack([t.cpu() for t in x_adv_all]) if return_adv else None,
        info=info,
    )


class _NativeAttack(Attack):
    backend = "native"

    def run(
        self,
        adapter: ModelAdapter,
        x: torch.Tensor,
        y: torch.Tensor,
        epsilons: Sequence[float],
        targets: torch.Tensor | None = None,
        *,
        return_adv: bool = False,
    ) -> AttackResult:
        eps = check_epsilons(epsilons)
        check_inputs(adapter, x, y)
        check_targets(adapter, y, targets)
        t0 = time.perf_counter()
        bs = self.batch_size or max(1, x.shape[0])
        parts = []
        for i in range(0, max(1, x.shape[0]), bs):
            sl = slice(i, i + bs)
            parts.append(self._run_batch(adapter, x[sl], y[sl],
                                         None if targets is None else targets[sl], eps, return_adv))
        res = parts[0] if len(parts) == 1 else _concat(parts)
        res.info.update(self.params())
        res.info["seconds"] = time.perf_counter() - t0
        return res

    def _run_batch(self, adapter, x, y, targets, eps, return_adv) -> AttackResult:  # pragma: no cover
        raise NotImplementedError


def _concat(parts: list[AttackResult]) -> AttackResult:
    p0 = parts[0]
    cat = torch.cat
    info = dict(p0.info)
    for key in ("forwards", "backwards"):
        if key in info:
            info[key] = sum(p.info.get(key, 0) for p in parts)
    for key in ("sample_forwards", "sample_backwards"):  # (E, N) per-sample costs
        if key in info:
            info[key] = np.concatenate([p.info[key] for p in parts], axis=1)
    return AttackResult(
        attack=p0.attack, backend=p0.backend, targeted=p0.targeted, epsilons=p0.epsilons,
        y=cat([p.y for p in parts]),
        targets=None if p0.targets is None else cat([p.targets for p in parts]),
        clean_pred=cat([p.clean_pred for p in parts]),
        adv_pred=cat([p.adv_pred for p in parts], dim=1),
        success=cat([p.success for p in parts], dim=1),
        linf=cat([p.linf for p in parts], dim=1),
        l2=cat([p.l2 for p in parts], dim=1),
        x_adv=None if p0.x_adv is None else cat([p.x_adv for p in parts], dim=1),
        info=info,
    )


@register_attack("fgsm", description="Fast Gradient Sign Method (Goodfellow et al. 2014): "
                 "one signed-gradient step of size eps")
class FGSM(_NativeAttack):
    """Fast Gradient Sign Method sweep: one gradient per sample reused for every epsilon.

    Args:
        loss: attack loss override (``ce``, ``spread``, ``margin``, ``cw``); default: the
            adapter's own ``loss_name``.
        batch_size: split ``x`` into batches of this size (default: one batch).
    """

    name = "fgsm"

    @torch.no_grad()
    def _run_batch(self, adapter, x, y, targets, eps, return_adv) -> AttackResult:
        targeted = targets is not None
        labels = targets if targeted else y
        x = x.to(device=adapter.device, dtype=adapter.dtype)
        labels_d = labels.to(adapter.device)
        # One forward+backward: the clean scores come with the gradient.
        _, grad, s = adapter.input_gradient(x, labels_d, targeted=targeted, kind=self.loss)
        clean_pred = s.argmax(dim=1)
        direction = _sign(grad)
        adv_pred = torch.empty(len(eps), x.shape[0], dtype=torch.long, device=adapter.device)
        xs: list[torch.Tensor] = []
        forwards = 1
        for e, epsilon in enumerate(eps):
            if epsilon == 0.0:
                xa = x
                adv_pred[e] = clean_pred
            else:
                xa = adapter.clip(x + float(epsilon) * direction)
                adv_pred[e] = adapter.scores(xa).argmax(dim=1)
                forwards += 1
            xs.append(xa)
        info = {"forwards": forwards, "backwards": 1}
        return _result(self.name, self.backend, targeted, eps, x, y, targets, clean_pred,
                       adv_pred, xs, return_adv, info, labels)


@register_attack("bim", description="Basic Iterative Method (Kurakin et al. 2016): "
                 "iterated FGSM steps projected into the eps-ball")
class BIM(_NativeAttack):
    """Basic Iterative Method sweep (iterative FGSM, no random start).

    Args:
        steps: iterations per epsilon (default 10).
        step_size: absolute step ``alpha`` in input units; default ``1.25 * eps / steps``.
        early_stop: keep each sample's first adversarial example and stop computing for it
            (also across increasing epsilons); ``False`` runs all steps like torchattacks.
        loss, batch_size: as for :class:`FGSM`.
    """

    name = "bim"

    def __init__(self, *, steps: int = BIM_DEFAULT_STEPS, step_size: float | None = None,
                 early_stop: bool = True, loss: str | None = None,
                 batch_size: int | None = None) -> None:
        super().__init__(loss=loss, batch_size=batch_size)
        self.steps, self.step_size = check_bim_settings(steps, step_size)
        self.early_stop = bool(early_stop)

    def params(self) -> dict[str, Any]:
        return {"loss": self.loss, "steps": self.steps, "step_size": self.step_size,
                "early_stop": self.early_stop}

    def _run_batch(self, adapter, x, y, targets, eps, return_adv) -> AttackResult:
        targeted = targets is not None
        labels = targets if targeted else y
        dev = adapter.device
        x = x.to(device=dev, dtype=adapter.dtype)
        labels_d = labels.to(dev)
        n = x.shape[0]
        with torch.no_grad():
            clean_pred = adapter.scores(x).argmax(dim=1)
        forwards, backwards = 1, 0
        # per-sample passes per epsilon (the shared clean pass excluded), as PGD/APGD report
        fw = torch.zeros(len(eps), n, dtype=torch.int64)
        bw = torch.zeros(len(eps), n, dtype=torch.int64)
        # Current best adversarial example per sample (for carry-over across epsilons).
        found = _is_success(clean_pred, labels_d, targeted) if self.early_stop else \
            torch.zeros(n, dtype=torch.bool, device=dev)
        best_x = x.clone()
        best_pred = clean_pred.clone()
        adv_pred = torch.empty(len(eps), n, dtype=torch.long, device=dev)
        xs: list[torch.Tensor | None] = [None] * len(eps)
        for e in np.argsort(eps, kind="stable"):
            epsilon = float(eps[e])
            if epsilon == 0.0:
                xs[e], adv_pred[e] = x, clean_pred
                continue
            alpha = bim_step_size(epsilon, self.steps, self.step_size)
            out_x = best_x.clone() if self.early_stop else x.clone()
            out_pred = best_pred.clone() if self.early_stop else clean_pred.clone()
            idx = (~found).nonzero().squeeze(1)  # samples still to attack at this epsilon
            xa, x0, lab = x[idx], x[idx], labels_d[idx]
            for step in range(self.steps):
                if idx.numel() == 0:
                    break
                _, grad, s = adapter.input_gradient(xa, lab, targeted=targeted, kind=self.loss)
                forwards += 1
                backwards += 1
                fw[e, idx.cpu()] += 1
                bw[e, idx.cpu()] += 1
                if self.early_stop and step > 0:
                    # The scores of this pass are those of the current iterate: samples that
                    # already succeed keep it and leave the active batch.
                    pred = s.argmax(dim=1)
                    done = _is_success(pred, lab, targeted)
                    if bool(done.any()):
                        out_x[idx[done]], out_pred[idx[done]] = xa[done], pred[done]
                        keep = ~done
                        idx, xa, x0, lab, grad = idx[keep], xa[keep], x0[keep], lab[keep], grad[keep]
                        if idx.numel() == 0:
                            break
                with torch.no_grad():
                    xa = project(xa + alpha * _sign(grad), x0, epsilon, adapter.bounds)
            if idx.numel():
                with torch.no_grad():
                    out_pred[idx] = adapter.scores(xa).argmax(dim=1)
                out_x[idx] = xa
                forwards += 1
                fw[e, idx.cpu()] += 1
            xs[e], adv_pred[e] = out_x, out_pred
            if self.early_stop:
                newly = _is_success(out_pred, labels_d, targeted) & ~found
                best_x[newly], best_pred[newly] = out_x[newly], out_pred[newly]
                found |= newly
        info = {"forwards": forwards, "backwards": backwards,
                "sample_forwards": fw.numpy(), "sample_backwards": bw.numpy()}
        return _result(self.name, self.backend, targeted, eps, x, y, targets, clean_pred,
                       adv_pred, xs, return_adv, info, labels)
