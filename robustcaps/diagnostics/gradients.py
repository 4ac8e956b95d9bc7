"""Gradient statistics of a model's attack loss w.r.t. its input.

Everything here is measured on the gradient that a white-box attack would use: the
gradient of ``adapter.loss`` (the model's attack loss, cross-entropy by default) w.r.t.
the input, one row per sample. :func:`gradient_statistics` returns

- per-sample numbers (loss, L1/L2/Linf norms, share of exactly-zero entries, float32 vs
  float64 disagreement, finite-difference errors), and
- a flat summary: exact-zero share, shares below 1e-12 and 1e-20 of the sample's largest
  entry, all-zero samples, NaN/Inf counts, quantiles of the per-sample norms and of
  ``log10|g|``, float32-vs-float64 relative difference and sign agreement, and the
  agreement of ``g . d`` with central finite differences along random and
  gradient-aligned directions.

Shapes: ``x`` is (N, *input_shape), ``y`` is (N,) int64, gradients are (N, *input_shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import RobustcapsError
from ..models.adapter import ModelAdapter

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
RELATIVE_THRESHOLDS = (1e-12, 1e-20)
# A gradient whose largest entry is within 8 decades of the dtype's smallest normal number
# (float32: 1.2e-30) is numerically unusable: products with it underflow.
UNDERFLOW_DECADES = 8
# Central-difference step: L2 length of the step in input units, evaluated in float64. Small
# enough that a ReLU/max-pool network rarely crosses a kink within +-h (1e-3 did, on the
# untrained CNN), large enough that float64 rounding (~1e-16 |L| / h) stays negligible.
FD_STEP = 1e-6
FD_MISMATCH = 0.5  # relative error along g/|g| above which a sample counts as a mismatch
MAX_HIST_VALUES = 200_000


def underflow_floor(dtype: torch.dtype) -> float:
    """Largest |g| counted as an unavailable (underflowing) gradient for ``dtype``."""
    return float(torch.finfo(dtype).tiny) * 10.0**UNDERFLOW_DECADES


@dataclass
class GradientAnalysis:
    """Gradient statistics of one model.

    Attributes:
        model: the adapter's display name.
        summary: flat dict of statistics (JSON-ready floats/ints).
        per_sample: DataFrame, one row per sample (see :func:`gradient_statistics`).
        log10_abs: 1-D float64 array of ``log10|g|`` over non-zero finite entries
            (subsampled to at most 200,000 values), for histograms.
        grad: (N, *input_shape) float32 gradient in the model's dtype, on the CPU.
    """

    model: str
    summary: dict[str, Any]
    per_sample: pd.DataFrame
    log10_abs: np.ndarray
    grad: torch.Tensor = field(repr=False)


def _batches(n: int, batch_size: int | None) -> list[slice]:
    bs = batch_size or n or 1
    return [slice(i, min(i + bs, n)) for i in range(0, n, bs)]


def compute_gradients(
    adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attack-loss gradients in batches: ``(loss (N,), grad (N, *in), scores (N, K))`` on the CPU."""
    losses, grads, scores = [], [], []
    for sl in _batches(x.shape[0], batch_size):
        lo, g, s = adapter.input_gradient(x[sl], y[sl])
        losses.append(lo.cpu())
        grads.append(g.cpu())
        scores.append(s.cpu())
    return torch.cat(losses), torch.cat(grads), torch.cat(scores)


