"""Gradient statistics against closed forms and independent computations."""

from __future__ import annotations

import math
import warnings

import known_models as km
import numpy as np
import pytest
import torch

from robustcaps.diagnostics.gradients import (
    QUANTILES,
    compare_magnitudes,
    gradient_statistics,
    loss_profile,
    underflow_floor,
)
from robustcaps.errors import RobustcapsError


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def closed_form_ce_grad(net: km.LinearNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d CE / dx = W^T (softmax(z) - onehot(y)) for z = W vec(x) + b, in float64."""
    w = net.fc.weight.detach().double()
    z = x.flatten(1).double() @ w.T + net.fc.bias.detach().double()
    p = torch.softmax(z, dim=1) - torch.nn.functional.one_hot(y, w.shape[0]).double()
    return (p @ w).view_as(x)


def test_linear_gradient_matches_closed_form_and_norms():
    a = km.linear()
    x, y = km.data(32)
    ga = gradient_statistics(a, x, y)
    g_ref = closed_form_ce_grad(a.model, x, y)
    assert torch.allclose(ga.grad.double(), g_ref, rtol=1e-4, atol=1e-7)
    flat = g_ref.flatten(1).abs()
    np.testing.assert_allclose(ga.per_sample["l1"], flat.sum(1).numpy(), rtol=1e-4)
    np.testing.assert_allclose(ga.per_sample["l2"], flat.pow(2).sum(1).sqrt().numpy(), rtol=1e-4)
    np.testing.assert_allclose(ga.per_sample["linf"], flat.max(1).values.numpy(), rtol=1e-4)
    s = ga.summary
    # quantiles of the per-sample L2 norms: numpy on the same values
    q = np.quantile(ga.per_sample["l2"], QUANTILES)
    assert s["l2_q00"] == pytest.approx(q[0]) and s["l2_q50"] == pytest.approx(q[3])
    assert s["l2_q100"] == pytest.approx(q[-1])
    assert s["zero_fraction"] == 0.0 and s["nan_count"] == 0 and s["inf_count"] == 0
    # float32 vs float64 on a linear model: rounding only
    assert s["f64_rel_diff_median"] < 1e-5
    assert s["f64_sign_agreement"] > 0.999
    # central differences in float64 reproduce g.d closely on a smooth model
    assert s["fd_err_random_median"] < 1e-5 and s["fd_err_grad_median"] < 1e-5
    assert s["fd_mismatch_fraction"] == 0.0
    assert s["n_samples"] == 32 and s["n_entries"] == 32 * 64


def test_zero_fraction_is_exact_for_ignored_inputs():
    # The model ignores the first 16 of 64 inputs: exactly 25% of entries are zero.
    a = km.linear(zero_inputs=16)
    x, y = km.data(20)
    s = gradient_statistics(a, x, y, float64=False, finite_differences=False).summary
    assert s["zero_fraction"] == pytest.approx(0.25, abs=0)
    assert s["all_zero_sample_fraction"] == 0.0
    # zeros count as "below tau * max"; non-zero entries of this model are far above 1e-12
    assert s["below_1e-12_rel_fraction"] == pytest.approx(0.25, abs=0)
    assert "f64_rel_diff_median" not in s and "fd_err_random_median" not in s


def test_log10_quantiles_match_numpy():
    a = km.linear()
    x, y = km.data(16)
    ga = gradient_statistics(a, x, y, float64=False, finite_differences=False)
    v = np.log10(np.abs(ga.grad.double().numpy().ravel()))
    assert ga.summary["log10_abs_q50"] == pytest.approx(np.median(v), rel=1e-9)
    assert ga.log10_abs.size == v.size


def test_quantised_model_has_only_zero_gradients():
    a = km.quantised()
    x, y = km.data(16)
    ga = gradient_statistics(a, x, y)
    s = ga.summary
    assert s["zero_fraction"] == 1.0
    assert s["all_zero_sample_fraction"] == 1.0 and s["unavailable_sample_fraction"] == 1.0
    assert ga.log10_abs.size == 0 and math.isnan(s["log10_abs_q50"])
    # yet the model's output does depend on the input: moving far enough changes the loss
    from robustcaps.diagnostics.gradients import batched_loss
    assert not torch.equal(batched_loss(a, x, y), batched_loss(a, x + 0.3, y))


def test_saturated_probabilities_vanish_and_logits_do_not():
    x, y = km.data(32)
    probs = gradient_statistics(km.saturated_probabilities(), x, y).summary
    cw = gradient_statistics(km.saturated_logits("cw"), x, y).summary
    assert probs["unavailable_sample_fraction"] > 0.5
    assert probs["zero_fraction"] > 0.5
    assert cw["unavailable_sample_fraction"] == 0.0 and cw["zero_fraction"] == 0.0
    # cw gradient is w_j* - w_y: gain * O(1) entries, never tiny
    assert cw["log10_abs_q05"] > -2
    assert underflow_floor(torch.float32) == pytest.approx(1.1754944e-38 * 1e8)


def test_randomised_model_disagrees_with_itself():
    x, y = km.data(16)
    s = gradient_statistics(km.randomised(), x, y).summary
    assert s["f64_rel_diff_median"] > 0.1
    assert s["fd_mismatch_fraction"] > 0.5


def test_compare_magnitudes_states_orders_of_magnitude():
    x, y = km.data(16)
    a = gradient_statistics(km.linear(), x, y, float64=False, finite_differences=False)
    big = km.adapter(km.SaturatedNet(gain=1e4), "x1e4", output_key="logits", loss="cw")
    small = km.adapter(km.SaturatedNet(gain=1.0), "x1", output_key="logits", loss="cw")
    gb = gradient_statistics(big, x, y, float64=False, finite_differences=False)
    gs = gradient_statistics(small, x, y, float64=False, finite_differences=False)
    mag = compare_magnitudes([gs, gb, a]).set_index(["model", "reference"])
    # the cw gradient scales linearly with the gain: exactly 4 orders of magnitude
    assert mag.loc[("x1", "x1e4"), "log10_l1_ratio"] == pytest.approx(-4.0, abs=1e-5)
    assert mag.loc[("x1e4", "x1"), "median_l1_ratio"] == pytest.approx(1e4, rel=1e-5)
    assert len(mag) == 6


def test_loss_profile_rises_along_gradient():
    a = km.linear()
    x, y = km.data(8)
    ga = gradient_statistics(a, x, y, float64=False, finite_differences=False)
    pr = loss_profile(a, x, y, ga.grad, t_max=1.0, n_points=5)
    assert len(pr) == 2 * 5 * 8
    g = pr[pr["direction"] == "gradient"].groupby("t")["loss"].median()
    assert np.all(np.diff(g.to_numpy()) > 0)  # CE of a linear model rises along sign(grad)
    # t = 0 is the clean loss for both directions
    t0 = pr[pr["t"] == 0].groupby("direction")["loss"].apply(list)
    assert t0["gradient"] == pytest.approx(t0["random"])


def test_bad_input_is_a_clear_error():
    x, y = km.data(4)
    with pytest.raises(RobustcapsError, match="disagree"):
        gradient_statistics(km.linear(), x, y[:3])
