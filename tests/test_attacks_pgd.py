"""Native PGD: budgets, bounds, closed forms on linear models, seeding, strength, costs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attack_models import blobs, fitted_mlp, linear_adapter

from robustcaps.attacks.native import BIM
from robustcaps.attacks.pgd import PGD
from robustcaps.attacks.sweep import HistoryTracker, random_start
from robustcaps.errors import RobustcapsError

EPS = [0.0, 0.05, 0.1, 0.3, 1.0]


@pytest.fixture(scope="module")
def mlp():
    return fitted_mlp(k=5)


@pytest.fixture(scope="module")
def data():
    return blobs(120, 5, seed=7)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [False, True])
def test_budget_and_eps0(norm, targeted, mlp, data):
    x, y = data
    t = (y + 1) % 5 if targeted else None
    res = PGD(norm=norm, steps=10).run(mlp, x, y, EPS, targets=t, return_adv=True)
    size = res.linf if norm == "linf" else res.l2
    for e, eps in enumerate(EPS):
        assert float(size[e].max()) <= eps + 1e-6
    assert torch.equal(res.adv_pred[0], mlp.predict(x))
    assert res.success_rate[-1] > res.success_rate[1]  # the sweep does something


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_bounds_hold(norm):
    a = linear_adapter(k=3, seed=2, bounds=(0.0, 1.0))
    x = torch.rand(64, 1, 3, 4)
    x[:8], x[8:16] = 0.0, 1.0
    y = torch.randint(0, 3, (64,))
    res = PGD(norm=norm, steps=5).run(a, x, y, [0.0, 0.3, 5.0], return_adv=True)
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_linear_closed_form(norm):
    # Two classes, targeted at the other class: the smallest flipping perturbation has
    # norm margin / ||w_y - w_t||_dual, so PGD must succeed above it and cannot below.
    a = linear_adapter(k=2, seed=5)
    x = torch.randn(200, 1, 3, 4)
    y = a.predict(x)
    t = 1 - y
    w, b = a.model[1].weight.detach(), a.model[1].bias.detach()
    dw = w[t] - w[y]
    margin = -(x.flatten(1) * dw).sum(1) - (b[t] - b[y])  # z_y - z_t > 0
    dual = dw.abs().sum(1) if norm == "linf" else dw.norm(dim=1)
    needed = margin / dual
    eps = float(needed.median())
    res = PGD(norm=norm, steps=50).run(a, x, y, [eps], targets=t)
    clear = (needed - eps).abs() > 0.02 * eps  # rounding band around the threshold
    assert torch.equal(res.success[0][clear], (needed < eps)[clear])
    assert torch.equal(res.success[0], res.adv_pred[0] == t)


def test_targeted_reaches_target_multiclass():
    a = linear_adapter(k=4, seed=7)
    x = torch.randn(60, 1, 3, 4) * 0.3
    y = a.predict(x)
    t = (y + 1) % 4
    res = PGD(steps=30).run(a, x, y, [0.0, 10.0], targets=t)
    assert res.success_rate[0] == 0.0 and res.success_rate[1] >= 0.95


def test_fixed_seed_is_reproducible_and_batch_independent(mlp, data):
    x, y = data
    one = PGD(steps=5, seed=3).run(mlp, x, y, [0.1, 0.2], return_adv=True)
    again = PGD(steps=5, seed=3).run(mlp, x, y, [0.1, 0.2], return_adv=True)
    assert torch.equal(one.x_adv, again.x_adv)
    split = PGD(steps=5, seed=3, batch_size=7).run(mlp, x, y, [0.1, 0.2], return_adv=True)
    assert torch.equal(one.adv_pred, split.adv_pred)
    torch.testing.assert_close(one.x_adv, split.x_adv, rtol=0, atol=1e-5)
    # without carry-over the result at an epsilon does not depend on the others
    alone = PGD(steps=5, seed=3, early_stop=False).run(mlp, x, y, [0.2], return_adv=True)
    sweep = PGD(steps=5, seed=3, early_stop=False).run(mlp, x, y, [0.1, 0.2], return_adv=True)
    torch.testing.assert_close(alone.x_adv[0], sweep.x_adv[1], rtol=0, atol=1e-6)
    other = PGD(steps=5, seed=4).run(mlp, x, y, [0.1], return_adv=True)
    assert not torch.equal(other.x_adv[0], one.x_adv[0])


def test_pgd_at_least_as_strong_as_bim(mlp, data):
    x, y = data
    eps = [0.1, 0.2, 0.3, 0.5]
    bim = BIM(steps=10).run(mlp, x, y, eps)
    pgd = PGD(steps=50).run(mlp, x, y, eps)
    assert np.all(pgd.accuracy <= bim.accuracy)
    assert pgd.accuracy.sum() < bim.accuracy.sum()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_unbounded_fools_every_clean_correct_sample(norm, mlp, data):
    # The CW margin: the CE gradient vanishes exactly in float32 once the softmax
    # saturates, which a random start far out in a huge ball can reach.
    x, y = data
    res = PGD(norm=norm, steps=20, loss="cw").run(mlp, x, y, [1e3])
    assert res.accuracy[0] == 0.0


def test_restarts_only_add_successes(mlp, data):
    x, y = data
    one = PGD(steps=5, restarts=1).run(mlp, x, y, [0.2])
    three = PGD(steps=5, restarts=3).run(mlp, x, y, [0.2])
    assert bool((three.success | ~one.success).all())
    assert three.info["backwards"] > one.info["backwards"]


def test_keeps_first_success_or_highest_loss(mlp, data):
    x, y = data
    tracker = HistoryTracker()
    res = PGD(steps=8, early_stop=False, tracker=tracker).run(mlp, x, y, [0.15], return_adv=True)
    (run,) = tracker.runs
    assert run["steps"] == list(range(9))
    loss = torch.stack(run["loss"])  # (steps + 1, M)
    succ = torch.stack(run["success"])
    rows = run["context"]["index"]
    kept_loss = mlp.loss(mlp.scores(res.x_adv[0][rows]), y[rows]).detach()
    for j in range(len(rows)):
        if bool(succ[:, j].any()):
            first = int(succ[:, j].nonzero()[0])
            assert kept_loss[j] == pytest.approx(float(loss[first, j]), rel=1e-5, abs=1e-6)
        else:
            assert kept_loss[j] == pytest.approx(float(loss[:, j].max()), rel=1e-5, abs=1e-6)
    assert bool(succ.any()) and not bool(succ.all())


def test_tracker_interface_and_costs(mlp, data):
    x, y = data
    calls = []

    def tracker(step, loss, grad_norm, success):
        calls.append((step, loss.shape, grad_norm.clone(), success.dtype))

    res = PGD(steps=4, tracker=tracker).run(mlp, x, y, [0.0, 0.1])
    robust = int((res.clean_pred == y).sum())
    assert [c[0] for c in calls] == list(range(5))
    assert all(c[1] == (robust,) and c[3] == torch.bool for c in calls)
    assert bool(torch.isnan(calls[-1][2]).all())  # the last iterate needs no gradient
    fw, bw = res.info["sample_forwards"], res.info["sample_backwards"]
    assert fw.shape == bw.shape == (2, 120) and fw[0].sum() == 0
    assert bw[1].max() <= 4 and fw[1].max() <= 5
    assert res.info["backwards"] == 4 and res.info["forwards"] <= 6


def test_early_stop_saves_work_not_results(mlp, data):
    x, y = data
    fast = PGD(steps=10).run(mlp, x, y, [0.2])
    full = PGD(steps=10, early_stop=False).run(mlp, x, y, [0.2])
    assert torch.equal(fast.success, full.success)
    assert fast.info["sample_backwards"].sum() < full.info["sample_backwards"].sum()


def test_l2_start_is_uniform_in_the_ball():
    d, eps = (1, 4, 4), 0.5
    delta = random_start(d, torch.arange(4000), seed=0, eps=eps, run=0, norm="l2", mode="ball")
    r = delta.flatten(1).norm(dim=1) / eps
    assert float(r.max()) <= 1.0 + 1e-9
    # uniform in a 16-ball: P(r <= q) = q^16, so r^16 is uniform on [0, 1]
    u = (r**16).numpy()
    assert abs(np.median(u) - 0.5) < 0.04 and abs(np.mean(u < 0.1) - 0.1) < 0.03


@pytest.mark.parametrize("kwargs", [{"norm": "l1"}, {"steps": 0}, {"restarts": 0},
                                    {"step_size": -1.0}, {"tracker": 3}, {"loss": "dlr"}])
def test_bad_settings(kwargs):
    with pytest.raises(RobustcapsError):
        PGD(**kwargs)


def test_bim_reports_per_sample_costs(mlp, data):
    x, y = data
    res = BIM(steps=6).run(mlp, x, y, [0.0, 0.1, 0.3])
    bw, fw = res.info["sample_backwards"], res.info["sample_forwards"]
    assert bw.shape == (3, 120) and bw[0].sum() == 0 and bw.max() <= 6
    # the batched counts are at least the busiest sample's
    assert res.info["backwards"] >= bw.sum(axis=0).max() and fw.sum() > bw.sum()
    split = BIM(steps=6, batch_size=50).run(mlp, x, y, [0.0, 0.1, 0.3])
    assert np.array_equal(split.info["sample_backwards"], bw)
