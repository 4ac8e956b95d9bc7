"""Surrogate routing for capsule-aware attacks (em_routing.routing_surrogate)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from robustcaps.models import native
from robustcaps.models.capsnet import CapsNet
from robustcaps.models.em_routing import (
    ClassCaps,
    ConvCaps,
    em_routing_uniform,
    routing_surrogate,
    surrogate_mode,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_em as ref  # noqa: E402


@pytest.fixture(autouse=True, params=["native", "torch"])
def routing_impl(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("ROBUSTCAPS_NATIVE", "0")
    elif native.library() is None:
        pytest.skip(f"native routing unavailable: {native.status()}")
    return request.param


def _net(routing="paper", dtype=torch.float64):
    torch.manual_seed(0)
    model = CapsNet(num_classes=3, in_channels=1, image_size=(24, 24), A=4, B=2, C=2, D=2,
                    iterations=3, routing=routing).to(dtype).eval()
    with torch.no_grad():
        for layer in model.routing_layers().values():
            layer.beta_a.add_((1e-3 if routing.startswith("authors") else 1.0)
                              * torch.randn_like(layer.beta_a))
            layer.beta_u.add_(0.3 * torch.randn_like(layer.beta_u))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["bpda", "bpda-last"])
@pytest.mark.parametrize("routing", ["paper", "authors", "authors-smooth"])
def test_bpda_forward_is_the_exact_forward_bit_for_bit(mode, dtype, routing):
    model = _net(routing, dtype)
    x = torch.randn(3, 1, 24, 24, dtype=dtype)
    exact = model(x, return_all=True)
    with routing_surrogate(mode):
        held = model(x, return_all=True)
    assert torch.equal(held["logits"], exact["logits"])
    for a, b in zip(held["layers"], exact["layers"], strict=True):
        assert torch.equal(a["poses"], b["poses"]) and torch.equal(a["logits"], b["logits"])
    xr = x.clone().requires_grad_(True)
    with routing_surrogate(mode):  # also with autograd on
        assert torch.equal(model(xr), exact["logits"])


def _layer_grads(layer, poses, acts, coords=None):
    out = layer(poses, acts) if coords is None else layer(poses, acts, coords)
    g = torch.Generator().manual_seed(5)
    loss = (out["poses"] * torch.randn(out["poses"].shape, generator=g)).sum() + (
        out["logits"] * torch.randn(out["logits"].shape, generator=g)).sum()
    return out, torch.autograd.grad(loss, (poses, acts, layer.weight, layer.beta_a,
                                           layer.beta_u))


def _oracle_grads(rp, rl, poses, acts, layer):
    g = torch.Generator().manual_seed(5)
    loss = (rp * torch.randn(rp.shape, generator=g)).sum() + (
        rl * torch.randn(rl.shape, generator=g)).sum()
    return torch.autograd.grad(loss, (poses, acts, layer.weight, layer.beta_a, layer.beta_u))


def _inputs(n, h, w, b, seed):
    g = torch.Generator().manual_seed(seed)
    poses = torch.randn(n, h, w, b, 16, generator=g, dtype=torch.float64).requires_grad_(True)
    acts = torch.rand(n, h, w, b, generator=g, dtype=torch.float64).requires_grad_(True)
    return poses, acts


@pytest.mark.parametrize("mode,hold", [("bpda", "all"), ("bpda-last", "last")])
@pytest.mark.parametrize("routing", ["paper", "pertype"])
def test_bpda_gradient_is_the_gradient_with_assignments_held(mode, hold, routing):
    """A conv capsule layer's BPDA gradient (w.r.t. poses, activations, weights, biases)
    equals the loop oracle's with R detached, and differs from the exact gradient."""
    torch.manual_seed(1)
    layer = ConvCaps(2, 3, 3, 1, iterations=3, final_lambda=0.7, routing=routing).double()
    with torch.no_grad():
        layer.beta_a.normal_()
        layer.beta_u.normal_(std=0.3)
    poses, acts = _inputs(2, 4, 4, 2, seed=2)
    with routing_surrogate(mode):
        out, got = _layer_grads(layer, poses, acts)
    _, exact = _layer_grads(layer, poses, acts)
    kw = {} if routing == "paper" else dict(per_type=True, initial="windows",
                                           kappa=16 * 2 / 4)
    rp, rl = ref.conv_caps(poses, acts, layer.weight, layer.beta_a, layer.beta_u, kernel=3,
                           stride=1, iterations=3, final_lambda=0.7, hold=hold, **kw)
    torch.testing.assert_close(out["logits"], rl, rtol=1e-6, atol=1e-9)
    want = _oracle_grads(rp, rl, poses, acts, layer)
    for gg, ww in zip(got, want, strict=True):
        torch.testing.assert_close(gg, ww, rtol=1e-6, atol=1e-9)
    assert max(float((gg - ee).abs().max()) for gg, ee in zip(got, exact, strict=True)) > 1e-3


