"""Black-box transfer: craft on a source, evaluate on every target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustcaps.attacks import get_attack
from robustcaps.attacks.transfer import transfer_attack
from robustcaps.errors import RobustcapsError
from robustcaps.models.adapter import ModelAdapter


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: one thread is faster and immune to oversubscribed CI machines
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


EPS = [0.0, 0.1, 0.3, 0.6]


def net(seed: int, name: str, shape=(2, 8, 8)) -> ModelAdapter:
    torch.manual_seed(seed)
    c, h, w = shape
    model = nn.Sequential(nn.Conv2d(c, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * h * w, 5))
    return ModelAdapter(model, input_shape=shape, num_classes=5, device="cpu", name=name)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(50, 2, 8, 8, generator=g), torch.randint(0, 5, (50,), generator=g)


@pytest.mark.parametrize("attack", ["fgsm", "bim"])
def test_transfer_matrix(data, attack):
    x, y = data
    src, t1, t2 = net(0, "src"), net(1, "t1"), net(2, "t2")
    out = transfer_attack(src, [src, t1, t2], x, y, EPS, attack=attack, steps=4)
    assert list(out) == ["src", "t1", "t2"]
    white = get_attack(attack, steps=4).run(src, x, y, EPS, return_adv=True)
    # the source row is the white-box attack
    assert torch.equal(out["src"].adv_pred, white.adv_pred)
    for name, t in (("t1", t1), ("t2", t2)):
        r = out[name]
        assert r.backend == "transfer:src" and r.attack == attack
        assert r.adv_pred.shape == (len(EPS), 50)
        # independent oracle: the target's own predictions on the source's examples
        for e in range(len(EPS)):
            assert torch.equal(r.adv_pred[e], t.predict(white.x_adv[e]).cpu())
        assert torch.equal(r.success, r.adv_pred != y[None])
        assert float(r.linf[-1].max()) <= EPS[-1] + 1e-6
        assert torch.equal(r.adv_pred[0], t.predict(x).cpu())


def test_targeted_transfer(data):
    x, y = data
    src, t1 = net(0, "src"), net(1, "t1")
    tl = (y + 1) % 5
    out = transfer_attack(src, [t1], x, y, EPS, target_labels=tl)
    assert out["t1"].targeted
    assert torch.equal(out["t1"].success, out["t1"].adv_pred == tl[None])


def test_transfer_checks(data):
    x, y = data
    src = net(0, "src")
    with pytest.raises(RobustcapsError, match="inputs"):
        transfer_attack(src, [net(1, "other", shape=(1, 8, 8))], x, y, EPS)
    with pytest.raises(RobustcapsError, match="unique"):
        transfer_attack(src, [net(1, "a"), net(2, "a")], x, y, EPS)
