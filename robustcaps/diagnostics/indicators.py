"""Gradient-masking indicators, each with a verdict and the numbers behind it.

Attack-based indicators run the project's attack engine
(:func:`robustcaps.attacks.get_attack`, native FGSM/BIM sweeps) and, where per-iteration
information is needed (silent success, incomplete optimisation), a *tracked* BIM defined
here: the same iteration as the engine's BIM (``x <- clip_{x0,eps}(x + alpha sign(g))``,
``alpha = 1.25 eps / steps``) but recording the loss and the prediction at every iterate.

All attack indicators are computed on the samples the model classifies correctly before
the attack ("clean-correct"); success rates are fractions of those.

The checks, their formulas and thresholds are listed in :data:`CHECKS`; the report renders
that table verbatim so the document and the code cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import RobustcapsError
from ..models.adapter import ModelAdapter
from .gradients import GradientAnalysis

PASS, WARN, FAIL, NA = "PASS", "WARN", "FAIL", "N/A"
SEVERITY = {NA: -1, PASS: 0, WARN: 1, FAIL: 2}
BIM_TRAVEL = 1.25  # the engine's default: alpha = 1.25 * eps / steps

# ---------------------------------------------------------------------------- the checks
CHECKS: list[dict[str, str]] = [
    {"id": "G1", "name": "exact-zero gradient entries", "group": "gradient",
     "formula": "z = #{(i, j): g_ij == 0} / (N D), g_i = dL(x_i, y_i)/dx_i, D input entries",
     "rule": "PASS z < 5%; WARN 5% <= z < 50%; FAIL z >= 50%"},
    {"id": "G2", "name": "NaN/Inf in gradients", "group": "gradient",
     "formula": "count of non-finite entries of g over all samples",
     "rule": "PASS 0; FAIL > 0"},
    {"id": "G3", "name": "float32 vs float64 gradient", "group": "gradient",
     "formula": "r_i = ||g32_i - g64_i||_2 / ||g64_i||_2 (same model copied to float64); "
                "value = median_i r_i",
     "rule": "PASS < 1e-3; WARN 1e-3 <= r < 0.1; FAIL r >= 0.1"},
    {"id": "G4", "name": "finite differences vs autograd", "group": "gradient",
     "formula": "e_i(d) = |FD - g.d| / max(|FD|, |g.d|), FD = (L(x+hd) - L(x-hd)) / 2h, h = 1e-6, "
                "|d|_2 = 1, float64; value = share of samples with e_i(g/|g|) > 0.5 (a kink, "
                "e.g. a max-pool tie, halves one side: e <= ~0.5); e_i(random d) is reported",
     "rule": "PASS < 5%; WARN 5% <= v < 25%; FAIL v >= 25%"},
    {"id": "G5", "name": "gradient magnitude vs other models", "group": "gradient",
     "formula": "log10( median_i ||g_i||_1 / median_i ||g'_i||_1 ) against the model with "
                "the largest gradients in the run",
     "rule": "PASS > -4 decades; WARN -8 < v <= -4; FAIL v <= -8 (Brendel & Bethge: -16); "
             "N/A with one model"},
    {"id": "A", "name": "FGSM stronger than BIM", "group": "attack",
     "formula": "v = max_eps [S_FGSM(eps) - S_BIM(eps)], S = success rate on clean-correct samples",
     "rule": "PASS v <= 2 pp; WARN 2 < v <= 10 pp; FAIL v > 10 pp"},
    {"id": "B", "name": "transfer stronger than white-box", "group": "attack",
     "formula": "v = max_{source, eps} [S_transfer(eps) - S_BIM(eps)]; transfer = BIM examples "
                "crafted on each other model of the run, classified by this one",
     "rule": "PASS v <= 2 pp; WARN 2 < v <= 10 pp; FAIL v > 10 pp; N/A with one model"},
    {"id": "C", "name": "accuracy does not go to zero", "group": "attack",
     "formula": "a_inf = accuracy (clean-correct) after an unbounded BIM (eps_inf, 2K steps, "
                "alpha = 2.5 eps_max / K); rise = max_k [acc(eps_{k+1}) - acc(eps_k)] over the "
                "BIM curve",
     "rule": "PASS a_inf <= 1% and rise <= 5 pp; WARN otherwise; FAIL a_inf > 10%"},
    {"id": "D", "name": "random noise as effective as the attack", "group": "attack",
     "formula": "R(eps) = share of clean-correct samples misclassified by at least one of "
                "n_random perturbations eps * sign(U), W(eps) = BIM success",
     "rule": "FAIL if some eps has R >= W and R >= 10%; WARN if some eps with W < 90% has "
             "R >= W/2 and R >= 5%; else PASS"},
    {"id": "P1", "name": "unavailable gradients", "group": "pintor",
     "formula": "share of samples whose gradient is all zero or has max|g| <= tiny(dtype) * 1e8 "
                "(float32: 1.2e-30)",
     "rule": "PASS < 1%; WARN 1% <= v < 10%; FAIL v >= 10%"},
    {"id": "P2", "name": "unstable predictions", "group": "pintor",
     "formula": "sample flagged if, over 2 repeated evaluations of x and 2 of x + U(-xi, xi) "
                "(xi = 1e-4 * data scale), the prediction changes or "
                "(max L - min L) / max(|L(x)|, 1e-6) > 0.1",
     "rule": "PASS < 2%; WARN 2% <= v < 10%; FAIL v >= 10%"},
    {"id": "P3", "name": "silent success", "group": "pintor",
     "formula": "tracked BIM at eps_ref: sample flagged if an intermediate iterate x_k "
                "(1 <= k < K) is adversarial but the last iterate x_K is not",
     "rule": "PASS < 2%; WARN 2% <= v < 10%; FAIL v >= 10%; a single flagged sample is at "
             "most WARN"},
    {"id": "P4", "name": "incomplete optimisation", "group": "pintor",
     "formula": "tracked BIM at eps_ref, samples never adversarial: L*_k = max_{j<=k} L_j; "
                "flagged if L*_K - L*_{K-k} > 0.05 (L*_K - L_0), k = max(1, ceil(K/5))",
     "rule": "PASS < 10%; WARN 10% <= v < 50%; FAIL v >= 50% (of the samples the attack failed "
             "on); a single flagged sample is at most WARN"},
    {"id": "P5", "name": "transfer failure", "group": "pintor",
     "formula": "among samples where white-box BIM fails at eps_ref: share where some other "
                "model's BIM example succeeded on that model but fails on this one",
     "rule": "PASS < 50% (or < 3 samples); WARN otherwise (never FAIL: a robust model resists "
             "transfer too); N/A with one model"},
    {"id": "P6", "name": "unconstrained attack failure", "group": "pintor",
     "formula": "share of clean-correct samples the unbounded BIM of check C does not fool",
     "rule": "PASS 0; WARN 0 < v < 5%; FAIL v >= 5%"},
]
CHECK_BY_ID = {c["id"]: c for c in CHECKS}


def grade(value: float, warn: float, fail: float, *, higher_is_worse: bool = True,
          strict: bool = False) -> str:
    """PASS/WARN/FAIL for a value against two thresholds (NaN -> N/A)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    v = value if higher_is_worse else -value
    w, f = (warn, fail) if higher_is_worse else (-warn, -fail)
    if (v > f) if strict else (v >= f):
        return FAIL
    if (v > w) if strict else (v >= w):
        return WARN
    return PASS