def test_bpda_class_layer_gradient_matches_oracle():
    torch.manual_seed(2)
    layer = ClassCaps(3, 4, iterations=3, final_lambda=1.3).double()
    with torch.no_grad():
        layer.beta_a.normal_()
        layer.beta_u.normal_(std=0.3)
    poses, acts = _inputs(2, 3, 2, 3, seed=3)
    coords = torch.rand(3, 2, 2, dtype=torch.float64)
    with routing_surrogate("bpda", layers=[layer]):
        _, got = _layer_grads(layer, poses, acts, coords)
    rp, rl = ref.class_caps(poses, acts, layer.weight, layer.beta_a, layer.beta_u, coords,
                            iterations=3, final_lambda=1.3, hold="all")
    for gg, ww in zip(got, _oracle_grads(rp, rl, poses, acts, layer), strict=True):
        torch.testing.assert_close(gg, ww, rtol=1e-6, atol=1e-9)


def test_bpda_gradient_matches_finite_differences_with_assignments_frozen():
    """Independent of the oracle: freeze the assignments the true routing reaches at x0
    (by routing with a fixed R), then central differences of that function at x0."""
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(4)
    n, C, J = 1, 2, 5
    a = torch.rand(n, 1, J, generator=g, dtype=torch.float64)
    layer = ClassCaps(J, C, iterations=3, final_lambda=1.0, coord_add=False).double()
    with torch.no_grad():
        layer.beta_a.normal_(generator=g)
        layer.beta_u.normal_(std=0.3, generator=g)
    poses = torch.randn(n, 1, 1, J, 16, generator=g, dtype=torch.float64)
    coords = torch.zeros(1, 1, 2, dtype=torch.float64)
    out = layer(poses, a.reshape(n, 1, 1, J), coords, return_all=True)
    R = out["R"].reshape(n, 1, C, J).detach()  # the final M-step's assignment
    w = layer.weight.detach()

    def frozen(p):  # the final M-step with R fixed, written out by hand
        v = torch.einsum("jrt,jcts->cjrs", p.reshape(J, 4, 4), w).reshape(C, J, 16)
        rw = R[0, 0] * a[0, 0]  # (C, J)
        mass = rw.sum(1, keepdim=True)
        mu = (rw[..., None] * v).sum(1) / (mass + 1e-8)
        var = (rw[..., None] * (v - mu[:, None]) ** 2).sum(1) / (mass + 1e-8) + 1e-4
        cost = (16 * layer.beta_u + 0.5 * var.log().sum(-1)) * mass[:, 0] / (J / C)
        return 1.0 * (layer.beta_a - cost)

    p0 = poses.reshape(J, 16).clone()
    torch.testing.assert_close(frozen(p0), out["logits"][0], rtol=1e-9, atol=1e-12)
    weights = torch.randn(C, generator=g, dtype=torch.float64)
    pr = poses.clone().requires_grad_(True)
    with routing_surrogate("bpda"):
        (got,) = torch.autograd.grad((layer(pr, a.reshape(n, 1, 1, J), coords)["logits"][0]
                                      * weights).sum(), pr)
    eps = 1e-6
    fd = torch.zeros(J * 16, dtype=torch.float64)
    for k in range(J * 16):
        d = torch.zeros(J * 16, dtype=torch.float64)
        d[k] = eps
        fd[k] = ((frozen(p0 + d.reshape(J, 16)) - frozen(p0 - d.reshape(J, 16))) * weights
                 ).sum() / (2 * eps)
    torch.testing.assert_close(got.reshape(-1), fd, rtol=1e-5, atol=1e-8)
    (exact,) = torch.autograd.grad((layer(pr, a.reshape(n, 1, 1, J), coords)["logits"][0]
                                    * weights).sum(), pr)
    assert (exact - got).abs().max() > 1e-4