@torch.no_grad()
def batched_loss(
    adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """Per-sample attack loss (N,) on the CPU, in the adapter's dtype."""
    out = []
    for sl in _batches(x.shape[0], batch_size):
        xb = x[sl].to(adapter.device, adapter.dtype)
        out.append(adapter.loss(adapter.scores(xb), y[sl].to(adapter.device)).cpu())
    return torch.cat(out)


def _quantiles(values: np.ndarray, prefix: str) -> dict[str, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {f"{prefix}_q{int(q * 100):02d}": float("nan") for q in QUANTILES}
    qs = np.quantile(values, QUANTILES)
    return {f"{prefix}_q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs, strict=True)}


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Symmetric relative error |a-b| / max(|a|,|b|), 0 where both are exactly 0."""
    num = (a - b).abs()
    den = torch.maximum(a.abs(), b.abs())
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def gradient_statistics(
    adapter: ModelAdapter,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int | None = None,
    float64: bool = True,
    finite_differences: bool = True,
    fd_step: float = FD_STEP,
    n_random_directions: int = 1,
    seed: int = 0,
) -> GradientAnalysis:
    """Measure the input gradient of ``adapter``'s attack loss on ``x`` (N, *in), ``y`` (N,).

    Per-sample columns of ``per_sample``: ``sample``, ``loss``, ``correct`` (clean prediction
    equals ``y``), ``l1``, ``l2``, ``linf`` (norms of the gradient), ``zero_fraction``
    (share of exactly-zero entries), ``all_zero``, ``unavailable`` (whole gradient zero or
    its largest entry below :func:`underflow_floor`), ``nonfinite`` (NaN/Inf entries), and
    with ``float64``: ``rel_diff_f64`` (``||g32 - g64||_2 / ||g64||_2``, 0 when both are 0, 1
    when only g64 is 0), ``cos_f64``, ``sign_agree_f64`` (share of entries whose sign
    matches the float64 gradient); with ``finite_differences``: ``fd_err_random`` (worst over
    the random directions) and ``fd_err_grad`` (along ``g / |g|``, NaN where g = 0) of
    ``|FD - g.d| / max(|FD|, |g.d|)`` where ``FD = (L(x + h d) - L(x - h d)) / (2h)`` with a
    unit-L2 direction ``d``, computed on a float64 copy of the model (so float32 rounding
    does not pollute the derivative check; float32 issues are what ``rel_diff_f64``
    measures).
    """
    if x.ndim < 2 or x.shape[0] != y.shape[0]:
        raise RobustcapsError(f"x (N, ...) and y (N,) disagree: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise RobustcapsError("gradient statistics need at least one sample")
    n = x.shape[0]
    loss, g, scores = compute_gradients(adapter, x, y, batch_size)
    flat = g.reshape(n, -1).double()
    absg = flat.abs()
    finite = torch.isfinite(flat)
    absg_f = torch.where(finite, absg, torch.zeros_like(absg))
    linf = absg_f.max(dim=1).values
    per = pd.DataFrame({
        "sample": np.arange(n),
        "loss": loss.double().numpy(),
        "correct": (scores.argmax(dim=1) == y.cpu()).numpy(),
        "l1": absg_f.sum(dim=1).numpy(),
        "l2": absg_f.pow(2).sum(dim=1).sqrt().numpy(),
        "linf": linf.numpy(),
        "zero_fraction": (flat == 0).double().mean(dim=1).numpy(),
        "all_zero": (flat == 0).all(dim=1).numpy(),
        "unavailable": (linf <= underflow_floor(adapter.dtype)).numpy(),
        "nonfinite": (~finite).sum(dim=1).numpy(),
    })
    summary: dict[str, Any] = {
        "model": adapter.name,
        "loss_kind": adapter.loss_name,
        "outputs": adapter.outputs,
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "n_samples": n,
        "n_entries": int(flat.numel()),
        "clean_accuracy": float(per["correct"].mean()),
        "loss_median": float(np.median(per["loss"])),
        "zero_fraction": float((flat == 0).double().mean()),
        "all_zero_sample_fraction": float(per["all_zero"].mean()),
        "unavailable_sample_fraction": float(per["unavailable"].mean()),
        "nan_count": int(torch.isnan(flat).sum()),
        "inf_count": int(torch.isinf(flat).sum()),
        "underflow_floor": underflow_floor(adapter.dtype),
    }
    for tau in RELATIVE_THRESHOLDS:
        below = absg_f <= tau * linf[:, None]
        summary[f"below_{tau:.0e}_rel_fraction"] = float(below.double().mean())
    nz = absg_f[(absg_f > 0)]
    log10_abs = torch.log10(nz).numpy() if nz.numel() else np.zeros(0)
    summary.update(_quantiles(log10_abs, "log10_abs"))
    for col in ("l1", "l2", "linf"):
        summary.update(_quantiles(per[col].to_numpy(), col))

    if float64 or finite_differences:
        try:
            a64 = adapter.to(dtype=torch.float64)
        except Exception as exc:  # noqa: BLE001 - a third-party module may refuse float64
            raise RobustcapsError(f"model {adapter.name!r} cannot be copied to float64: {exc}") from exc
        x64 = x.detach().double()
        _, g64, _ = compute_gradients(a64, x64, y, batch_size)
        f64 = g64.reshape(n, -1).double()
    if float64:
        n64 = f64.norm(dim=1)
        diff = (flat - f64).norm(dim=1)
        rel = torch.where(n64 > 0, diff / n64.clamp_min(1e-300), (diff > 0).double())
        n32 = flat.norm(dim=1)
        cos = (flat * f64).sum(dim=1) / (n32 * n64).clamp_min(1e-300)
        cos = torch.where((n32 > 0) & (n64 > 0), cos, (n32 == n64).double())
        per["rel_diff_f64"] = rel.numpy()
        per["cos_f64"] = cos.numpy()
        per["sign_agree_f64"] = (torch.sign(flat) == torch.sign(f64)).double().mean(dim=1).numpy()
        summary["f64_rel_diff_median"] = float(np.nanmedian(per["rel_diff_f64"]))
        summary["f64_rel_diff_max"] = float(np.nanmax(per["rel_diff_f64"]))
        summary["f64_cos_median"] = float(np.nanmedian(per["cos_f64"]))
        summary["f64_sign_agreement"] = float(per["sign_agree_f64"].mean())
        summary["f64_l1_ratio_median"] = float(
            np.nanmedian(per["l1"].to_numpy() / np.maximum(f64.abs().sum(dim=1).numpy(), 1e-300))
        )
    if finite_differences:
        gen = torch.Generator().manual_seed(seed)
        errs_rand = torch.zeros(n, dtype=torch.float64)
        for _ in range(n_random_directions):
            d = torch.randn(f64.shape, generator=gen, dtype=torch.float64)
            d = d / d.norm(dim=1, keepdim=True)
            errs_rand = torch.maximum(errs_rand, _fd_errors(a64, x64, y, f64, d, fd_step, batch_size))
        n64 = f64.norm(dim=1, keepdim=True)
        has = n64.squeeze(1) > 0
        d_grad = torch.where(n64 > 0, f64 / n64.clamp_min(1e-300), torch.zeros_like(f64))
        err_grad = _fd_errors(a64, x64, y, f64, d_grad, fd_step, batch_size)
        err_grad = torch.where(has, err_grad, torch.full_like(err_grad, float("nan")))
        per["fd_err_random"] = errs_rand.numpy()
        per["fd_err_grad"] = err_grad.numpy()
        summary["fd_step"] = fd_step
        summary["fd_err_random_median"] = float(np.nanmedian(per["fd_err_random"]))
        summary["fd_err_grad_median"] = (
            float(np.nanmedian(per["fd_err_grad"])) if bool(has.any()) else float("nan")
        )
        # Judged along the gradient itself: a central difference averages the one-sided
        # derivatives at a kink (ReLU / max-pool ties on flat image regions give errors up to
        # ~0.4), while a gradient that does not describe the loss (noise, numerically flat
        # loss) gives errors near 1 or above.
        summary["fd_mismatch_fraction"] = float(
            np.mean(np.nan_to_num(per["fd_err_grad"].to_numpy(), nan=0.0) > FD_MISMATCH)
        )
    hist = log10_abs
    if hist.size > MAX_HIST_VALUES:
        hist = np.random.default_rng(seed).choice(hist, MAX_HIST_VALUES, replace=False)
    return GradientAnalysis(adapter.name, summary, per, np.asarray(hist, dtype=np.float64), g)


def _fd_errors(
    a64: ModelAdapter,
    x64: torch.Tensor,
    y: torch.Tensor,
    g64: torch.Tensor,
    d: torch.Tensor,
    h: float,
    batch_size: int | None,
) -> torch.Tensor:
    """Per-sample |FD - g.d| / max(|FD|, |g.d|) for unit directions ``d`` (N, D)."""
    step = (h * d).reshape(x64.shape)
    lp = batched_loss(a64, x64 + step, y, batch_size).double()
    lm = batched_loss(a64, x64 - step, y, batch_size).double()
    fd = (lp - lm) / (2 * h)
    analytic = (g64 * d).sum(dim=1)
    return _rel_error(fd, analytic)


def compare_magnitudes(analyses: list[GradientAnalysis]) -> pd.DataFrame:
    """Pairwise orders of magnitude between models' gradients.

    One row per ordered pair (a, b), a != b: ``median_l1_ratio`` = median_i ||g_a(x_i)||_1 /
    median_i ||g_b(x_i)||_1, ``log10_ratio`` its log10 (negative: a's gradients are that
    many orders of magnitude smaller), the same for the per-sample Linf norm, and
    ``median_log10_abs_diff`` = median log10|g_a| - median log10|g_b| over non-zero entries.
    """
    rows = []
    for a in analyses:
        for b in analyses:
            if a is b:
                continue
            ma = float(np.median(a.per_sample["l1"]))
            mb = float(np.median(b.per_sample["l1"]))
            la = float(np.median(a.per_sample["linf"]))
            lb = float(np.median(b.per_sample["linf"]))
            ratio = ma / mb if mb > 0 else (math.inf if ma > 0 else float("nan"))
            lratio = la / lb if lb > 0 else (math.inf if la > 0 else float("nan"))
            rows.append({
                "model": a.model,
                "reference": b.model,
                "median_l1_ratio": ratio,
                "log10_l1_ratio": _log10(ratio),
                "median_linf_ratio": lratio,
                "log10_linf_ratio": _log10(lratio),
                "median_log10_abs_diff": a.summary["log10_abs_q50"] - b.summary["log10_abs_q50"],
            })
    return pd.DataFrame(rows, columns=["model", "reference", "median_l1_ratio", "log10_l1_ratio",
                                       "median_linf_ratio", "log10_linf_ratio",
                                       "median_log10_abs_diff"])


def _log10(v: float) -> float:
    if v == 0:
        return -math.inf
    if not math.isfinite(v):
        return v
    return math.log10(v)


@torch.no_grad()
def loss_profile(
    adapter: ModelAdapter,
    x: torch.Tensor,
    y: torch.Tensor,
    grad: torch.Tensor,
    t_max: float,
    *,
    n_points: int = 11,
    seed: int = 0,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Loss and correctness along ``x + t sign(g)`` and along a random sign direction.

    ``t`` runs over ``n_points`` values in [0, t_max] (L-infinity size). Returns a long
    DataFrame with columns model, direction (``gradient``/``random``), t, sample, loss, correct.
    """
    gen = torch.Generator().manual_seed(seed)
    directions = {
        "gradient": torch.sign(grad.double()).to(x.dtype),
        "random": (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1).to(x.dtype),
    }
    n = x.shape[0]
    ts = torch.linspace(0.0, t_max, n_points, dtype=torch.float64)
    yt = y.cpu().repeat(n_points)
    frames = []
    for name, d in directions.items():
        # all (t, sample) points as one (n_points * n, ...) batch: t-major order
        xt = (x.cpu()[None] + ts.to(x.dtype).view(-1, *[1] * x.ndim) * d.cpu()[None]).flatten(0, 1)
        losses, preds = [], []
        for sl in _batches(xt.shape[0], batch_size):
            s = adapter.scores(adapter.clip(xt[sl].to(adapter.device, adapter.dtype)))
            losses.append(adapter.loss(s, yt[sl].to(adapter.device)).double().cpu())
            preds.append(s.argmax(dim=1).cpu())
        frames.append(pd.DataFrame({
            "model": adapter.name,
            "direction": name,
            "t": ts.repeat_interleave(n).numpy(),
            "sample": np.tile(np.arange(n), n_points),
            "loss": torch.cat(losses).numpy(),
            "correct": (torch.cat(preds) == yt).numpy(),
        }))
    return pd.concat(frames, ignore_index=True)
