"""ModelAdapter: scores, losses, gradients and the checks it makes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustcaps import ModelAdapter, ModelLoadError, RobustcapsError, adapt


class Linear(nn.Module):
    def __init__(self, k: int = 3, d: int = 4, out: str = "tensor") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(d, k)
        self.out = out

    def forward(self, x):
        z = self.fc(x.flatten(1))
        if self.out == "dict":
            return {"scores": z, "aux": z.sum(1)}
        if self.out == "tuple":
            return z.sum(1), z
        if self.out == "prob":
            return torch.softmax(z, 1)
        if self.out == "nan":
            return z * float("nan")
        if self.out == "shape":
            return z[:, :2]
        return z


def make(out="tensor", **kw):
    kw.setdefault("input_shape", (1, 2, 2))
    return ModelAdapter(Linear(out=out), device="cpu", **kw)


def test_scores_shape_and_inferred_classes():
    a = make()
    assert a.num_classes == 3
    assert a.scores(torch.randn(5, 1, 2, 2)).shape == (5, 3)
    assert not a.model.training


def test_normalisation_happens_inside():
    a = make(mean=0.5, std=2.0)
    x = torch.randn(4, 1, 2, 2)
    ref = a.model((x - 0.5) / 2.0)
    assert torch.allclose(a.scores(x), ref)


def test_dict_and_tuple_outputs():
    assert make("dict", output_key="scores").scores(torch.randn(2, 1, 2, 2)).shape == (2, 3)
    assert make("tuple", output_key=1).scores(torch.randn(2, 1, 2, 2)).shape == (2, 3)
    with pytest.raises(ModelLoadError, match="unknown output key 'nope'"):
        make("dict", output_key="nope")
    with pytest.raises(ModelLoadError, match="output_key"):
        make("dict")


def test_probe_rejects_nan_and_wrong_shape():
    with pytest.raises(ModelLoadError, match="NaN"):
        make("nan")
    with pytest.raises(ModelLoadError, match="num_classes=3"):
        make("shape", num_classes=3)


def test_probabilities_become_log_probabilities():
    with pytest.warns(UserWarning, match="probabilities"):
        a = make("prob", outputs="probabilities")
    x = torch.randn(3, 1, 2, 2)
    assert torch.allclose(a.scores(x), torch.log_softmax(a.model.fc(x.flatten(1)), 1), atol=1e-5)


def test_targeted_loss_is_negated_and_cw_sign():
    a = make()
    s = torch.tensor([[2.0, 0.0, -1.0]])
    y = torch.tensor([1])
    assert a.loss(s, y, targeted=True).item() == pytest.approx(-a.loss(s, y).item())
    # cw: untargeted value for y=1 is max(2,-1)-0 = 2; targeted towards 1 is -2.
    assert a.loss(s, y, kind="cw").item() == pytest.approx(2.0)
    assert a.loss(s, y, targeted=True, kind="cw").item() == pytest.approx(-2.0)


def test_input_gradient_matches_closed_form_for_linear_ce():
    a = make()
    x = torch.randn(6, 1, 2, 2, dtype=torch.float32)
    y = torch.randint(0, 3, (6,))
    _, g, s = a.input_gradient(x, y)
    w = a.model.fc.weight  # (K, D)
    p = torch.softmax(s, 1)
    # d CE / d x = W^T (p - onehot)
    expected = (p - torch.nn.functional.one_hot(y, 3)) @ w
    assert torch.allclose(g.flatten(1), expected, atol=1e-5)


def test_spread_loss_gradient_uses_sigmoid_for_capsules():
    a = make(outputs="capsule_logits", loss="spread")
    s = torch.tensor([[0.0, 0.0, 0.0]])
    act = a.activations(s)
    assert torch.allclose(act, torch.full((1, 3), 0.5))


def test_bounds_and_bad_options():
    a = make(bounds=(0, 1))
    assert a.clip(torch.tensor([-1.0, 0.5, 2.0])).tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(RobustcapsError, match="lo < hi"):
        make(bounds=(1, 0))
    with pytest.raises(RobustcapsError, match="loss must be one of"):
        make(loss="hinge")
    with pytest.raises(RobustcapsError, match="std must be positive"):
        make(std=0.0)


def test_to_float64_copy_is_independent():
    a = make()
    b = a.to(dtype=torch.float64)
    x = torch.randn(2, 1, 2, 2)
    assert b.scores(x).dtype == torch.float64
    assert a.scores(x).dtype == torch.float32
    assert torch.allclose(b.scores(x).float(), a.scores(x), atol=1e-5)


def test_adapt_rejects_non_modules():
    with pytest.raises(ModelLoadError, match="nn.Module"):
        adapt(object())
