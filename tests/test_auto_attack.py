"""The auto attack (per-sample worst case) and the capsule-aware attacks (issue 14)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attack_models import blobs, fitted_mlp

import robustcaps
from robustcaps.attacks import get_attack
from robustcaps.attacks.capsule import SurrogateAdapter
from robustcaps.errors import RobustcapsError
from robustcaps.models.adapter import ModelAdapter
from robustcaps.models.capsnet import CapsNet

EPS = [0.0, 0.05, 0.1, 0.2, 0.4]
FAST = {"steps": 8, "seed": 3}


@pytest.fixture(scope="module")
def mlp() -> ModelAdapter:
    return fitted_mlp(k=5)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return blobs(40, 5, seed=9)


def _caps() -> ModelAdapter:
    torch.manual_seed(0)
    model = CapsNet(num_classes=3, in_channels=1, image_size=(24, 24), A=4, B=2, C=2, D=2,
                    iterations=3).eval()
    with torch.no_grad():
        for layer in model.routing_layers().values():
            layer.beta_a.add_(torch.randn_like(layer.beta_a))
            layer.beta_u.add_(0.3 * torch.randn_like(layer.beta_u))
    return ModelAdapter(model, input_shape=(1, 24, 24), num_classes=3, device="cpu", name="caps")


def _caps_data(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 1, 24, 24, generator=g), torch.arange(n) % 3


def test_auto_is_at_most_every_component_at_every_epsilon(mlp, data):
    x, y = data
    comps = ["fgsm", "pgd", "apgd-ce", "apgd-dlr"]
    auto = get_attack("auto", components=comps, **FAST).run(mlp, x, y, EPS)
    own = {c: get_attack(c, **FAST).run(mlp, x, y, EPS).accuracy for c in comps}
    best = np.min(np.stack(list(own.values())), axis=0)
    assert np.all(auto.accuracy <= best + 1e-12), (auto.accuracy, own)
    # the components complement each other: the worst case is strictly lower somewhere
    assert np.any(auto.accuracy < own["fgsm"] - 0.05), (auto.accuracy, own)
    broken = auto.info["broken_by"]
    assert set(np.unique(broken)) <= {"", "clean", *comps}
    # a sample counted broken has a named breaker, a robust one none
    assert np.array_equal(broken[1:] != "", auto.success[1:].numpy())
    # every clean-correct sample paid at least FGSM's gradient; stronger ones cost more
    correct = broken[0] != "clean"
    cost = auto.info["sample_backwards"].sum(axis=0)
    assert (cost[correct] >= 1).all() and cost[correct].max() > 8


def test_auto_after_is_cumulative_and_ends_at_the_worst_case(mlp, data):
    x, y = data
    res = get_attack("auto", components=["fgsm", "pgd"], **FAST).run(mlp, x, y, EPS)
    after = res.info["after"]
    assert list(after) == ["fgsm", "pgd"]
    assert np.all(np.array(after["pgd"]) <= np.array(after["fgsm"]) + 1e-12)
    assert np.allclose(after["pgd"], res.accuracy)


def test_auto_records_fixed_seed_identical(mlp, data, tmp_path):
    x, y = data
    kw = dict(dataset=(x, y), attack="auto", components=["fgsm", "pgd"], steps=5,
              epsilons=EPS, batch_size=20, progress=False, figures=True)
    a = robustcaps.evaluate([mlp], out=tmp_path / "a", **kw)
    b = robustcaps.evaluate([mlp], **kw)
    assert {"broken_by", "forwards", "backwards"} <= set(a.records.columns)
    pd_cols = [c for c in a.records.columns if c != "eps_units"]
    assert a.records[pd_cols].equals(b.records[pd_cols])
    assert (tmp_path / "a" / "auto_breakdown.csv").is_file()
    assert (tmp_path / "a" / "figures" / "auto_breakdown.png").is_file()
    assert "auto: samples broken first" in a.table
    # the summary's auto row is the worst case the breakdown ends with
    rb = robustcaps.report.read_records(tmp_path / "a" / "records.csv.gz")
    assert set(rb["broken_by"]) <= {"", "clean", "fgsm", "pgd"}


def test_auto_targeted_reaches_targets(mlp, data):
    x, y = data
    t = (y + 1) % 5
    res = get_attack("auto", components=["pgd", "apgd-ce"], **FAST).run(mlp, x, y, [0.0, 0.5],
                                                                        targets=t)
    assert res.targeted
    assert torch.equal(res.success, res.adv_pred == t[None])
    assert res.success[1].double().mean() > 0.5


def test_pgd_and_apgd_accept_the_cw_loss(mlp, data):
    x, y = data
    r = get_attack("apgd-ce", loss="cw", **FAST).run(mlp, x, y, [0.2])
    assert r.info["loss_used"] == "cw"
    p = get_attack("pgd", loss="cw", **FAST).run(mlp, x, y, [0.2])
    assert p.info["loss"] == "cw" and p.success.any()


def test_bpda_gradient_differs_from_exact_but_forward_is_true():
    a = _caps()
    x, y = _caps_data()
    sur = SurrogateAdapter(a, "bpda", None)
    xg = x.clone().requires_grad_(True)
    s_exact = a.scores(xg)
    (g_exact,) = torch.autograd.grad(a.loss(s_exact, y).sum(), xg)
    xs = x.clone().requires_grad_(True)
    s_bpda = sur.scores(xs)
    (g_bpda,) = torch.autograd.grad(sur.loss(s_bpda, y).sum(), xs)
    assert torch.equal(s_exact.detach(), s_bpda.detach())  # forward bit for bit
    rel = (g_bpda - g_exact).norm() / g_exact.norm()
    assert rel > 1e-3, float(rel)


def test_vote_surrogate_is_straight_through():
    a = _caps()
    x, _ = _caps_data()
    sur = SurrogateAdapter(a, "uniform", ["class"])
    xs = x.clone().requires_grad_(True)
    s = sur.scores(xs)
    with torch.no_grad():
        assert torch.allclose(s, a.scores(x), atol=1e-5)  # values: the true network's


@pytest.mark.parametrize("name", ["apgd-bpda", "pgd-bpda", "vote-attack"])
def test_capsule_aware_success_is_judged_on_the_true_model(name):
    a = _caps()
    x, y = _caps_data()
    res = get_attack(name, steps=4, seed=1).run(a, x, y, [0.0, 0.5, 2.0], return_adv=True)
    for e in range(3):
        assert torch.equal(res.adv_pred[e], a.predict(res.x_adv[e]).cpu())
        assert float(res.linf[e].max()) <= [0.0, 0.5, 2.0][e] + 1e-6
    assert torch.equal(res.success, res.adv_pred != y[None])
    assert res.info["true_successes"] == int(res.success.sum())


def test_capsule_aware_rejects_plain_models_and_auto_skips_them(mlp, data):
    x, y = data
    with pytest.raises(RobustcapsError, match="capsule network"):
        get_attack("vote-attack").run(mlp, x, y, [0.1])
    res = get_attack("auto", components=["fgsm", "apgd-bpda"], **FAST).run(mlp, x, y, [0.1])
    assert res.info["skipped"] == ["apgd-bpda"]


def test_unknown_surrogate_layer_is_one_line():
    a = _caps()
    x, y = _caps_data()
    with pytest.raises(RobustcapsError, match="unknown routing layer"):
        get_attack("vote-attack", layers=["conv9"]).run(a, x, y, [0.1])


def test_evaluation_seeds_units_from_the_run_seed(mlp, data):
    x, y = data
    kw = dict(dataset=(x, y), attack="pgd", steps=3, epsilons=[0.3], progress=False)
    r0 = robustcaps.evaluate([mlp], seed=0, **kw).records
    r0b = robustcaps.evaluate([mlp], seed=0, **kw).records
    r1 = robustcaps.evaluate([mlp], seed=1, **kw).records
    assert r0.equals(r0b)
    assert not np.allclose(r0["l2"].to_numpy(), r1["l2"].to_numpy())
