"""Masking indicators: known-answer models get the right verdicts; oracles for the parts."""

from __future__ import annotations

import warnings

import known_models as km
import numpy as np
import pytest
import torch

from robustcaps.diagnostics import CHECKS, ioaf, run_diagnostics
from robustcaps.diagnostics.indicators import FAIL, NA, PASS, WARN, grade, worst
from robustcaps.diagnostics.runs import random_sign_success, tracked_pgd, unstable_predictions
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
    assert set(v[v == NA].index) == {"G5", "B"}
    assert res.overall() == {"linear0": PASS}
    assert len(res.verdicts) == len(CHECKS)


def test_quantised_model_fails_on_zero_gradients(data):
    res = diagnose([km.quantised()], data)
    for cid in ("G1", "P1", "C", "D", "P6"):
        assert res.verdict("quantised", cid) == FAIL, cid
    assert res.stats.loc[0, "zero_fraction"] == 1.0
    # white-box attacks cannot move at all: BIM success stays exactly 0 at every epsilon
    pgd = res.curves[(res.curves["attack"] == "pgd")]
    assert (pgd["success_rate"] == 0).all()


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
def test_tracker_histories_agree_with_the_engine(data):
    x, y = data
    res, hist = tracked_pgd(km.linear(), x, y, [0.05, 0.1], steps=20, batch_size=24)
    assert sorted(hist) == [0.05, 0.1]
    for e, eps in enumerate((0.05, 0.1)):
        h = hist[eps]
        assert h.loss.shape == (21, N) and h.path.shape == (21, N)
        attacked = ~h.loss[0].isnan()
        # a sample fooled at 0.05 is not attacked again at 0.1 (early stop carries it)
        assert torch.equal(h.path.any(dim=0) & attacked, res.success[e] & attacked)
        failed = attacked & ~res.success[e]
        assert not h.loss[:, failed].isnan().any()  # a failing sample runs every step
    assert res.info["step_ratio"] == pytest.approx(1 / 3)


def test_silent_success_formula():
    path = torch.tensor([[False, False, False], [True, False, False], [False, False, True]])
    returned = torch.tensor([False, False, True])
    assert ioaf.silent_success(path, returned).tolist() == [True, False, False]


def test_silent_success_on_a_model_that_answers_differently_each_time(data):
    x, y = data
    res, hist = tracked_pgd(km.randomised(), x, y, [0.5], steps=10, batch_size=None)
    with torch.no_grad():
        again = km.randomised().predict(res.x_adv[0]).cpu() != y
    flags = ioaf.silent_success(hist[0.5].path, again)
    assert 0 < int(flags.sum()) < N


def reference_incomplete(loss: np.ndarray) -> bool:
    """The reference's rule written out for a minimised objective -L (test oracle)."""
    f = -np.asarray(loss, dtype=np.float64)
    if f.max() != 0:
        f = f - f.min()
        f = f / f.max() if f.max() > 0 else f
    best = np.minimum.accumulate(f)
    last = best[-min(len(best), 10):]
    return bool(last.max() - last.min() > 0.05)


def test_incomplete_optimization_matches_the_reference_rule():
    gen = torch.Generator().manual_seed(0)
    walks = torch.randn(51, 200, generator=gen, dtype=torch.float64).cumsum(dim=0)
    walks[:, :50] = torch.linspace(0, 1, 51, dtype=torch.float64)[:, None] ** 8  # late rise
    walks[:, 50:60] = 1 - torch.exp(-torch.arange(51.0, dtype=torch.float64))[:, None]  # converged
    mine = ioaf.incomplete_optimization(walks)
    ref = [reference_incomplete(walks[:, i].numpy()) for i in range(200)]
    assert mine.tolist() == ref
    assert mine[:50].all() and not mine[50:60].any() and 0 < int(mine[60:].sum()) < 140


def test_incomplete_optimization_known_answer():
    a = km.scalar_adapter(km.RampNet(), "ramp")
    x = torch.zeros(2, 1, 1, 1)
    y = torch.zeros(2, dtype=torch.long)
    # +0.2 per step, never clipped: the loss is still rising at the end
    res, hist = tracked_pgd(a, x, y, [5.0], steps=20, batch_size=None, step_size=0.2)
    assert not res.success.any() and ioaf.incomplete_optimization(hist[5.0].loss).all()
    # at the bound after 5 steps: flat for the last 16 passes
    _, hist = tracked_pgd(a, x, y, [1.0], steps=20, batch_size=None, step_size=0.2)
    assert not ioaf.incomplete_optimization(hist[1.0].loss).any()
    # 10 steps: the window of 10 passes spans the whole climb, as in the reference
    _, hist = tracked_pgd(a, x, y, [1.0], steps=10, batch_size=None, step_size=0.2)
    assert ioaf.incomplete_optimization(hist[1.0].loss).all()


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


def test_unstable_predictions(data):
    x, y = data
    stable = unstable_predictions(km.linear(), x, y, radius=8 / 255, gamma=10)
    assert stable.shape == (N,) and float(stable.mean()) < 0.05
    noisy = unstable_predictions(km.randomised(), x, y, radius=8 / 255, gamma=10)
    assert float(noisy.mean()) > 0.5
    # the formula: mean over draws of |L' - L| / |L| (|L| = 0 counts as 1), capped at 1
    ref = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    draws = torch.tensor([[3.0, 0.5, 10.0], [2.0, -0.5, 1.0]], dtype=torch.float64)
    assert ioaf.relative_change(ref, draws).tolist() == [0.25, 0.5, 1.0]


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


# ---------------------------------------------------------------- capsule-aware attacks
def fake_capsule_net():
    """A model whose attack fails (zero gradients) declared as a capsule network."""
    return km.adapter(km.QuantisedNet(), "caps", outputs="capsule_logits")


def test_attack_failure_on_a_capsule_network_names_the_capsule_aware_attacks(data):
    res = diagnose([fake_capsule_net(), km.linear()], data, finite_differences=False)
    assert res.verdict("caps", "P6") == FAIL
    assert res.recommended == {"caps": ["pgd-bpda", "vote-attack", "cw"]}  # not the linear one
    assert res.adaptive.empty  # named, not run, without adaptive=True


def test_adaptive_runs_the_attacks_the_registry_holds(data, monkeypatch):
    from robustcaps.attacks import native, registry
    from robustcaps.diagnostics.adaptive import available

    # stand-in registration: vote-attack exists in this installation for this test
    monkeypatch.setitem(registry._ATTACKS, "vote-attack",
                        registry.AttackEntry("vote-attack", "test", {"native": native.BIM}))
    res = diagnose([fake_capsule_net()], data, finite_differences=False, adaptive=True,
                   epsilons=[0.1, 0.5])
    ad = res.adaptive
    status = ad.groupby("attack", sort=False)["status"].first().to_dict()
    assert list(status) == ["pgd-bpda", "vote-attack", "cw"]
    assert status["vote-attack"] == "ran" and status["cw"] == "ran"
    # the stand-in has capsule logits but no EM-routing layers for routing-BPDA to hold
    assert available("pgd-bpda")
    assert status["pgd-bpda"].startswith("unavailable: ") and "no routing layers" in status["pgd-bpda"]
    ran = ad[ad["attack"].isin(["vote-attack", "cw"])]
    assert ran["epsilon"].tolist() == [0.1, 0.5, 0.1, 0.5]
    assert (ran["success_rate"] == 0.0).all()  # zero gradients: no attack moves this one
