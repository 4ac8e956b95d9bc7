"""Masking indicators: known-answer models get the right verdicts; oracles for the parts."""

from __future__ import annotations

import warnings

import known_models as km
import numpy as np
import pytest
import torch

from robustcaps.diagnostics import CHECKS, run_diagnostics
from robustcaps.diagnostics.indicators import (
    FAIL,
    NA,
    PASS,
    WARN,
    grade,
    prediction_stability,
    random_sign_success,
    tracked_bim,
    worst,
)
from robustcaps.errors import RobustcapsError

N = 64


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def data():
    return km.data(N)


def diagnose(adapters, data, **kw):
    x, y = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_diagnostics(adapters, x, y, progress=False, **kw)


# ---------------------------------------------------------------- known-answer models
def test_clean_linear_model_flags_nothing(data):
    res = diagnose([km.linear()], data)
    v = res.verdicts.set_index("id")["verdict"]
    assert set(v) <= {PASS, NA}, res.verdicts[res.verdicts["verdict"] != PASS]
    # N/A only where a second model is needed
    assert set(v[v == NA].index) == {"G5", "B", "P5"}
    assert res.overall() == {"linear0": PASS}
    assert len(res.verdicts) == len(CHECKS)


def test_quantised_model_fails_on_zero_gradients(data):
    res = diagnose([km.quantised()], data)
    for cid in ("G1", "P1", "C", "D", "P6"):
        assert res.verdict("quantised", cid) == FAIL, cid
    assert res.stats.loc[0, "zero_fraction"] == 1.0
    # white-box attacks cannot move at all: BIM success stays exactly 0 at every epsilon
    bim = res.curves[(res.curves["attack"] == "bim")]
    assert (bim["success_rate"] == 0).all()


def test_saturated_softmax_flagged_on_probabilities_not_on_logits(data):
    res = diagnose([km.saturated_probabilities(), km.saturated_logits("cw")], data)
    assert res.verdict("saturated-probs", "P1") == FAIL
    assert res.verdict("saturated-probs", "G1") == FAIL
    assert res.verdict("saturated-probs", "D") == FAIL
    assert res.verdict("saturated-probs", "P6") == FAIL
    # orders of magnitude: the probability loss has (near-)zero gradients, stated as -inf/<<0
    assert res.verdict("saturated-probs", "G5") == FAIL
    # the same network through its logits: no gradient check fires, no attack failure
    logits = res.verdicts[res.verdicts["model"] == "saturated-logits-cw"]
    assert set(logits["verdict"]) <= {PASS}, logits[logits["verdict"] != PASS]
    # transfer from the logit attack fools the probability model: B flags the masking too
    assert res.verdict("saturated-probs", "B") == FAIL


def test_cross_entropy_on_saturated_logits_still_vanishes(data):
    # Documented behaviour: (softmax(z) - onehot) underflows in float32 once logit gaps
    # exceed ~100, so CE on logits is not enough for this model; the logit margin is.
    res = diagnose([km.saturated_logits("ce")], data, attacks=False)
    assert res.verdict("saturated-logits-ce", "P1") == FAIL


def test_randomised_model_unstable(data):
    res = diagnose([km.randomised()], data)
    assert res.verdict("randomised", "P2") == FAIL
    assert res.verdict("randomised", "G3") == FAIL
    row = res.verdicts[(res.verdicts["id"] == "P2")].iloc[0]
    assert row["value"] > 0.5


def test_transfer_indicators_between_two_clean_models(data):
    res = diagnose([km.linear(0), km.linear(1)], data)
    for m in ("linear0", "linear1"):
        assert res.verdict(m, "B") == PASS  # white-box beats transfer on a clean model
        assert res.verdict(m, "G5") == PASS
    mag = res.magnitudes
    assert len(mag) == 2
    assert np.allclose(mag["log10_l1_ratio"].sum(), 0.0)  # antisymmetric
    assert {"transfer:linear1", "transfer:linear0"} <= set(res.curves["attack"])