def test_uniform_surrogate_is_one_m_step_with_uniform_assignments():
    """Hand-computed: a class layer's uniform surrogate is the activation-weighted mean
    of the votes, the variance about it, and the logit from that one M-step (lambda_T)."""
    g = torch.Generator().manual_seed(6)
    n, hh, ww, D, E = 2, 2, 2, 2, 3
    layer = ClassCaps(D, E, iterations=3, final_lambda=0.9).double()
    with torch.no_grad():
        layer.beta_a.normal_(generator=g)
        layer.beta_u.normal_(std=0.3, generator=g)
    poses = torch.randn(n, hh, ww, D, 16, generator=g, dtype=torch.float64)
    acts = torch.rand(n, hh, ww, D, generator=g, dtype=torch.float64)
    coords = torch.rand(hh, ww, 2, generator=g, dtype=torch.float64)
    votes = layer(poses, acts, coords, return_all=True)["votes"].reshape(n, E, -1, 16)
    with routing_surrogate("uniform"):
        out = layer(poses, acts, coords)
    a = acts.reshape(n, 1, -1)
    J = a.shape[-1]
    rw = a / E  # R0 = 1/E
    mass = rw.sum(-1)  # (n, 1)
    mu = (rw[..., None] * votes).sum(2) / (mass[..., None] + 1e-8)
    var = (rw[..., None] * (votes - mu[:, :, None]) ** 2).sum(2) / (mass[..., None] + 1e-8) \
        + 1e-4
    cost = (16 * layer.beta_u + 0.5 * var.log().sum(-1)) * mass / (J / E)
    logit = 0.9 * (layer.beta_a - cost)  # lambda_T of the linear schedule = final_lambda
    torch.testing.assert_close(out["poses"], mu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["logits"], logit, rtol=1e-10, atol=1e-12)
    exact = layer(poses, acts, coords)
    assert (exact["logits"] - out["logits"]).abs().max() > 1e-3


