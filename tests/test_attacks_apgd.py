"""Native APGD / APGD-T: DLR losses, schedule, budgets, few classes, and agreement with
torchattacks' APGD on identical inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attack_models import blobs, fitted_mlp, linear_adapter

from robustcaps.attacks.apgd import (
    APGD,
    APGDT,
    checkpoint_gaps,
    dlr_loss,
    dlr_loss_targeted,
    loss_used,
)
from robustcaps.attacks.backends import TorchattacksAPGD, TorchattacksAPGDT
from robustcaps.attacks.pgd import PGD
from robustcaps.attacks.sweep import HistoryTracker
from robustcaps.errors import RobustcapsError


@pytest.fixture(scope="module")
def mlp():
    return fitted_mlp(k=5)


@pytest.fixture(scope="module")
def data():
    return blobs(120, 5, seed=7)


def test_dlr_losses_by_hand():
    z = torch.tensor([[4.0, 1.0, 3.0, 0.0, 2.0], [1.0, 5.0, 2.0, 0.0, 4.0]])
    y = torch.tensor([0, 2])
    # sample 0 is correct: -(4 - 3) / (4 - 2); sample 1 is wrong: -(2 - 5) / (5 - 2)
    torch.testing.assert_close(dlr_loss(z, y), torch.tensor([-0.5, 1.0]))
    t = torch.tensor([2, 1])
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    torch.testing.assert_close(dlr_loss_targeted(z, y, t),
                               torch.tensor([-(4 - 3) / (4 - 1.5), -(2 - 5) / (5 - 1.5)]))
    # scale and shift invariant, unlike CE
    torch.testing.assert_close(dlr_loss(3 * z + 7, y), dlr_loss(z, y))


def test_checkpoint_schedule():
    assert checkpoint_gaps(100) == (22, 3, 6)
    assert checkpoint_gaps(10) == (2, 1, 1)
    atk = APGD(steps=100)
    from robustcaps.attacks.apgd import _APGDRun

    run = _APGDRun.__new__(_APGDRun)
    run.atk = atk
    # sample 0 rose every step, 1 never, 2 in 3 of 4 steps (<= 0.75 * 4: halve)
    hist = [torch.tensor([0.0, 0.0, 0.0])]
    for step in range(4):
        hist.append(hist[-1] + torch.tensor([1.0, 0.0, 0.0 if step == 0 else 1.0]))
    best = hist[-1].clone()
    halve = run._checkpoint(hist, 4, best, best - 1, torch.ones(3, dtype=torch.bool))
    assert halve.tolist() == [False, True, True]
    # not halved last time and no improvement since: halve
    halve = run._checkpoint(hist, 4, best, best, torch.zeros(3, dtype=torch.bool))
    assert halve.tolist() == [True, True, True]


@pytest.mark.parametrize("cls,kw", [(APGD, {"loss": "ce"}), (APGD, {"loss": "dlr"}),
                                    (APGDT, {}), (APGD, {"loss": "ce", "norm": "l2"})])
def test_budget_and_eps0(cls, kw, mlp, data):
    x, y = data
    eps = [0.0, 0.05, 0.2, 1.0]
    res = cls(steps=10, **kw).run(mlp, x, y, eps, return_adv=True)
    size = res.l2 if kw.get("norm") == "l2" else res.linf
    for e, ep in enumerate(eps):
        assert float(size[e].max()) <= ep + 1e-6
    assert torch.equal(res.adv_pred[0], mlp.predict(x))
    assert res.accuracy[-1] < res.accuracy[1]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_bounds_hold(norm):
    a = linear_adapter(k=4, seed=2, bounds=(0.0, 1.0))
    x = torch.rand(64, 1, 3, 4)
    x[:8], x[8:16] = 0.0, 1.0
    y = torch.randint(0, 4, (64,))
    for atk in (APGD(norm=norm, steps=8), APGDT(norm=norm, steps=8)):
        res = atk.run(a, x, y, [0.3, 5.0], return_adv=True)
        assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_targeted_reaches_target_on_linear_model(loss):
    # 2 classes (targeted DLR falls back to the logit margin): the closed-form threshold
    a = linear_adapter(k=2, seed=5)
    x = torch.randn(200, 1, 3, 4)
    y = a.predict(x)
    t = 1 - y
    w, b = a.model[1].weight.detach(), a.model[1].bias.detach()
    dw = w[t] - w[y]
    needed = (-(x.flatten(1) * dw).sum(1) - (b[t] - b[y])) / dw.abs().sum(1)
    eps = float(needed.median())
    res = APGD(loss=loss, steps=30).run(a, x, y, [eps], targets=t)
    clear = (needed - eps).abs() > 0.02 * eps
    assert torch.equal(res.success[0][clear], (needed < eps)[clear])
    # 5 classes, targeted DLR proper: a huge ball reaches every target
    a5 = linear_adapter(k=5, seed=8)
    x5 = torch.randn(60, 1, 3, 4) * 0.3
    y5 = a5.predict(x5)
    res5 = APGD(loss=loss, steps=30).run(a5, x5, y5, [20.0], targets=(y5 + 1) % 5)
    assert res5.success_rate[0] >= 0.95
    assert res5.info["loss_used"] == ("dlr-targeted" if loss == "dlr" else "ce")
    assert res.info["loss_used"] == ("cw-targeted" if loss == "dlr" else "ce")


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("make", [lambda: APGD(loss="dlr", steps=8), lambda: APGDT(steps=8)])
def test_few_classes_do_not_crash(k, make):
    a = fitted_mlp(k=k, steps=100)
    x, y = blobs(40, k, seed=7)
    atk = make()
    res = atk.run(a, x, y, [0.0, 0.2, 50.0])
    assert res.accuracy[-1] <= 0.05
    targeted = isinstance(atk, APGDT)
    assert res.info["loss_used"] == loss_used("dlr", k, targeted)
    if targeted:
        assert res.info["n_target_classes_used"] == k - 1
    expected = {2: "cw-targeted", 3: "dlr-targeted-3"} if targeted else {2: "cw"}
    assert loss_used("dlr", k, targeted) == expected.get(k, "dlr-targeted" if targeted else "dlr")


def test_apgdt_tries_each_target_once(mlp, data):
    x, y = data
    tracker = HistoryTracker()
    res = APGDT(steps=5, n_target_classes=2, restarts=2, tracker=tracker).run(mlp, x, y, [0.1])
    ranks = [r["context"]["target_rank"] for r in tracker.runs]
    assert ranks == sorted(ranks) and set(ranks) <= {2, 3} and ranks[0] == 2
    assert [r["context"]["run"] for r in tracker.runs] == list(range(len(ranks)))
    assert res.info["n_target_classes_used"] == 2


def test_fixed_seed_is_reproducible_and_batch_independent(mlp, data):
    x, y = data
    one = APGD(steps=10, seed=1).run(mlp, x, y, [0.1, 0.2], return_adv=True)
    again = APGD(steps=10, seed=1).run(mlp, x, y, [0.1, 0.2], return_adv=True)
    assert torch.equal(one.x_adv, again.x_adv)
    split = APGD(steps=10, seed=1, batch_size=9).run(mlp, x, y, [0.1, 0.2], return_adv=True)
    assert torch.equal(one.adv_pred, split.adv_pred)
    torch.testing.assert_close(one.x_adv, split.x_adv, rtol=0, atol=1e-5)


def test_early_stop_saves_work_not_results(mlp, data):
    x, y = data
    fast = APGD(steps=20).run(mlp, x, y, [0.2])
    full = APGD(steps=20, early_stop=False).run(mlp, x, y, [0.2])
    assert torch.equal(fast.success, full.success)
    assert fast.info["sample_backwards"].sum() < full.info["sample_backwards"].sum()
    assert full.info["sample_backwards"].max() == 20  # steps; the last pass is forward-only
    assert full.info["sample_forwards"].max() == 21


@pytest.mark.parametrize("make", [lambda: APGD(loss="dlr", steps=30),
                                  lambda: APGDT(steps=30)])
def test_unbounded_fools_every_clean_correct_sample(make, mlp, data):
    x, y = data
    assert make().run(mlp, x, y, [1e3]).accuracy[0] == 0.0


def test_apgd_at_least_as_strong_as_pgd(mlp, data):
    x, y = data
    eps = [0.1, 0.2, 0.3]
    pgd = PGD(steps=50).run(mlp, x, y, eps)
    apgd = APGDT(steps=50).run(mlp, x, y, eps)
    assert np.all(apgd.accuracy <= pgd.accuracy)


@pytest.mark.parametrize("native,library", [
    (lambda: APGD(loss="ce", steps=50), lambda: TorchattacksAPGD(loss="ce", steps=50)),
    (lambda: APGD(loss="dlr", steps=50), lambda: TorchattacksAPGD(loss="dlr", steps=50)),
    (lambda: APGDT(steps=50), lambda: TorchattacksAPGDT(steps=50)),
])
def test_native_agrees_with_torchattacks(native, library, mlp):
    # random starts differ (per-sample generators vs torch's global one): compare
    # robust accuracy, within 2 points, on 300 samples
    x, y = blobs(300, 5, seed=11)
    eps = [0.1, 0.2, 0.3]
    a = native().run(mlp, x, y, eps)
    b = library().run(mlp, x, y, eps)
    assert np.all(np.abs(a.accuracy - b.accuracy) <= 0.02 + 1e-12), (a.accuracy, b.accuracy)
    assert 0.2 < a.accuracy[1] < 0.9  # not a trivial comparison
    assert float(b.linf.max()) <= 0.3 + 1e-6


def test_torchattacks_wrappers_refuse_what_they_cannot_do(mlp, data):
    x, y = data
    with pytest.raises(RobustcapsError, match="untargeted"):
        TorchattacksAPGD().run(mlp, x, y, [0.1], targets=(y + 1) % 5)
    a3 = fitted_mlp(k=3, steps=50)
    x3, y3 = blobs(10, 3, seed=1)
    with pytest.raises(RobustcapsError, match=">= 4 classes"):
        TorchattacksAPGDT(steps=5).run(a3, x3, y3, [0.1])


@pytest.mark.parametrize("kwargs", [{"loss": "xent"}, {"rho": 1.5}, {"steps": 0},
                                    {"norm": "l0"}, {"restarts": 0}])
def test_bad_settings(kwargs):
    with pytest.raises(RobustcapsError):
        APGD(**kwargs)


def test_bench_compare_iterative(mlp, data):
    from robustcaps.bench.iterative import compare_iterative

    x, y = data
    res = compare_iterative(mlp, x, y, [0.1, 0.2], pgd_steps=10, apgd_steps=10)
    assert set(res) == {"epsilons", "pgd", "apgd-ce", "apgd-dlr", "apgd-t"}
    for name in ("pgd", "apgd-ce", "apgd-dlr", "apgd-t"):
        row = res[name]
        assert row["native_s"] > 0 and row["torchattacks_s"] > 0
        assert row["speedup_vs_torchattacks"] == pytest.approx(row["torchattacks_s"] / row["native_s"])
        assert len(row["native_adv_acc"]) == 2
        assert abs(row["native_acc_minus_torchattacks_max"]) <= 0.1  # same attack, other starts