# ---------------------------------------------------------------- oracles for the parts
def test_tracked_bim_agrees_with_the_engine(data):
    from robustcaps.attacks import get_attack

    x, y = data
    a = km.linear()
    for eps in (0.05, 0.1):
        t = tracked_bim(a, x, y, eps, steps=10)
        early = get_attack("bim", steps=10).run(a, x, y, [eps])
        full = get_attack("bim", steps=10, early_stop=False).run(a, x, y, [eps])
        assert torch.equal(t.any_adv, early.success[0])
        assert torch.equal(t.final_adv, full.success[0])
        assert t.loss.shape == (11, N) and t.adv.shape == (11, N)
        assert t.step_size == pytest.approx(1.25 * eps / 10)


def test_silent_success_known_answer():
    a = km.scalar_adapter(km.BumpNet(), "bump")
    x = torch.zeros(3, 1, 1, 1)
    y = torch.zeros(3, dtype=torch.long)
    t = tracked_bim(a, x, y, eps=2.0, steps=4, step_size=0.8)
    assert t.adv[:, 0].tolist() == [False, True, False, True, False]
    assert t.silent.all() and not t.final_adv.any() and t.any_adv.all()
    assert not t.best_loss_not_adv.any()  # the highest loss is at x = 0.8, adversarial
    t3 = tracked_bim(a, x, y, eps=2.0, steps=3, step_size=0.8)
    assert not t3.silent.any()  # odd step count ends on 0.8


def test_incomplete_optimisation_known_answer():
    a = km.scalar_adapter(km.RampNet(), "ramp")
    x = torch.zeros(2, 1, 1, 1)
    y = torch.zeros(2, dtype=torch.long)
    rising = tracked_bim(a, x, y, eps=5.0, steps=10, step_size=0.5)  # +0.5 per step, no clip
    assert not rising.any_adv.any()
    assert rising.incomplete().all()
    clipped = tracked_bim(a, x, y, eps=1.0, steps=10, step_size=0.5)  # at the bound after 2 steps
    assert not clipped.incomplete().any()


def test_random_sign_success_monotone_for_linear_model(data):
    x, y = data
    a = km.linear()
    eps = [1e-4, 0.05, 0.2, 1.0, 5.0]
    r = random_sign_success(a, x, y, eps, n_draws=4, seed=3)
    assert r.shape == (5, N)
    # shared draws + a linear model: once misclassified along d, larger eps stay so
    for e in range(4):
        assert bool((r[e] <= r[e + 1]).all())
    assert not r[0].any()  # 1e-4 * ||w_j - w_y||_1 is far below every margin here
    # oracle: draw-by-draw loop over the same draws
    gen = torch.Generator().manual_seed(3)
    d = torch.randint(0, 2, (4, *x.shape), generator=gen) * 2 - 1
    ref = torch.zeros(N, dtype=torch.bool)
    for k in range(4):
        ref |= a.predict(x + 0.2 * d[k]).cpu() != y
    assert torch.equal(r[2], ref)


def test_prediction_stability(data):
    x, y = data
    stable = prediction_stability(km.linear(), x, y, noise=1e-4)
    assert not stable["unstable"].any()
    assert stable["loss_rel_range"].max() < 0.01
    noisy = prediction_stability(km.randomised(), x, y, noise=1e-4)
    assert noisy["unstable"].mean() > 0.5


def test_grade_and_worst():
    assert grade(0.01, 0.05, 0.5) == PASS
    assert grade(0.05, 0.05, 0.5) == WARN
    assert grade(0.5, 0.05, 0.5) == FAIL
    assert grade(0.05, 0.05, 0.5, strict=True) == PASS
    assert grade(float("nan"), 0.05, 0.5) == NA
    assert worst([PASS, NA, WARN]) == WARN and worst([NA]) == NA and worst([FAIL, PASS]) == FAIL


def test_bad_inputs(data):
    x, y = data
    with pytest.raises(RobustcapsError, match="unique"):
        run_diagnostics([km.linear(), km.linear()], x, y, progress=False)
    with pytest.raises(RobustcapsError, match="shape"):
        run_diagnostics([km.linear()], x[:, :, :4], y, progress=False)
    with pytest.raises(RobustcapsError, match="at least one"):
        run_diagnostics([], x, y, progress=False)
    with pytest.raises(RobustcapsError, match="epsilons"):
        run_diagnostics([km.linear()], x, y, epsilons=[0.1, -1], progress=False)