def _cap(verdict: str, flagged: int) -> str:
    """A verdict resting on a single flagged sample is at most WARN."""
    return WARN if verdict == FAIL and flagged < 2 else verdict


def worst(verdicts: Sequence[str]) -> str:
    vs = [v for v in verdicts if v != NA]
    return max(vs, key=SEVERITY.__getitem__) if vs else NA


# ---------------------------------------------------------------------------- configuration
@dataclass
class AttackConfig:
    """Budgets of the attack-based indicators (epsilons in the model's input space)."""

    epsilons: tuple[float, ...]
    steps: int = 10
    unbounded_eps: float = 100.0
    n_random: int = 4
    noise_scale: float = 1.0  # data scale used for the stability noise
    n_repeats: int = 2
    seed: int = 0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        eps = tuple(float(e) for e in self.epsilons)
        if not eps or any(not (math.isfinite(e) and e > 0) for e in eps):
            raise RobustcapsError(f"epsilons must be positive finite numbers, got {list(self.epsilons)}")
        self.epsilons = tuple(sorted(set(eps)))
        if self.steps < 1:
            raise RobustcapsError(f"steps must be >= 1, got {self.steps}")
        if self.n_random < 1:
            raise RobustcapsError(f"n_random must be >= 1, got {self.n_random}")

    @property
    def unbounded_steps(self) -> int:
        return 2 * self.steps

    @property
    def unbounded_step_size(self) -> float:
        return 2.5 * max(self.epsilons) / self.steps


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


