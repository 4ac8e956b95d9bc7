"""Native FGSM/BIM: closed forms on linear models, budgets, bounds, targeted, early stop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robustcaps.attacks import get_attack
from robustcaps.attacks.native import BIM, FGSM, check_epsilons
from robustcaps.errors import RobustcapsError
from robustcaps.models.adapter import ModelAdapter


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: one thread is faster and immune to oversubscribed CI machines
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


EPS = [0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5]


def linear_adapter(k: int = 2, d: int = 12, seed: int = 0, bounds=None) -> ModelAdapter:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d, k)
    with torch.no_grad():
        # small weights: logits stay in float32 softmax's unsaturated range, where the
        # CE gradient's sign is exactly sign(w_other - w_true)
        lin.weight.copy_(torch.randn(k, d, generator=g) * 0.3)
        lin.bias.copy_(torch.randn(k, generator=g) * 0.1)
    model = nn.Sequential(nn.Flatten(), lin)
    return ModelAdapter(model, input_shape=(1, 3, 4), num_classes=k, device="cpu", bounds=bounds)


def tiny_cnn(seed: int = 0) -> ModelAdapter:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(6 * 8 * 8, 5))
    return ModelAdapter(model, input_shape=(2, 8, 8), num_classes=5, device="cpu")


@pytest.fixture
def cnn_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, 8, 8, generator=g)
    y = torch.randint(0, 5, (40,), generator=g)
    return x, y


def test_fgsm_linear_closed_form():
    a = linear_adapter()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 1, 3, 4, generator=g)
    y = torch.randint(0, 2, (200,), generator=g)
    res = FGSM().run(a, x, y, EPS, return_adv=True)
    w, b = a.model[1].weight.detach(), a.model[1].bias.detach()
    dw = w[1 - y] - w[y]  # (N, D): w_other - w_true
    # CE gradient of a 2-class linear model is p_other * (w_other - w_y): its sign is sign(dw).
    flat = x.flatten(1)
    margin = (flat * -dw).sum(1) + (b[y] - b[1 - y])  # z_y - z_other on the clean input
    for e, eps in enumerate(EPS):
        expected_x = flat + eps * dw.sign()
        torch.testing.assert_close(res.x_adv[e].flatten(1), expected_x, rtol=0, atol=1e-6)
        still_correct = margin - eps * dw.abs().sum(1) > 0
        assert torch.equal(res.adv_pred[e] == y, still_correct)
    assert res.accuracy[0] > res.accuracy[-1]  # the sweep is not trivial
    assert 0.0 < res.accuracy[2] < 1.0


def test_bim_on_linear_model_equals_fgsm():
    # Every BIM step moves along the same sign(dw); steps*alpha = 1.25 eps >= eps, so the
    # projection ends exactly at FGSM's point.
    a = linear_adapter(seed=5)
    x = torch.randn(100, 1, 3, 4)
    y = torch.randint(0, 2, (100,))
    f = FGSM().run(a, x, y, EPS, return_adv=True)
    b = BIM(steps=7, early_stop=False).run(a, x, y, EPS, return_adv=True)
    torch.testing.assert_close(b.x_adv, f.x_adv, rtol=0, atol=1e-6)
    assert torch.equal(b.adv_pred, f.adv_pred)


@pytest.mark.parametrize("name", ["fgsm", "bim"])
@pytest.mark.parametrize("targeted", [False, True])
def test_budget_and_eps0(name, targeted, cnn_data):
    x, y = cnn_data
    a = tiny_cnn()
    t = (y + 2) % 5 if targeted else None
    res = get_attack(name, steps=5).run(a, x, y, EPS, targets=t, return_adv=True)
    assert res.adv_pred.shape == (len(EPS), 40) and res.linf.shape == (len(EPS), 40)
    for e, eps in enumerate(EPS):
        assert float(res.linf[e].max()) <= eps + 1e-6
        assert float((res.x_adv[e] - x).abs().max()) <= eps + 1e-6
    # eps = 0 reproduces the clean predictions of an independent forward pass exactly
    clean = a.predict(x).cpu()
    assert torch.equal(res.adv_pred[0], clean)
    assert torch.equal(res.clean_pred, clean)
    assert res.accuracy[0] == pytest.approx(float((clean == y).double().mean()), abs=0)
    assert not a.model.training


@pytest.mark.parametrize("name", ["fgsm", "bim"])
def test_bounds_hold(name):
    a = linear_adapter(k=3, seed=2, bounds=(0.0, 1.0))
    x = torch.rand(64, 1, 3, 4)
    x[:8] = 0.0
    x[8:16] = 1.0
    y = torch.randint(0, 3, (64,))
    res = get_attack(name, steps=4).run(a, x, y, [0.0, 0.3, 2.0], return_adv=True)
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert float(res.linf.max()) <= 1.0 + 1e-6
    with pytest.raises(RobustcapsError, match="outside its bounds"):
        FGSM().run(a, x + 2.0, y, [0.1])


def test_targeted_moves_predictions_to_target():
    a = linear_adapter(k=4, seed=7)
    x = torch.randn(60, 1, 3, 4) * 0.3
    y = a.predict(x).cpu()
    t = (y + 1) % 4
    res = BIM(steps=30, step_size=0.5).run(a, x, y, [0.0, 10.0], targets=t)
    assert res.success_rate[0] == 0.0
    assert res.success_rate[1] >= 0.95
    assert torch.equal(res.success[1], res.adv_pred[1] == t)
    assert res.accuracy[1] <= 0.05


def test_early_stop_only_adds_successes_and_saves_work(cnn_data):
    x, y = cnn_data
    a = tiny_cnn(seed=3)
    eps = [0.0, 0.02, 0.05, 0.1, 0.3]
    full = BIM(steps=8, early_stop=False).run(a, x, y, eps, return_adv=True)
    fast = BIM(steps=8, early_stop=True).run(a, x, y, eps, return_adv=True)
    # per sample and epsilon: every success without early stop is a success with it
    assert bool((fast.success | ~full.success).all())
    assert bool((fast.accuracy <= full.accuracy + 1e-12).all())
    assert fast.info["backwards"] < full.info["backwards"]
    # kept examples are genuinely adversarial where recorded as such
    for e in range(len(eps)):
        pred = a.predict(fast.x_adv[e]).cpu()
        assert torch.equal(pred != y, fast.success[e])
        assert float(fast.linf[e].max()) <= eps[e] + 1e-6


def test_fgsm_costs_one_gradient(cnn_data):
    x, y = cnn_data
    res = FGSM().run(tiny_cnn(), x, y, [0.0, 0.1, 0.2, 0.3])
    assert res.info["backwards"] == 1 and res.info["forwards"] == 4  # 1 + 3 non-zero eps


def test_batching_does_not_change_results(cnn_data):
    x, y = cnn_data
    a = tiny_cnn(seed=4)
    one = BIM(steps=3).run(a, x, y, EPS)
    split = BIM(steps=3, batch_size=7).run(a, x, y, EPS)
    assert torch.equal(one.adv_pred, split.adv_pred)
    torch.testing.assert_close(one.linf, split.linf, rtol=0, atol=1e-6)


def test_unsorted_epsilons(cnn_data):
    x, y = cnn_data
    a = tiny_cnn()
    a_sorted = BIM(steps=3).run(a, x, y, [0.0, 0.1, 0.3])
    a_shuffled = BIM(steps=3).run(a, x, y, [0.3, 0.0, 0.1])
    assert torch.equal(a_sorted.adv_pred[[2, 0, 1]], a_shuffled.adv_pred)


@pytest.mark.parametrize("bad", [[-0.1], [float("nan")], [], ["a"]])
def test_bad_epsilons(bad):
    with pytest.raises(RobustcapsError):
        check_epsilons(bad)


def test_bad_parameters():
    with pytest.raises(RobustcapsError, match="steps"):
        BIM(steps=0)
    with pytest.raises(RobustcapsError, match="step_size"):
        BIM(step_size=-1.0)
    with pytest.raises(RobustcapsError, match="unknown attack"):
        get_attack("pgd2")
    with pytest.raises(RobustcapsError, match="unknown backend"):
        get_attack("fgsm", backend="cleverhans")
    with pytest.raises(RobustcapsError, match="loss"):
        get_attack("fgsm", loss="hinge")


def test_spread_loss_option_changes_gradient(cnn_data):
    x, y = cnn_data
    a = tiny_cnn(seed=6)
    ce = FGSM(loss="ce").run(a, x, y, [0.5], return_adv=True)
    cw = FGSM(loss="cw").run(a, x, y, [0.5], return_adv=True)
    assert not torch.equal(ce.x_adv, cw.x_adv)
    assert np.isfinite(cw.accuracy).all()
