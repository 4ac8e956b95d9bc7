"""The attack runs behind the attack indicators, observed through the engine's tracker.

One tracked PGD sweep (native :class:`robustcaps.attacks.pgd.PGD`, L-inf, no random start,
``steps`` iterations of step ``eps / 3``: the attack of Pintor et al.'s reference
evaluation) serves the success curves, silent success, incomplete optimization and the
transfer examples; the same PGD with an unbounded budget serves the unconstrained check.
Per-iteration losses and successes come from the engine's ``tracker`` hook, not from a
re-implementation. All success rates are over the samples classified correctly before
the attack ("clean-correct").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..attacks.base import AttackResult
from ..attacks.pgd import PGD
from ..attacks.sweep import HistoryTracker
from ..errors import RobustcapsError
from ..models.adapter import ModelAdapter
from . import ioaf

#: PGD step as a fraction of epsilon: the reference's 0.01 at 8/255 and 0.1 at 0.3
STEP_RATIO = 1 / 3
DEFAULT_STEPS = 50  # the reference evaluation's PGD


@dataclass
class AttackConfig:
    """Budgets of the attack-based indicators (epsilons in the model's input space)."""

    epsilons: tuple[float, ...]
    steps: int = DEFAULT_STEPS
    unbounded_eps: float = 100.0
    n_random: int = 4
    noise_scale: float = 1.0  # data scale: the unstable-predictions radius is relative to it
    gamma: int = ioaf.UNSTABLE_DRAWS_DEFAULT
    seed: int = 0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        eps = tuple(float(e) for e in self.epsilons)
        if not eps or any(not (math.isfinite(e) and e > 0) for e in eps):
            raise RobustcapsError(f"epsilons must be positive finite numbers, got {list(self.epsilons)}")
        self.epsilons = tuple(sorted(set(eps)))
        for name in ("steps", "n_random", "gamma"):
            if getattr(self, name) < 1:
                raise RobustcapsError(f"{name} must be >= 1, got {getattr(self, name)}")


class RelativePGD(PGD):
    """Native PGD whose step is a fixed fraction of each epsilon of the sweep."""

    def __init__(self, ratio: float = STEP_RATIO, **kw: Any) -> None:
        super().__init__(**kw)
        self.ratio = float(ratio)

    def alpha(self, eps: float) -> float:
        return self.ratio * eps

    def params(self) -> dict[str, Any]:
        return {**super().params(), "step_ratio": self.ratio}


@dataclass
class Tracked:
    """What the tracker saw at one epsilon: ``loss`` (T, N) float64 (NaN where a sample was
    not attacked or had stopped) and ``path`` (T, N) bool, success at each pass."""

    eps: float
    loss: torch.Tensor
    path: torch.Tensor


def histories(tracker: HistoryTracker, n: int) -> dict[float, Tracked]:
    """Per epsilon, the tracker's runs (one per batch) laid out over the N samples."""
    out: dict[float, Tracked] = {}
    for run in tracker.runs:
        eps, index = run["context"]["eps"], run["context"]["index"]
        t = len(run["loss"])
        cur = out.get(eps)
        if cur is None or cur.loss.shape[0] < t:
            cur = _grow(cur, eps, t, n)
            out[eps] = cur
        cur.loss[:t, index] = torch.stack(run["loss"]).double()
        cur.path[:t, index] = torch.stack(run["success"])
    return out


def _grow(cur: Tracked | None, eps: float, t: int, n: int) -> Tracked:
    new = Tracked(eps, torch.full((t, n), float("nan"), dtype=torch.float64),
                  torch.zeros(t, n, dtype=torch.bool))
    if cur is not None:
        k = cur.loss.shape[0]
        new.loss[:k], new.path[:k] = cur.loss, cur.path
    return new


def tracked_pgd(adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor,
                epsilons: Sequence[float], steps: int, batch_size: int | None, *,
                step_size: float | None = None) -> tuple[AttackResult, dict[float, Tracked]]:
    """PGD (no random start, early stop) with a tracker: the result (with x_adv) and the
    histories per epsilon. Step ``eps / 3`` per epsilon unless ``step_size`` is given."""
    tracker = HistoryTracker()
    kw = {"steps": steps, "random_start": False, "tracker": tracker, "batch_size": batch_size}
    attack = PGD(step_size=step_size, **kw) if step_size is not None else RelativePGD(**kw)
    res = attack.run(adapter, x, y, list(epsilons), return_adv=True)
    return res, histories(tracker, x.shape[0])


def at(hist: dict[float, Tracked], eps: float, steps: int, n: int) -> Tracked:
    """The history at ``eps`` (nearest recorded), or an empty one (nothing was attacked)."""
    if not hist:
        return _grow(None, eps, steps + 1, n)
    return hist[min(hist, key=lambda e: abs(e - eps))]


@torch.no_grad()
def fresh_predictions(adapter: ModelAdapter, res: AttackResult, batch_size: int | None
                      ) -> torch.Tensor:
    """(E, N) predictions of the returned points, asked afresh (the reference re-predicts:
    a randomised model can answer differently than during the attack)."""
    return torch.stack([adapter.predict(res.x_adv[e], batch_size=batch_size).cpu()
                        for e in range(res.x_adv.shape[0])])


@torch.no_grad()
def random_sign_success(adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor,
                        epsilons: Sequence[float], n_draws: int, seed: int = 0,
                        batch_size: int | None = None) -> torch.Tensor:
    """(E, N) bool: some of ``n_draws`` perturbations ``eps * sign(U)`` misclassifies x_i.

    The corners of the L-infinity ball are the strongest random perturbations of that size.
    """
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    d = (torch.randint(0, 2, (n_draws, *x.shape), generator=gen) * 2 - 1).to(x.dtype)
    yr = y.cpu().repeat(n_draws)
    out = torch.zeros(len(epsilons), n, dtype=torch.bool)
    for e, eps in enumerate(epsilons):
        xr = adapter.clip((x.cpu()[None] + float(eps) * d).flatten(0, 1))
        out[e] = (adapter.predict(xr, batch_size=batch_size).cpu() != yr).view(n_draws, n).any(dim=0)
    return out


@torch.no_grad()
def unstable_predictions(adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor, radius: float,
                         gamma: int = ioaf.UNSTABLE_DRAWS_DEFAULT, seed: int = 0,
                         batch_size: int | None = None) -> torch.Tensor:
    """(N,) the reference's relative loss change under ``gamma`` draws of U(-r/2, r/2)^d."""
    gen = torch.Generator().manual_seed(seed)
    ref = batched_loss(adapter, x, y, batch_size)
    draws = torch.empty(gamma, x.shape[0], dtype=torch.float64)
    for g in range(gamma):
        noise = (torch.rand(x.shape, generator=gen, dtype=torch.float64) - 0.5) * radius
        draws[g] = batched_loss(adapter, adapter.clip(x + noise.to(x.dtype)), y, batch_size)
    return ioaf.relative_change(ref, draws)


def batched_loss(adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int | None) -> torch.Tensor:
    bs = batch_size or max(1, x.shape[0])
    parts = [adapter.loss(adapter.scores(x[i:i + bs]), y[i:i + bs].to(adapter.device)).double().cpu()
             for i in range(0, x.shape[0], bs)]
    return torch.cat(parts)


# ---------------------------------------------------------------------------- per model
@dataclass
class AttackRuns:
    """Everything the attack indicators of one model need (CPU tensors)."""

    model: str
    epsilons: np.ndarray  # (E,)
    clean_correct: torch.Tensor  # (N,) bool
    fgsm: AttackResult
    pgd: AttackResult  # with x_adv (E, N, ...)
    fresh_pred: torch.Tensor  # (E, N) the returned PGD points, predicted afresh
    tracked: Tracked  # at eps_ref
    unbounded: AttackResult
    unbounded_success: torch.Tensor  # (N,) re-predicted
    unbounded_silent: torch.Tensor  # (N,)
    random: torch.Tensor  # (E, N) bool
    unstable: torch.Tensor  # (N,) relative loss change
    eps_ref: float
    config: AttackConfig
    transfer: dict[str, AttackResult] = field(default_factory=dict)  # source -> on this model
    source_success: dict[str, torch.Tensor] = field(default_factory=dict)  # source -> (E, N)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def success(self) -> torch.Tensor:
        """(E, N) the returned PGD points fool the model when asked afresh."""
        return self.fresh_pred != self.pgd.y[None]

    @property
    def e_ref(self) -> int:
        return int(np.argmin(np.abs(self.epsilons - self.eps_ref)))

    @property
    def engine(self) -> str:
        c = self.config
        return (f"robustcaps native FGSM; native PGD L-inf, {c.steps} steps of eps/3, no random "
                "start, early stop, per-iteration tracker")


def rate(success: torch.Tensor, mask: torch.Tensor) -> float:
    m = int(mask.sum())
    return float((success & mask).sum()) / m if m else float("nan")


def reference_epsilon(eps: np.ndarray, success: torch.Tensor, cc: torch.Tensor) -> float:
    """The epsilon whose PGD success rate is nearest 50%: failures to examine, not all."""
    rates = [rate(success[e], cc) for e in range(len(eps))]
    finite = [(abs(r - 0.5), e) for e, r in enumerate(rates) if not math.isnan(r)]
    return float(eps[min(finite)[1]]) if finite else float(eps[len(eps) // 2])


def run_attacks(adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig,
                log: Callable[[str], None] | None = None) -> AttackRuns:
    """FGSM and tracked PGD sweeps, the unbounded PGD, random noise and unstable predictions."""
    from ..attacks import get_attack

    clock = _Clock(log)
    eps = np.asarray(cfg.epsilons, dtype=np.float64)
    bs = cfg.batch_size
    clock.start("fgsm", "FGSM sweep")
    fgsm = get_attack("fgsm", batch_size=bs).run(adapter, x, y, eps)
    clock.start("pgd", f"PGD sweep ({cfg.steps} steps)")
    res, hist = tracked_pgd(adapter, x, y, eps, cfg.steps, bs)
    fresh = fresh_predictions(adapter, res, bs)
    cc = res.clean_pred == y.cpu()
    eps_ref = reference_epsilon(eps, fresh != y.cpu()[None], cc)
    tracked = at(hist, eps_ref, cfg.steps, x.shape[0])
    clock.start("unbounded", "unbounded PGD")
    # the reference keeps the attack's absolute step when it lifts the bound
    ub, ub_hist = tracked_pgd(adapter, x, y, [cfg.unbounded_eps], cfg.steps, bs,
                              step_size=STEP_RATIO * eps_ref)
    ub_success = fresh_predictions(adapter, ub, bs)[0] != y.cpu()
    ub_path = at(ub_hist, cfg.unbounded_eps, cfg.steps, x.shape[0])
    clock.start("random", "random noise")
    rnd = random_sign_success(adapter, x, y, eps, cfg.n_random, cfg.seed, bs)
    clock.start("unstable", "unstable predictions")
    unstable = unstable_predictions(adapter, x, y, ioaf.UNSTABLE_RADIUS * cfg.noise_scale,
                                    cfg.gamma, cfg.seed, bs)
    clock.start(None, "")
    return AttackRuns(adapter.name, eps, cc, fgsm, res, fresh, tracked, ub, ub_success,
                      ioaf.silent_success(ub_path.path, ub_success), rnd, unstable, eps_ref, cfg,
                      timings=clock.timings)


class _Clock:
    """Seconds per phase, and a progress message at each phase's start."""

    def __init__(self, log: Callable[[str], None] | None) -> None:
        self.log, self.timings = log, {}
        self.phase: str | None = None
        self.t = time.perf_counter()

    def start(self, phase: str | None, message: str) -> None:
        now = time.perf_counter()
        if self.phase is not None:
            self.timings[self.phase] = now - self.t
        self.phase, self.t = phase, now
        if self.log is not None and message:
            self.log(message)


def add_transfer(runs: dict[str, AttackRuns], adapters: list[ModelAdapter], x: torch.Tensor,
                 batch_size: int | None = None) -> None:
    """Classify every model's PGD examples with every other model (same epsilons)."""
    from ..attacks.transfer import evaluate_on

    by_name = {a.name: a for a in adapters}
    for src_name, src in runs.items():
        for tgt_name, tgt in runs.items():
            if src_name != tgt_name:
                tgt.transfer[src_name] = evaluate_on(by_name[tgt_name], src.pgd, x.cpu(), src_name,
                                                     batch_size)
                # genuinely adversarial on the source: correct before, wrong after
                tgt.source_success[src_name] = src.success & src.clean_correct[None]


def data_scale(x: torch.Tensor, bounds: tuple[float, float] | None) -> float:
    """The input scale: the box width with bounds, else the data's standard deviation."""
    if bounds is not None:
        return float(bounds[1] - bounds[0])
    s = float(x.double().std()) if x.numel() > 1 else 1.0
    return s if s > 0 else 1.0


def default_epsilons(scale: float) -> tuple[float, ...]:
    """(0.02, 0.05, 0.1, 0.2, 0.5) times the data scale rounded to one significant digit
    (standardised NORB: std 1.0x -> 1; a (0, 1) box -> 1)."""
    nice = float(f"{scale:.0e}") if scale > 0 else 1.0
    return tuple(round(f * nice, 6) for f in (0.02, 0.05, 0.1, 0.2, 0.5))