# ---------------------------------------------------------------------------- attacks
def _batches(n: int, bs: int | None) -> list[slice]:
    bs = bs or n or 1
    return [slice(i, min(i + bs, n)) for i in range(0, n, bs)]


def _project(x: torch.Tensor, x0: torch.Tensor, eps: float, bounds) -> torch.Tensor:
    x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps)
    return x if bounds is None else x.clamp(*bounds)


@dataclass
class TrackedRun:
    """Per-iterate record of a BIM run at one epsilon.

    loss: (K+1, N) float64 attack loss at x_0 (clean) .. x_K; adv: (K+1, N) bool
    misclassified at each iterate; eps, steps, step_size: the attack's parameters.
    """

    eps: float
    steps: int
    step_size: float
    loss: torch.Tensor
    adv: torch.Tensor

    @property
    def any_adv(self) -> torch.Tensor:
        """(N,) adversarial at some iterate k >= 1 (what an early-stopping BIM reports)."""
        return self.adv[1:].any(dim=0)

    @property
    def final_adv(self) -> torch.Tensor:
        """(N,) the last iterate is adversarial (what a last-iterate BIM reports)."""
        return self.adv[-1]

    @property
    def silent(self) -> torch.Tensor:
        """(N,) adversarial at some 1 <= k < K but not at K."""
        return self.adv[1:-1].any(dim=0) & ~self.adv[-1] if self.steps > 1 else \
            torch.zeros_like(self.adv[-1])

    @property
    def best_loss_not_adv(self) -> torch.Tensor:
        """(N,) some iterate is adversarial but the highest-loss iterate is not."""
        best = self.loss.argmax(dim=0)
        return self.any_adv & ~self.adv.gather(0, best[None]).squeeze(0)

    def incomplete(self, frac: float = 0.05) -> torch.Tensor:
        """(N,) running-best loss still gained > ``frac`` of its total gain in the last steps."""
        best = torch.cummax(self.loss, dim=0).values
        kappa = max(1, math.ceil(self.steps / 5))
        total = best[-1] - best[0]
        late = best[-1] - best[-1 - kappa]
        return (total > 0) & (late > frac * total)


def tracked_bim(
    adapter: ModelAdapter,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float | None = None,
    batch_size: int | None = None,
) -> TrackedRun:
    """BIM (all ``steps`` iterations, no early stop) recording loss and prediction per iterate.

    Same iteration as :class:`robustcaps.attacks.native.BIM`; costs ``steps`` forward+backward
    passes and one forward pass. ``x`` (N, *in), ``y`` (N,).
    """
    alpha = float(step_size) if step_size is not None else BIM_TRAVEL * eps / steps
    if x.shape[0] == 0:
        return TrackedRun(eps, steps, alpha, torch.zeros(steps + 1, 0, dtype=torch.float64),
                          torch.zeros(steps + 1, 0, dtype=torch.bool))
    losses, advs = [], []
    for sl in _batches(x.shape[0], batch_size):
        x0 = x[sl].to(adapter.device, adapter.dtype)
        yb = y[sl].to(adapter.device)
        xa = x0.clone()
        lb, ab = [], []
        for _ in range(steps):
            lo, g, s = adapter.input_gradient(xa, yb)
            lb.append(lo.double().cpu())
            ab.append((s.argmax(dim=1) != yb).cpu())
            with torch.no_grad():
                xa = _project(xa + alpha * torch.nan_to_num(g, nan=0.0).sign(), x0, eps,
                              adapter.bounds)
        with torch.no_grad():
            s = adapter.scores(xa)
            lb.append(adapter.loss(s, yb).double().cpu())
            ab.append((s.argmax(dim=1) != yb).cpu())
        losses.append(torch.stack(lb))
        advs.append(torch.stack(ab))
    return TrackedRun(eps, steps, alpha, torch.cat(losses, dim=1), torch.cat(advs, dim=1))


