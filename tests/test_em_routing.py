"""The vectorised EM routing against the loop oracle in tests/reference_em.py."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from robustcaps.models.em_routing import ClassCaps, ConvCaps, em_routing, lambda_schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_em as ref  # noqa: E402


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _inputs(n, h, w, b, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    poses = (torch.randn(n, h, w, b, 16, generator=g) * scale).requires_grad_(True)
    acts = torch.rand(n, h, w, b, generator=g).requires_grad_(True)
    return poses, acts


def _perturb_params(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.beta_a.copy_(torch.randn(layer.beta_a.shape, generator=g))
        layer.beta_u.copy_(0.3 * torch.randn(layer.beta_u.shape, generator=g))


def _grads(outputs, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize(
    "h,w,b,c,stride,iters,pose",
    [
        (5, 5, 2, 3, 1, 3, "matrix"),  # stride 1: corner children feed one position
        (7, 6, 2, 2, 2, 2, "matrix"),  # stride 2, non-square, uncovered last column
        (5, 4, 1, 2, 1, 1, "vector"),
    ],
)
def test_conv_caps_matches_oracle(h, w, b, c, stride, iters, pose):
    torch.manual_seed(0)
    layer = ConvCaps(b, c, 3, stride, iterations=iters, pose=pose, final_lambda=0.7)
    _perturb_params(layer, 1)
    poses, acts = _inputs(2, h, w, b, seed=2)
    out = layer(poses, acts)
    rp, rl = ref.conv_caps(poses, acts, layer.weight, layer.beta_a, layer.beta_u, kernel=3,
                           stride=stride, iterations=iters, final_lambda=0.7, pose=pose)
    assert out["poses"].shape == rp.shape and out["logits"].shape == rl.shape
    torch.testing.assert_close(out["poses"], rp, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out["logits"], rl, rtol=1e-6, atol=1e-9)
    got = _grads([out["poses"], out["logits"]], (poses, acts), seed=3)
    want = _grads([rp, rl], (poses, acts), seed=3)
    for gg, ww in zip(got, want, strict=True):
        assert torch.isfinite(gg).all()
        assert gg.abs().max() > 0
        torch.testing.assert_close(gg, ww, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("coord_add", [True, False])
def test_class_caps_matches_oracle(coord_add):
    torch.manual_seed(0)
    layer = ClassCaps(3, 4, iterations=3, coord_add=coord_add, final_lambda=1.3)
    _perturb_params(layer, 4)
    poses, acts = _inputs(2, 3, 2, 3, seed=5)
    coords = torch.rand(3, 2, 2)
    out = layer(poses, acts, coords)
    rp, rl = ref.class_caps(poses, acts, layer.weight, layer.beta_a, layer.beta_u, coords,
                            iterations=3, final_lambda=1.3, coord_add=coord_add)
    torch.testing.assert_close(out["poses"], rp, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out["logits"], rl, rtol=1e-6, atol=1e-9)
    got = _grads([out["logits"]], (poses, acts), seed=6)
    want = _grads([rl], (poses, acts), seed=6)
    for gg, ww in zip(got, want, strict=True):
        torch.testing.assert_close(gg, ww, rtol=1e-6, atol=1e-9)


def test_assignments_normalised_over_all_parents_a_child_feeds():
    torch.manual_seed(0)
    b, c, h = 2, 3, 5
    layer = ConvCaps(b, c, 3, 1, iterations=2)
    poses, acts = _inputs(2, h, h, b, seed=7)
    out = layer(poses, acts, return_all=True)
    R = out["R"]  # (N, Ho, Wo, C, K, K, B) from the final M-step (after one E-step)
    assert R.shape == (2, 3, 3, c, 3, 3, b)
    # Sum over every (position, type) each child feeds: must be exactly 1 for every child.
    total = torch.zeros(2, h, h, b)
    for y in range(3):
        for x in range(3):
            total[:, y:y + 3, x:x + 3] += R[:, y, x].sum(1)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)
    # ... and NOT 1 over the types at a single output position (the flaw to avoid)
    per_pos = R.sum(3)
    assert (per_pos - 1).abs().max() > 0.1
    # corner child of a stride-1 layer feeds only one position
    assert R[:, 0, 0, :, 0, 0].sum(1).sub(1).abs().max() < 1e-12


def test_initial_assignment_border_children_get_more_per_parent():
    # With one iteration R is the initial assignment 1/|parents(i)|.
    layer = ConvCaps(1, 2, 3, 1, iterations=1)
    poses, acts = _inputs(1, 5, 5, 1, seed=8)
    R = layer(poses, acts, return_all=True)["R"]
    assert R[0, 0, 0, 0, 0, 0, 0].item() == pytest.approx(1 / 2)  # corner: 1 window x 2 types
    assert R[0, 1, 1, 0, 1, 1, 0].item() == pytest.approx(1 / 18)  # centre: 9 windows x 2 types


def test_lambda_schedule_ends_at_final():
    assert lambda_schedule(1, 2.0) == [2.0]
    assert lambda_schedule(4, 1.0) == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite_for_huge_inputs_and_saturated_activations(dtype):
    torch.manual_seed(0)
    layer = ConvCaps(2, 3, 3, 1, iterations=3).to(dtype)
    poses = (torch.randn(2, 5, 5, 2, 16, dtype=dtype) * 1e4).requires_grad_(True)
    logits = torch.randn(2, 5, 5, 2, dtype=dtype) * 1e3  # sigmoid saturates to exactly 0/1
    logits[0] = -1e3  # a sample whose children are all inactive
    logits = logits.requires_grad_(True)
    out = layer(poses, torch.sigmoid(logits))
    assert torch.isfinite(out["poses"]).all() and torch.isfinite(out["logits"]).all()
    gp, gl = torch.autograd.grad(out["logits"].sum() + out["poses"].sum(), (poses, logits))
    assert torch.isfinite(gp).all() and torch.isfinite(gl).all()


def test_em_routing_single_cluster_recovered():
    # 10 children agree exactly on one pose for parent 0 and scatter for parent 1.
    n, L, C, J, H = 1, 1, 2, 10, 16
    target = torch.randn(H)
    votes = torch.randn(n, L, C, J, H) * 3
    votes[0, 0, 0] = target + 1e-3 * torch.randn(J, H)
    a = torch.ones(n, L, J)
    res = em_routing(votes, a, torch.zeros(C), torch.zeros(C), iterations=3, final_lambda=1.0)
    torch.testing.assert_close(res.poses[0, 0, 0], target, atol=1e-2, rtol=0)
    assert res.logits[0, 0, 0] > res.logits[0, 0, 1] + 10
    assert (res.R[0, 0, 0] > 0.99).all()
    assert math.isfinite(res.logits.sum().item())
