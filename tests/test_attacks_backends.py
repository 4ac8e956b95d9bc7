"""native vs torchattacks vs foolbox on identical inputs with the same loss.

The model is a tiny CNN (with dropout, which must stay off) fitted for a few steps on
synthetic separable data, so accuracy curves are non-trivial.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robustcaps.attacks import get_attack
from robustcaps.models.adapter import ModelAdapter


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: one thread is faster and immune to oversubscribed CI machines
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


EPS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5]
K = 4


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(K, 2, 8, 8, generator=torch.Generator().manual_seed(99))
    y = torch.arange(n) % K
    x = 0.35 * protos[y] + torch.randn(n, 2, 8, 8, generator=g)
    return x, y


@pytest.fixture(scope="module")
def fitted() -> tuple[ModelAdapter, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Dropout(0.3), nn.Flatten(), nn.Linear(8 * 4 * 4, K))
    xt, yt = _data(512, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    a = ModelAdapter(model, input_shape=(2, 8, 8), num_classes=K, device="cpu")
    x, y = _data(120, 2)
    return a, x, y


def _value(res) -> np.ndarray:
    return res.success_rate if res.targeted else res.accuracy


@pytest.mark.parametrize("name", ["fgsm", "bim"])
@pytest.mark.parametrize("targeted", [False, True])
def test_backends_agree(fitted, name, targeted):
    a, x, y = fitted
    t = (y + 1) % K if targeted else None
    params = {"steps": 5} if name == "bim" else {}
    ref = get_attack(name, "native", early_stop=False, **params).run(a, x, y, EPS, targets=t,
                                                                     return_adv=True)
    # a non-trivial curve: accurate when clean, broken at the largest epsilon
    if not targeted:
        assert ref.accuracy[0] > 0.8 and ref.accuracy[-1] < ref.accuracy[0] - 0.3
    else:
        assert ref.success_rate[-1] > ref.success_rate[0] + 0.3
    for backend in ("torchattacks", "foolbox"):
        res = get_attack(name, backend, **params).run(a, x, y, EPS, targets=t, return_adv=True)
        assert not a.model.training, f"{backend} left the model in training mode"
        diff_pp = np.abs(_value(res) - _value(ref)) * 100
        assert diff_pp.max() <= 0.5, (backend, diff_pp)
        # identical algorithms on identical inputs: the adversarial inputs match too
        torch.testing.assert_close(res.x_adv, ref.x_adv, rtol=0, atol=1e-5)
    # the default native BIM (early stop) is at least as strong, per sample
    if name == "bim":
        fast = get_attack(name, "native", **params).run(a, x, y, EPS, targets=t)
        assert bool((fast.success | ~ref.success).all())


@pytest.mark.parametrize("loss", ["cw", "spread"])
def test_backends_agree_with_other_losses(fitted, loss):
    a, x, y = fitted
    ref = get_attack("bim", "native", early_stop=False, steps=3, loss=loss).run(
        a, x, y, EPS, return_adv=True)
    for backend in ("torchattacks", "foolbox"):
        res = get_attack("bim", backend, steps=3, loss=loss).run(a, x, y, EPS, return_adv=True)
        torch.testing.assert_close(res.x_adv, ref.x_adv, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torchattacks", "foolbox"])
def test_backends_respect_bounds(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    a = ModelAdapter(model, input_shape=(1, 4, 4), num_classes=3, device="cpu", bounds=(0.0, 1.0))
    x = torch.rand(30, 1, 4, 4)
    y = torch.randint(0, 3, (30,))
    eps = [0.0, 0.2, 0.6]
    ref = get_attack("bim", "native", steps=4, early_stop=False).run(a, x, y, eps, return_adv=True)
    res = get_attack("bim", backend, steps=4).run(a, x, y, eps, return_adv=True)
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert float(res.linf[1].max()) <= 0.2 + 1e-6
    torch.testing.assert_close(res.x_adv, ref.x_adv, rtol=0, atol=1e-5)


def test_eps0_is_exact_for_libraries(fitted):
    a, x, y = fitted
    for backend in ("torchattacks", "foolbox"):
        res = get_attack("fgsm", backend).run(a, x, y, [0.0], return_adv=True)
        assert torch.equal(res.x_adv[0], x)
        assert float(res.linf.max()) == 0.0