def test_uniform_surrogate_conv_layer_uses_the_initial_assignment():
    """Conv layer: one M-step with R0 = 1 / |parents(i)| (paper), hand-computed per parent."""
    torch.manual_seed(7)
    layer = ConvCaps(1, 2, 3, 1, iterations=2, final_lambda=0.8).double()
    poses, acts = _inputs(1, 4, 4, 1, seed=8)
    full = layer(poses, acts, return_all=True)
    votes = full["votes"]  # (1, 2, 2, C, 3, 3, 1, 16)
    with routing_surrogate("uniform"):
        out = layer(poses, acts)
    C = 2
    for y in range(2):
        for x in range(2):
            for c in range(C):
                v, w = [], []
                for ky in range(3):
                    for kx in range(3):
                        u, s = y + ky, x + kx
                        windows = len([p for p in range(2) if p <= u < p + 3]) * len(
                            [q for q in range(2) if q <= s < q + 3])
                        v.append(votes[0, y, x, c, ky, kx, 0])
                        w.append(acts[0, u, s, 0] / (C * windows))
                v, w = torch.stack(v), torch.stack(w)
                mass = w.sum()
                mu = (w[:, None] * v).sum(0) / (mass + 1e-8)
                var = (w[:, None] * (v - mu) ** 2).sum(0) / (mass + 1e-8) + 1e-4
                kappa = 16 / (4 * C)
                logit = 0.8 * (layer.beta_a[c] - (16 * layer.beta_u[c] + 0.5 * var.log().sum())
                               * mass / kappa)
                torch.testing.assert_close(out["poses"][0, y, x, c], mu, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(out["logits"][0, y, x, c], logit, rtol=1e-10,
                                           atol=1e-12)


def test_layers_select_and_blocks_nest():
    model = _net()
    x = torch.randn(2, 1, 24, 24, dtype=torch.float64)
    exact = model(x, return_all=True)["layers"]
    names = model.routing_layers()
    with routing_surrogate("uniform", layers=[names["class"]]):
        assert surrogate_mode(names["class"]) == "uniform"
        assert surrogate_mode(names["conv1"]) == "exact"
        got = model(x, return_all=True)["layers"]
        with routing_surrogate("exact", layers=names["class"]):
            assert surrogate_mode(names["class"]) == "exact"
        with routing_surrogate("bpda"):
            assert surrogate_mode(names["class"]) == "bpda"
    assert surrogate_mode(names["class"]) == "exact"
    for i in (1, 2):  # conv layers untouched
        assert torch.equal(got[i]["logits"], exact[i]["logits"])
    assert (got[3]["logits"] - exact[3]["logits"]).abs().max() > 1e-6
    with pytest.raises(ValueError):
        with routing_surrogate("bogus"):
            pass
    with pytest.raises(ValueError):
        with routing_surrogate("bpda", layers=[torch.nn.Linear(2, 2)]):
            pass


def test_uniform_function_matches_one_iteration_routing_for_linear_schedule():
    """em_routing_uniform = em_routing with 1 iteration when lambda_T matches."""
    from robustcaps.models.em_routing import em_routing

    g = torch.Generator().manual_seed(9)
    votes = torch.randn(2, 1, 3, 6, 16, generator=g, dtype=torch.float64)
    a = torch.rand(2, 1, 6, generator=g, dtype=torch.float64)
    ba, bu = torch.randn(3, generator=g, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    u = em_routing_uniform(votes, a, ba, bu, iterations=4, final_lambda=0.5, data_scale=2.0)
    one = em_routing(votes, a, ba, bu, iterations=1, final_lambda=0.5, data_scale=2.0)
    torch.testing.assert_close(u.logits, one.logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u.poses, one.poses, rtol=1e-10, atol=1e-12)
    assert math.isfinite(float(u.logits.sum()))


def test_bpda_last_differs_from_bpda_only_with_mean_smoothing():
    """With smoothing the final centre also depends on the previous one, so holding only
    the last assignment leaves a path through the earlier iterations: bpda-last then
    equals the oracle with only the last R detached, and differs from bpda."""
    torch.manual_seed(4)
    layer = ConvCaps(2, 3, 3, 1, iterations=3, final_lambda=0.7,
                     routing="authors-smooth").double()
    with torch.no_grad():
        layer.beta_a.add_(1e-3 * torch.randn(3, dtype=torch.float64))
    poses, acts = _inputs(2, 4, 4, 2, seed=9)
    grads = {}
    for mode in ("bpda", "bpda-last"):
        with routing_surrogate(mode):
            _, grads[mode] = _layer_grads(layer, poses, acts)
    kw = dict(per_type=True, initial="types", var_floor=5e-4, kappa=1.0, smooth=0.9,
              lambdas=[2 * 0.7 * (1 - 0.95 ** (t + 1)) for t in range(3)])
    sa, su = 2500.0, 0.5 * (math.log(2 * math.pi) + 1)
    for mode, hold in (("bpda", "all"), ("bpda-last", "last")):
        rp, rl = ref.conv_caps(poses, acts, layer.weight, sa * layer.beta_a, su * layer.beta_u,
                               kernel=3, stride=1, iterations=3, final_lambda=0.7, hold=hold,
                               **kw)
        for gg, ww in zip(grads[mode], _oracle_grads(rp, rl, poses, acts, layer), strict=True):
            torch.testing.assert_close(gg, ww, rtol=1e-6, atol=1e-9)
    assert (grads["bpda"][0] - grads["bpda-last"][0]).abs().max() > 1e-6