@torch.no_grad()
def random_sign_success(
    adapter: ModelAdapter,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilons: Sequence[float],
    n_draws: int,
    seed: int = 0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """(E, N) bool: some of ``n_draws`` perturbations ``eps * sign(U)`` misclassifies x_i.

    The corners of the L-infinity ball are the strongest random perturbations of that size.
    """
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    # (R, N, ...) sign draws, shared by every epsilon; each epsilon is one (R*N) batch
    d = (torch.randint(0, 2, (n_draws, *x.shape), generator=gen) * 2 - 1).to(x.dtype)
    yr = y.cpu().repeat(n_draws)
    out = torch.zeros(len(epsilons), n, dtype=torch.bool)
    for e, eps in enumerate(epsilons):
        xr = (x.cpu()[None] + float(eps) * d).flatten(0, 1)
        wrong = []
        for sl in _batches(xr.shape[0], batch_size):
            xa = adapter.clip(xr[sl].to(adapter.device, adapter.dtype))
            wrong.append(adapter.scores(xa).argmax(dim=1).cpu() != yr[sl])
        out[e] = torch.cat(wrong).view(n_draws, n).any(dim=0)
    return out


@torch.no_grad()
def prediction_stability(
    adapter: ModelAdapter,
    x: torch.Tensor,
    y: torch.Tensor,
    noise: float,
    repeats: int = 2,
    seed: int = 0,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Per-sample stability under repeated evaluation and tiny uniform noise.

    Evaluates x ``repeats`` times and x + U(-noise, noise) ``repeats`` times (plus the
    reference evaluation). Columns: ``pred_changed`` (bool), ``loss_rel_range``
    ((max L - min L) / max(|L_ref|, 1e-6)), ``unstable`` (either above 0.1 or changed).
    """
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]

    def evaluate(xe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ls, ps = [], []
        for sl in _batches(n, batch_size):
            s = adapter.scores(xe[sl].to(adapter.device, adapter.dtype))
            ls.append(adapter.loss(s, y[sl].to(adapter.device)).double().cpu())
            ps.append(s.argmax(dim=1).cpu())
        return torch.cat(ls), torch.cat(ps)

    ref_loss, ref_pred = evaluate(x)
    lo, hi = ref_loss.clone(), ref_loss.clone()
    changed = torch.zeros(n, dtype=torch.bool)
    for r in range(2 * repeats):
        xe = x if r < repeats else x + noise * (2 * torch.rand(x.shape, generator=gen) - 1).to(x.dtype)
        loss, pred = evaluate(adapter.clip(xe))
        lo, hi = torch.minimum(lo, loss), torch.maximum(hi, loss)
        changed |= pred != ref_pred
    rel = (hi - lo) / ref_loss.abs().clamp_min(1e-6)
    rel = torch.nan_to_num(rel, nan=float("inf"))
    return pd.DataFrame({"pred_changed": changed.numpy(), "loss_rel_range": rel.numpy(),
                         "unstable": (changed | (rel > 0.1)).numpy()})


# ---------------------------------------------------------------------------- per model
@dataclass
class AttackRuns:
    """Everything the attack indicators of one model need (CPU tensors)."""

    model: str
    epsilons: np.ndarray  # (E,)
    clean_correct: torch.Tensor  # (N,) bool
    fgsm: Any  # AttackResult
    bim: Any  # AttackResult with x_adv (E, N, ...)
    unbounded: Any  # AttackResult at eps_inf
    random: torch.Tensor  # (E, N) bool
    stability: pd.DataFrame
    tracked: TrackedRun
    eps_ref: float
    engine: str
    n_random: int = 4
    transfer: dict[str, Any] = field(default_factory=dict)  # source name -> AttackResult
    # source name -> (E, N) bool: the source's own BIM success (for P5)
    source_success: dict[str, torch.Tensor] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds


def _rate(success: torch.Tensor, mask: torch.Tensor) -> float:
    m = int(mask.sum())
    return float((success & mask).sum()) / m if m else float("nan")


def run_attacks(
    adapter: ModelAdapter,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: AttackConfig,
    log: Callable[[str], None] | None = None,
) -> AttackRuns:
    """Run FGSM and BIM sweeps, the unbounded BIM, random noise, stability and tracked BIM."""
    import time

    from ..attacks import get_attack

    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def say(msg: str, phase: str | None = None) -> None:
        now = time.perf_counter()
        if phase is not None:
            timings[phase] = now - clock[0]
        clock[0] = now
        if log is not None and msg:
            log(msg)

    eps = np.asarray(cfg.epsilons, dtype=np.float64)
    bs = cfg.batch_size
    say("FGSM sweep")
    fgsm = get_attack("fgsm", batch_size=bs).run(adapter, x, y, eps)
    say("BIM sweep", "fgsm")
    bim = get_attack("bim", steps=cfg.steps, batch_size=bs).run(adapter, x, y, eps, return_adv=True)
    say("unbounded BIM", "bim")
    unbounded = get_attack("bim", steps=cfg.unbounded_steps, step_size=cfg.unbounded_step_size,
                           batch_size=bs).run(adapter, x, y, [cfg.unbounded_eps])
    clean_correct = bim.clean_pred == y.cpu()
    say("random noise", "unbounded")
    rnd = random_sign_success(adapter, x, y, eps, cfg.n_random, cfg.seed, bs)
    say("stability", "random")
    stab = prediction_stability(adapter, x, y, 1e-4 * cfg.noise_scale, cfg.n_repeats, cfg.seed, bs)
    say("", "stability")
    rates = [_rate(bim.success[e], clean_correct) for e in range(len(eps))]
    finite = [(abs(r - 0.5), e) for e, r in enumerate(rates) if not math.isnan(r)]
    eps_ref = float(eps[min(finite)[1]]) if finite else float(eps[len(eps) // 2])
    say(f"tracked BIM at eps={eps_ref:g}")
    # P3/P4 only look at clean-correct samples: track those alone (the costliest phase)
    idx = clean_correct.nonzero().squeeze(1)
    sub = tracked_bim(adapter, x[idx], y[idx], eps_ref, cfg.steps, batch_size=bs)
    n = x.shape[0]
    loss = torch.full((cfg.steps + 1, n), float("nan"), dtype=torch.float64)
    adv = torch.zeros(cfg.steps + 1, n, dtype=torch.bool)
    loss[:, idx], adv[:, idx] = sub.loss, sub.adv
    tracked = TrackedRun(sub.eps, sub.steps, sub.step_size, loss, adv)
    say("", "tracked")
    return AttackRuns(adapter.name, eps, clean_correct, fgsm, bim, unbounded, rnd, stab, tracked,
                      eps_ref, "robustcaps.attacks native FGSM/BIM (early stop) + tracked BIM",
                      n_random=cfg.n_random, timings=timings)


def add_transfer(runs: dict[str, AttackRuns], adapters: list[ModelAdapter], x: torch.Tensor,
                 batch_size: int | None = None) -> None:
    """Classify every model's BIM examples with every other model (same epsilons)."""
    from ..attacks.transfer import evaluate_on

    by_name = {a.name: a for a in adapters}
    for src_name, src in runs.items():
        for tgt_name, tgt in runs.items():
            if src_name == tgt_name:
                continue
            tgt.transfer[src_name] = evaluate_on(by_name[tgt_name], src.bim, x.cpu(), src_name,
                                                 batch_size)
            # genuinely adversarial on the source: correct before, wrong after
            tgt.source_success[src_name] = src.bim.success & src.clean_correct[None]


# ---------------------------------------------------------------------------- verdicts
def _row(model: str, cid: str, value: float, verdict: str, numbers: str) -> dict[str, Any]:
    c = CHECK_BY_ID[cid]
    return {"model": model, "id": cid, "check": c["name"], "group": c["group"],
            "value": float(value) if value is not None else float("nan"),
            "verdict": verdict, "numbers": numbers, "rule": c["rule"]}


def _pct(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}%"


def gradient_verdicts(ga: GradientAnalysis, magnitudes: pd.DataFrame | None) -> list[dict[str, Any]]:
    """Rows for G1-G5 and P1 from the gradient statistics of one model."""
    s, m = ga.summary, ga.model
    rows = [
        _row(m, "G1", s["zero_fraction"], grade(s["zero_fraction"], 0.05, 0.5),
             f"{_pct(s['zero_fraction'])} of {s['n_entries']:,} entries are exactly 0"),
        _row(m, "G2", s["nan_count"] + s["inf_count"],
             FAIL if s["nan_count"] + s["inf_count"] > 0 else PASS,
             f"{s['nan_count']} NaN, {s['inf_count']} Inf"),
    ]
    if "f64_rel_diff_median" in s:
        r = s["f64_rel_diff_median"]
        rows.append(_row(m, "G3", r, grade(r, 1e-3, 0.1),
                         f"median {r:.2e}, max {s['f64_rel_diff_max']:.2e}; sign agreement "
                         f"{_pct(s['f64_sign_agreement'])}"))
    else:
        rows.append(_row(m, "G3", float("nan"), NA, "float64 recomputation not run"))
    if "fd_mismatch_fraction" in s:
        v = s["fd_mismatch_fraction"]
        rows.append(_row(m, "G4", v, grade(v, 0.05, 0.25),
                         f"{_pct(v)} of samples; median error random {s['fd_err_random_median']:.1e}, "
                         f"gradient-aligned {s['fd_err_grad_median']:.1e}"))
    else:
        rows.append(_row(m, "G4", float("nan"), NA, "finite differences not run"))
    if magnitudes is not None and len(magnitudes):
        mine = magnitudes[magnitudes["model"] == m]
        if len(mine):
            j = int(np.argmin(mine["log10_l1_ratio"].to_numpy()))
            v = float(mine["log10_l1_ratio"].iloc[j])
            ref = mine["reference"].iloc[j]
            verdict = PASS if v > -4 else WARN if v > -8 else FAIL
            rows.append(_row(m, "G5", v, verdict,
                             f"{v:+.2f} decades vs {ref} (median L1 ratio "
                             f"{mine['median_l1_ratio'].iloc[j]:.3g})"))
    if not any(r["id"] == "G5" for r in rows):
        rows.append(_row(m, "G5", float("nan"), NA, "needs a second model"))
    u = s["unavailable_sample_fraction"]
    rows.append(_row(m, "P1", u, grade(u, 0.01, 0.1),
                     f"{_pct(u)} of {s['n_samples']} samples ({_pct(s['all_zero_sample_fraction'])}"
                     " entirely zero)"))
    return rows


def attack_verdicts(r: AttackRuns) -> list[dict[str, Any]]:
    """Rows for A-D and P2-P6 from the attack runs of one model."""
    m, cc = r.model, r.clean_correct
    n_cc = int(cc.sum())
    rows: list[dict[str, Any]] = []
    if n_cc == 0:
        for cid in ("A", "B", "C", "D", "P3", "P4", "P5", "P6"):
            rows.append(_row(m, cid, float("nan"), NA, "no correctly classified sample"))
    else:
        eps = r.epsilons
        sf = np.array([_rate(r.fgsm.success[e], cc) for e in range(len(eps))])
        sb = np.array([_rate(r.bim.success[e], cc) for e in range(len(eps))])
        sr = np.array([_rate(r.random[e], cc) for e in range(len(eps))])
        d = sf - sb
        k = int(np.argmax(d))
        rows.append(_row(m, "A", float(d[k]), grade(float(d[k]), 0.02, 0.10, strict=True),
                         f"max at eps={eps[k]:g}: FGSM {_pct(sf[k])} vs BIM {_pct(sb[k])}"))
        if r.transfer:
            best, text = -math.inf, ""
            for src, res in r.transfer.items():
                st = np.array([_rate(res.success[e], cc) for e in range(len(eps))])
                j = int(np.argmax(st - sb))
                if st[j] - sb[j] > best:
                    best = float(st[j] - sb[j])
                    text = f"from {src} at eps={eps[j]:g}: transfer {_pct(st[j])} vs white-box {_pct(sb[j])}"
            rows.append(_row(m, "B", best, grade(best, 0.02, 0.10, strict=True), text))
        else:
            rows.append(_row(m, "B", float("nan"), NA, "needs a second model as source"))
        a_inf = 1.0 - _rate(r.unbounded.success[0], cc)
        acc = 1.0 - sb
        rise = float(np.max(np.diff(acc))) if len(acc) > 1 else 0.0
        rise = max(rise, 0.0)
        verdict = FAIL if a_inf > 0.10 else PASS if (a_inf <= 0.01 and rise <= 0.05) else WARN
        rows.append(_row(m, "C", a_inf, verdict,
                         f"accuracy {_pct(a_inf)} at eps_inf={float(r.unbounded.epsilons[0]):g}; "
                         f"BIM accuracy {_pct(acc[0])} -> {_pct(acc[-1])} over eps "
                         f"{eps[0]:g}..{eps[-1]:g}; largest rise {100 * rise:.1f} pp"))
        fail_eps = [e for e in range(len(eps)) if sr[e] >= sb[e] and sr[e] >= 0.10]
        warn_eps = [e for e in range(len(eps)) if sb[e] < 0.9 and sr[e] >= sb[e] / 2 and sr[e] >= 0.05]
        e_show = (fail_eps or warn_eps or [int(np.argmax(sr - sb))])[0]
        verdict = FAIL if fail_eps else WARN if warn_eps else PASS
        rows.append(_row(m, "D", float(sr[e_show] - sb[e_show]), verdict,
                         f"eps={eps[e_show]:g}: random {_pct(sr[e_show])} vs BIM {_pct(sb[e_show])} "
                         f"(best of {r.n_random} draws)"))
        t = r.tracked
        silent = _rate(t.silent, cc)
        rows.append(_row(m, "P3", silent, _cap(grade(silent, 0.02, 0.10), int((t.silent & cc).sum())),
                         f"{_pct(silent)} at eps_ref={t.eps:g} (best-loss iterate not adversarial: "
                         f"{_pct(_rate(t.best_loss_not_adv, cc))}); last-iterate BIM {_pct(_rate(t.final_adv, cc))}"
                         f" vs any-iterate {_pct(_rate(t.any_adv, cc))}"))
        failed = cc & ~t.any_adv
        nf = int(failed.sum())
        inc = _rate(t.incomplete(), failed) if nf else 0.0
        rows.append(_row(m, "P4", inc, _cap(grade(inc, 0.10, 0.50), int((t.incomplete() & failed).sum())),
                         f"{int((t.incomplete() & failed).sum())} of {nf} failed samples at eps_ref={t.eps:g}"))
        if r.transfer:
            e_ref = int(np.argmin(np.abs(eps - r.eps_ref)))
            wb_fail = cc & ~r.bim.success[e_ref]
            flagged = torch.zeros_like(wb_fail)
            for src_name, res in r.transfer.items():
                flagged |= r.source_success[src_name][e_ref] & ~res.success[e_ref]
            flagged &= wb_fail
            nwf = int(wb_fail.sum())
            v = float(flagged.sum()) / nwf if nwf else 0.0
            verdict = WARN if (nwf >= 3 and v >= 0.5) else PASS
            rows.append(_row(m, "P5", v, verdict,
                             f"{int(flagged.sum())} of {nwf} white-box failures at eps_ref={r.eps_ref:g}"))
        else:
            rows.append(_row(m, "P5", float("nan"), NA, "needs a second model as surrogate"))
        p6 = 1.0 - _rate(r.unbounded.success[0], cc)
        rows.append(_row(m, "P6", p6, PASS if p6 == 0 else WARN if p6 < 0.05 else FAIL,
                         f"{int(round(p6 * n_cc))} of {n_cc} clean-correct samples survive"))
    st = r.stability
    v = float(st["unstable"].mean())
    rows.append(_row(m, "P2", v, grade(v, 0.02, 0.10),
                     f"{int(st['unstable'].sum())} of {len(st)} samples (prediction changed: "
                     f"{int(st['pred_changed'].sum())}; median loss range "
                     f"{float(np.median(st['loss_rel_range'])):.1e})"))
    return rows


def curves(r: AttackRuns) -> pd.DataFrame:
    """Long table: model, attack, epsilon, success (clean-correct), accuracy (all samples)."""
    rows = []
    cc = r.clean_correct
    y = r.bim.y
    series = {"fgsm": r.fgsm, "bim": r.bim}
    for name, res in series.items():
        for e, eps in enumerate(r.epsilons):
            rows.append((r.model, name, float(eps), _rate(res.success[e], cc),
                         float((res.adv_pred[e] == y).double().mean())))
    for e, eps in enumerate(r.epsilons):
        rows.append((r.model, "random", float(eps), _rate(r.random[e], cc), float("nan")))
    for src, res in r.transfer.items():
        for e, eps in enumerate(r.epsilons):
            rows.append((r.model, f"transfer:{src}", float(eps), _rate(res.success[e], cc),
                         float((res.adv_pred[e] == y).double().mean())))
    u = r.unbounded
    rows.append((r.model, "bim-unbounded", float(u.epsilons[0]), _rate(u.success[0], cc),
                 float((u.adv_pred[0] == y).double().mean())))
    return pd.DataFrame(rows, columns=["model", "attack", "epsilon", "success_rate", "accuracy"])
