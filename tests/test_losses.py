"""Losses against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from robustcaps.models import losses as L


def test_spread_loss_closed_form():
    a = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.3, 0.8]])
    y = torch.tensor([0, 2])
    m = 0.9
    # sample 0: gaps (0.9-0.5)=0.4 -> (0.9-0.4)^2=0.25 ; (0.9-0.1)=0.8 -> 0.1^2=0.01
    # sample 1: (0.8-0.2)=0.6 -> 0.3^2=0.09 ; (0.8-0.3)=0.5 -> 0.4^2=0.16
    expected = torch.tensor([0.26, 0.25])
    assert torch.allclose(L.spread_loss(a, y, m), expected, atol=1e-6)


def test_spread_loss_zero_when_margin_holds():
    a = torch.tensor([[1.0, 0.0, 0.05]])
    assert L.spread_loss(a, torch.tensor([0]), margin=0.9).item() == 0.0


def test_spread_margin_schedule():
    assert L.spread_margin(0.0) == pytest.approx(0.2)
    assert L.spread_margin(1.0) == pytest.approx(0.9)
    assert L.spread_margin(0.5) == pytest.approx(0.55)
    assert L.spread_margin(7.0) == pytest.approx(0.9)


def test_margin_loss_closed_form():
    a = torch.tensor([[0.95, 0.3]])
    # true class 0 above m+ -> 0 ; class 1: 0.5 * (0.3-0.1)^2 = 0.02
    assert L.margin_loss(a, torch.tensor([0])).item() == pytest.approx(0.02)


def test_cross_entropy_and_cw_margin():
    z = torch.tensor([[2.0, 0.0, -1.0]])
    y = torch.tensor([0])
    ce = -torch.log_softmax(z, 1)[0, 0]
    assert L.cross_entropy(z, y).item() == pytest.approx(ce.item())
    assert L.cw_margin(z, y).item() == pytest.approx(-2.0)
    assert L.cw_margin(z, torch.tensor([2])).item() == pytest.approx(3.0)
