"""The vectorised EM routing against the loop oracle in tests/reference_em.py."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch

from robustcaps.models import native
from robustcaps.models.em_routing import ClassCaps, ConvCaps, em_routing, lambda_schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_em as ref  # noqa: E402


@pytest.fixture(autouse=True, params=["native", "torch"])
def routing_impl(request, monkeypatch):
    """Every test runs on the native passes (when a C compiler is there) and the torch ops."""
    if request.param == "torch":
        monkeypatch.setenv("ROBUSTCAPS_NATIVE", "0")
    elif native.library() is None:
        pytest.skip(f"native routing unavailable: {native.status()}")
    return request.param


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


@pytest.mark.parametrize(
    "routing,h,w,stride,iters",
    [("authors", 5, 5, 1, 3), ("authors", 7, 6, 2, 2), ("pertype", 5, 5, 1, 3),
     ("pertype", 7, 6, 2, 3), ("authors-smooth", 5, 5, 1, 3), ("authors-smooth", 7, 6, 2, 2)],
)
def test_conv_caps_presets_match_oracle(routing, h, w, stride, iters):
    """The per-type normaliser (types never compete for a child), the other first
    assignments, the authors' lambda schedule, bias scales, variance floor and raw masses,
    against the loop oracle: outputs and input gradients, float64."""
    torch.manual_seed(0)
    b, c = 2, 3
    layer = ConvCaps(b, c, 3, stride, iterations=iters, final_lambda=0.7, routing=routing)
    with torch.no_grad():
        layer.beta_a.add_((1e-3 if routing.startswith("authors") else 1.0) * torch.randn(c))
        layer.beta_u.add_(0.3 * torch.randn(c))
    poses, acts = _inputs(2, h, w, b, seed=2)
    out = layer(poses, acts, return_all=True)
    if routing.startswith("authors"):
        kw = dict(per_type=True, initial="types", var_floor=5e-4, kappa=1.0,
                  lambdas=[2 * 0.7 * (1 - 0.95 ** (t + 1)) for t in range(iters)],
                  smooth=0.9 if routing == "authors-smooth" else 1.0)
        sa, su = 2500.0, 0.5 * (math.log(2 * math.pi) + 1)
    else:
        ho, wo = (h - 3) // stride + 1, (w - 3) // stride + 1
        cov = len({y * stride + k for y in range(ho) for k in range(3)}) * len(
            {x * stride + k for x in range(wo) for k in range(3)})
        kw = dict(per_type=True, initial="windows", kappa=cov * b / (ho * wo))
        sa, su = 1.0, 1.0
    rp, rl = ref.conv_caps(poses, acts, layer.weight, sa * layer.beta_a, su * layer.beta_u,
                           kernel=3, stride=stride, iterations=iters, final_lambda=0.7, **kw)
    torch.testing.assert_close(out["poses"], rp, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out["logits"], rl, rtol=1e-6, atol=1e-9)
    if iters > 1:  # per child and type, R sums to 1 over the windows containing the child
        R = out["R"]  # (N, Ho, Wo, C, K, K, B)
        ho, wo = R.shape[1:3]
        total = torch.zeros(2, h, w, c, b)
        for y in range(ho):
            for x in range(wo):
                total[:, y * stride:y * stride + 3, x * stride:x * stride + 3] += (
                    R[:, y, x].permute(0, 2, 3, 1, 4))
        covered = total.sum((3, 4)) > 0
        torch.testing.assert_close(total[covered], torch.ones_like(total[covered]),
                                   rtol=0, atol=1e-12)
    got = _grads([out["poses"], out["logits"]], (poses, acts, layer.weight, layer.beta_a,
                                                 layer.beta_u), seed=3)
    want = _grads([rp, rl], (poses, acts, layer.weight, layer.beta_a, layer.beta_u), seed=3)
    for gg, ww in zip(got, want, strict=True):
        assert torch.isfinite(gg).all() and gg.abs().max() > 0
        torch.testing.assert_close(gg, ww, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("initial,smooth", [("types", 1.0), ("windows", 1.0), ("types", 0.9)])
def test_per_type_normaliser_gradcheck(initial, smooth):
    """The hand-written backward (native and torch passes) through the per-type fold."""
    from robustcaps.models.em_routing import Fold

    layer = ConvCaps(1, 2, 3, 1)
    base = layer.fold(4, 4, torch.device("cpu"))  # L = 4 positions, J = 9 slots
    fold = Fold(base.index, base.n_pos, base.types, per_type=True, initial=initial)
    g = torch.Generator().manual_seed(24)
    votes = torch.randn(3, 4, 2, 9, 16, generator=g).requires_grad_(True)
    a = torch.rand(3, 4, 9, generator=g).requires_grad_(True)
    ba = torch.randn(2, generator=g).requires_grad_(True)
    bu = (0.3 * torch.randn(2, generator=g)).requires_grad_(True)

    def fn(v, x, y, z):
        r = em_routing(v, x, y, z, iterations=3, final_lambda=0.7, fold=fold,
                       data_scale=1.5, chunk=2, schedule="authors", var_floor=5e-4,
                       smooth=smooth)
        return r.poses, r.logits, r.R

    assert torch.autograd.gradcheck(fn, (votes, a, ba, bu), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ratio", [1000.0, 0.0])
def test_mean_smoothing_hand_backward_gradcheck_and_autograd(monkeypatch, ratio):
    """Mean smoothing (class-layer shape, no fold): the hand-written backward against finite
    differences, and the forward and gradients against the plain autograd graph, with and
    without re-centring."""
    import robustcaps.models.em_routing as em

    monkeypatch.setattr(em, "RECENTRE_RATIO", ratio)
    g = torch.Generator().manual_seed(25)
    votes = torch.randn(3, 1, 3, 7, 16, generator=g).requires_grad_(True)
    a = torch.rand(3, 1, 7, generator=g).requires_grad_(True)
    ba = torch.randn(3, generator=g).requires_grad_(True)
    bu = (0.3 * torch.randn(3, generator=g)).requires_grad_(True)
    kw = dict(iterations=3, final_lambda=0.9, data_scale=7 / 3, smooth=0.9)

    def fn(v, x, y, z):
        r = em_routing(v, x, y, z, chunk=2, **kw)
        return r.poses, r.logits, r.R

    assert torch.autograd.gradcheck(fn, (votes, a, ba, bu), eps=1e-6, atol=1e-5, rtol=1e-4)
    outs, grads = _grads_of(lambda v, x, y, z: em_routing(v, x, y, z, chunk=2, **kw),
                            votes, a, ba, bu, seed=26)
    b_outs, b_grads = _grads_of(lambda v, x, y, z: em.em_routing_autograd(v, x, y, z, **kw),
                                votes, a, ba, bu, seed=26)
    for o, b in zip(outs, b_outs, strict=True):
        torch.testing.assert_close(o, b, rtol=1e-8, atol=1e-9)
    for gg, b in zip(grads, b_grads, strict=True):
        torch.testing.assert_close(gg, b, rtol=1e-6, atol=1e-8)
    plain = em_routing(votes, a, ba, bu, chunk=2, **{**kw, "smooth": 1.0})
    assert (plain.poses - outs[0]).abs().max() > 1e-3  # smoothing changes the function


def test_authors_lambda_schedule():
    lam = lambda_schedule(3, 0.01, "authors")
    assert lam == pytest.approx([0.01 * 0.05, 0.01 * (1 - 0.95**2), 0.01 * (1 - 0.95**3)])


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


# ------------------------------------------------------ fast path (centred moments) checks
def _straight_routing(votes, a_in, beta_a, beta_u, iterations, final_lambda):
    """Procedure 1 with the direct formulas (votes - mu)^2, fold=None (independent of U)."""
    n, L, C, J, H = votes.shape
    R = torch.full((n, L, C, J), 1.0 / C, dtype=votes.dtype)
    a = a_in[:, :, None, :]
    for t, lam in enumerate(lambda_schedule(iterations, final_lambda)):
        rw = R * a
        mass = rw.sum(-1)
        mu = (rw[..., None] * votes).sum(3) / (mass + ref.MASS_EPS)[..., None]
        dev2 = (votes - mu[:, :, :, None]) ** 2
        var = (rw[..., None] * dev2).sum(3) / (mass + ref.MASS_EPS)[..., None] + ref.VAR_FLOOR
        logits = lam * (beta_a - (H * beta_u + 0.5 * var.log().sum(-1)) * mass)
        if t == iterations - 1:
            break
        log_p = (-0.5 * dev2 / var[:, :, :, None]
                 - 0.5 * torch.log(2 * math.pi * var[:, :, :, None])).sum(-1)
        R = torch.softmax(torch.nn.functional.logsigmoid(logits)[..., None] + log_p, 2)
    return mu, logits, R


def _tight_votes(spread, std, seed, n=2, L=3, C=4, J=32, H=16):
    """Trained-like votes: per parent a tight cluster (std) around a large mean (|.| ~ 10),
    40% of children outliers at distance ~spread (so later means move away from the first)."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    votes = 10 * torch.randn(n, L, C, 1, H, **kw) + std * torch.randn(n, L, C, J, H, **kw)
    out = torch.rand(n, L, C, J, 1, **kw) < 0.4
    votes = torch.where(out, votes + spread * torch.randn(n, L, C, J, H, **kw), votes)
    return (votes, torch.rand(n, L, J, **kw), torch.randn(C, **kw), 0.3 * torch.randn(C, **kw))


@pytest.mark.parametrize("spread,std", [(0.1, 1e-3), (1.0, 1e-2), (1.0, 1e-3), (10.0, 1e-2)])
def test_float32_tight_clusters_keep_precision(spread, std):
    votes, a, ba, bu = _tight_votes(spread, std, seed=11)
    want = _straight_routing(votes, a, ba, bu, 3, 1.0)
    direct32 = _straight_routing(votes.float(), a.float(), ba.float(), bu.float(), 3, 1.0)
    res = em_routing(votes.float(), a.float(), ba.float(), bu.float(), iterations=3,
                     final_lambda=1.0)
    got = (res.poses, res.logits, res.R)
    for g32, d32, w64, atol in zip(got, direct32, want, (2e-4, 0.1, 1e-3), strict=True):
        err = (g32.double() - w64).abs().max().item()
        err_direct = (d32.double() - w64).abs().max().item()
        assert err < atol, (err, err_direct)
        # no worse than the straightforward float32 computation (up to a small factor).
        # Logits (|.| up to ~1e3 here) amplify the float32 rounding of the masses by
        # |H beta_u + sum log sigma|, and the masses carry that of the E-step terms, which
        # hold log a (up to ~1e3) too; how it falls depends on the build (FMA or not: 0.021
        # or 0.039 for the native passes, 0.022 for the torch ones), so for logits a relative
        # 5e-5 of their scale is allowed (a routing that lost the centred moments' precision
        # was 0.44 off here)
        slack = 5e-5 * w64.abs().max().item() if w64 is want[1] else 1e-6
        assert err < 4 * err_direct + slack, (err, err_direct)


def _grads_of(fn, votes, a, ba, bu, seed):
    votes, a, ba, bu = (t.detach().requires_grad_(True) for t in (votes, a, ba, bu))
    res = fn(votes, a, ba, bu)
    g = torch.Generator().manual_seed(seed)
    outs = (res.poses, res.logits, res.R)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, (votes, a, ba, bu))


def test_recentring_chunking_and_compile_path_agree(monkeypatch):
    import robustcaps.models.em_routing as em

    votes, a, ba, bu = _tight_votes(10.0, 1e-2, seed=12, n=3)
    want = _straight_routing(votes, a, ba, bu, 3, 1.0)
    kw = dict(iterations=3, final_lambda=1.0)
    runs = {}
    for ratio in (0.0, math.inf, em.RECENTRE_RATIO):  # always / never / default re-centring
        monkeypatch.setattr(em, "RECENTRE_RATIO", ratio)
        for chunk in (1, 2, None):
            runs[(ratio, chunk)] = _grads_of(
                lambda v, x, y, z, chunk=chunk: em_routing(v, x, y, z, chunk=chunk, **kw),
                votes, a, ba, bu, seed=13)
    runs["autograd"] = _grads_of(lambda v, x, y, z: em.em_routing_autograd(v, x, y, z, **kw),
                                 votes, a, ba, bu, seed=13)
    base_outs, base_grads = runs["autograd"]
    for o, w in zip(base_outs, want, strict=True):
        torch.testing.assert_close(o, w, rtol=1e-8, atol=1e-9)
    for outs, grads in runs.values():
        for o, b in zip(outs, base_outs, strict=True):
            torch.testing.assert_close(o, b, rtol=1e-8, atol=1e-9)
        for g, b in zip(grads, base_grads, strict=True):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("ratio", [0.0, math.inf])
def test_custom_backward_gradcheck_with_fold(monkeypatch, ratio):
    import robustcaps.models.em_routing as em

    monkeypatch.setattr(em, "RECENTRE_RATIO", ratio)
    layer = ConvCaps(1, 2, 3, 1)
    fold = layer.fold(4, 4, torch.device("cpu"))  # L = 4 positions, J = 9 slots
    g = torch.Generator().manual_seed(14)
    votes = torch.randn(3, 4, 2, 9, 16, generator=g).requires_grad_(True)
    a = torch.rand(3, 4, 9, generator=g).requires_grad_(True)
    ba = torch.randn(2, generator=g).requires_grad_(True)
    bu = (0.3 * torch.randn(2, generator=g)).requires_grad_(True)

    def fn(v, x, y, z):
        r = em_routing(v, x, y, z, iterations=3, final_lambda=0.7, fold=fold,
                       data_scale=16 / 8, chunk=2)
        return r.poses, r.logits, r.R

    assert torch.autograd.gradcheck(fn, (votes, a, ba, bu), eps=1e-6, atol=1e-5, rtol=1e-4,
                                    fast_mode=True)


@pytest.mark.parametrize("iters,ratio,which", [(1, 1000.0, "all"), (2, 0.0, "logits"),
                                               (3, 1000.0, "poses")])
def test_hand_backward_gradcheck_without_fold(monkeypatch, iters, ratio, which):
    """The hand-written reverse sweep (no fold, class-layer shape) against finite
    differences, w.r.t. votes, a_in, beta_a and beta_u, also when only some outputs are
    used (the others' gradients arrive as None)."""
    import robustcaps.models.em_routing as em

    monkeypatch.setattr(em, "RECENTRE_RATIO", ratio)
    g = torch.Generator().manual_seed(21)
    votes = torch.randn(3, 1, 3, 7, 16, generator=g).requires_grad_(True)
    a = torch.rand(3, 1, 7, generator=g).requires_grad_(True)
    ba = torch.randn(3, generator=g).requires_grad_(True)
    bu = (0.3 * torch.randn(3, generator=g)).requires_grad_(True)

    def fn(v, x, y, z):
        r = em_routing(v, x, y, z, iterations=iters, final_lambda=0.9, data_scale=7 / 3,
                       chunk=2)
        outs = {"all": (r.poses, r.logits, r.R), "logits": (r.logits,), "poses": (r.poses,)}
        return outs[which]

    assert torch.autograd.gradcheck(fn, (votes, a, ba, bu), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_hand_backward_matches_autograd_graph_with_recentring(monkeypatch, routing_impl):
    """Tight clusters far from the first mean: the forward re-centres mid-way (torch: U of
    some chunks, which the backward must rebuild; native: some parents' references, which
    the backward reads per row); compare with the plain autograd graph (float64)."""
    import robustcaps.models.em_routing as em

    votes, a, ba, bu = _tight_votes(3.0, 1e-2, seed=22, n=4)
    kw = dict(iterations=3, final_lambda=1.0)
    monkeypatch.setattr(em, "RECENTRE_RATIO", 5.0)  # re-centre often, not always
    fired = []
    orig = em._build_u
    monkeypatch.setattr(em, "_build_u", lambda *x: fired.append(1) or orig(*x))
    outs, grads = _grads_of(lambda v, x, y, z: em_routing(v, x, y, z, chunk=1, **kw),
                            votes, a, ba, bu, seed=23)
    n_chunks = 4
    if routing_impl == "torch":
        assert len(fired) > 2 * n_chunks  # forward + backward builds, plus re-centrings
    else:
        assert not fired  # no U at all
    b_outs, b_grads = _grads_of(lambda v, x, y, z: em.em_routing_autograd(v, x, y, z, **kw),
                                votes, a, ba, bu, seed=23)
    for o, b in zip(outs, b_outs, strict=True):
        torch.testing.assert_close(o, b, rtol=1e-8, atol=1e-9)
    for gg, b in zip(grads, b_grads, strict=True):
        torch.testing.assert_close(gg, b, rtol=1e-6, atol=1e-8)



@pytest.mark.parametrize("pose,chunk", [("matrix", 2), ("vector", 3), ("matrix", None)])
def test_em_routing_slots_equals_em_routing_of_the_votes(pose, chunk):
    """Votes made per chunk inside the routing (forward and backward) give the outputs and
    the gradients (w.r.t. poses, vote matrices, activations, betas) of routing the whole
    batch's votes, in float64; conv-layer geometry with border children."""
    from robustcaps.models.em_routing import em_routing_slots

    layer = ConvCaps(2, 3, 3, 1, iterations=3, pose=pose, final_lambda=0.8)
    fold = layer.fold(5, 4, torch.device("cpu"))  # L = 3*2 positions, J = 18 slots
    g = torch.Generator().manual_seed(31)
    J, n, L, C = 18, 5, 6, 3
    pt = torch.randn(J, n, L, 16, generator=g).requires_grad_(True)
    wm = (torch.randn(J, 16, C * 16, generator=g) / 4).requires_grad_(True)
    a = torch.rand(n, L, J, generator=g).requires_grad_(True)
    ba = torch.randn(C, generator=g).requires_grad_(True)
    bu = (0.3 * torch.randn(C, generator=g)).requires_grad_(True)
    kw = dict(iterations=3, final_lambda=0.8, fold=fold, data_scale=1.7, chunk=chunk)
    inputs = (pt, wm, a, ba, bu)
    res = em_routing_slots(pt, wm, a, ba, bu, **kw)
    votes = torch.bmm(pt.reshape(J, n * L, 16), wm).view(J, n, L, C, 16).permute(1, 2, 3, 0, 4)
    want = em_routing(votes, a, ba, bu, **kw)
    outs = []
    for r in (res, want):
        o = (r.poses, r.logits, r.R)
        gg = torch.Generator().manual_seed(32)
        loss = sum((x * torch.randn(x.shape, generator=gg)).sum() for x in o)
        outs.append((o, torch.autograd.grad(loss, inputs)))
    for x, y in zip(outs[0][0], outs[1][0], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    for x, y in zip(outs[0][1], outs[1][1], strict=True):
        assert x.abs().max() > 0
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)


def test_em_routing_slots_gradcheck():
    from robustcaps.models.em_routing import em_routing_slots

    layer = ConvCaps(1, 2, 3, 1)
    fold = layer.fold(4, 4, torch.device("cpu"))  # L = 4, J = 9
    g = torch.Generator().manual_seed(33)
    args = (torch.randn(9, 3, 4, 16, generator=g), torch.randn(9, 16, 32, generator=g) / 4,
            torch.rand(3, 4, 9, generator=g), torch.randn(2, generator=g),
            0.3 * torch.randn(2, generator=g))
    args = tuple(x.requires_grad_(True) for x in args)

    def fn(*x):
        r = em_routing_slots(*x, iterations=2, final_lambda=0.7, fold=fold, data_scale=2.0,
                             chunk=2)
        return r.poses, r.logits

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("slots", [False, True])
def test_chunk_threads_match_the_plain_loop(monkeypatch, slots):
    """Chunks routed on 2 threads (forward and backward) give what the single-threaded
    chunk loop gives, and torch's thread setting is restored."""
    import robustcaps.models.em_routing as em

    layer = ConvCaps(2, 3, 3, 1)
    fold = layer.fold(5, 5, torch.device("cpu"))  # L = 9, J = 18
    g = torch.Generator().manual_seed(41)
    pt = torch.randn(18, 7, 9, 16, generator=g)
    wm = torch.randn(18, 16, 48, generator=g) / 4
    a = torch.rand(7, 9, 18, generator=g)
    ba, bu = torch.randn(3, generator=g), 0.3 * torch.randn(3, generator=g)
    kw = dict(iterations=3, final_lambda=0.8, fold=fold, data_scale=1.3, chunk=2)

    def run(threads, use_pool):
        monkeypatch.setattr(em, "CHUNK_THREADS", use_pool)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            leaves = [t.clone().requires_grad_(True) for t in (pt, wm, a, ba, bu)]
            if slots:
                r = em.em_routing_slots(*leaves, **kw)
            else:
                votes = torch.bmm(leaves[0].reshape(18, -1, 16), leaves[1])
                votes = votes.view(18, 7, 9, 3, 16).permute(1, 2, 3, 0, 4)
                r = em_routing(votes, *leaves[2:], **kw)
            loss = (r.poses.sin().sum() + r.logits.cos().sum()
                    + (r.R * torch.arange(18.0)).sum())
            grads = torch.autograd.grad(loss, leaves)
            assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(old)
        return (r.poses, r.logits, r.R), grads

    plain = run(1, False)
    threaded = run(2, True)
    for x, y in zip(plain[0] + plain[1], threaded[0] + threaded[1], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_cpu_chunk_size_follows_the_size_of_u(monkeypatch):
    """Big layers route image by image, small ones (the class layer) as one chunk per
    thread; an explicit chunk wins; CUDA-like devices get the whole batch."""
    import robustcaps.models.em_routing as em

    cpu = torch.device("cpu")

    def chunk(n, u_bytes, threads=1, explicit=None, device=cpu):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return em._config(n, device, 3, 0.01, None, 1.0, em.VAR_FLOOR, explicit,
                              u_bytes).chunk
        finally:
            torch.set_num_threads(old)

    assert chunk(32, 36 * 16 * 72 * 32 * 4) == 1  # capsnet-small ConvCaps1: 5.3 MB
    assert chunk(32, 5 * 256 * 32 * 4) == 32  # class layer: 0.16 MB
    assert chunk(32, 5 * 256 * 32 * 4, threads=2) == 16
    assert chunk(32, 2 * 2**20) == 3
    assert chunk(32, 5 * 2**20, explicit=4) == 4
    assert chunk(5, 1, explicit=9) == 5
    assert chunk(32, 10 * 2**20, device=torch.device("meta")) == 32


def test_chunk_threads_error_propagates_and_restores_threads(monkeypatch):
    """An error in one chunk thread reaches the caller after every thread stopped, and
    torch's thread setting is restored."""
    import robustcaps.models.em_routing as em

    calls = []

    def body(i, s, w):
        calls.append(i)
        if i == 1:
            raise ValueError("chunk 1")
        time.sleep(0.01)  # lets the failing thread run

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="chunk 1"):
            em._run_chunks([slice(j, j + 1) for j in range(50)], body, 2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
    assert 1 in calls and len(calls) < 50


def test_no_backward_state_kept_under_no_grad(monkeypatch):
    """Under torch.no_grad the forward keeps nothing for a backward, even though the
    parameters (betas) require grad; with grad enabled it keeps every M-step."""
    import robustcaps.models.em_routing as em

    kept = []
    orig = em._forward_chunk
    monkeypatch.setattr(em, "_forward_chunk",
                        lambda *a: kept.append(a[-1]) or orig(*a))
    g = torch.Generator().manual_seed(51)
    votes = torch.randn(2, 1, 3, 5, 16, generator=g)
    a = torch.rand(2, 1, 5, generator=g)
    ba, bu = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    with torch.no_grad():
        em_routing(votes, a, ba, bu, iterations=3, chunk=1)
    assert kept == [None, None]
    kept.clear()
    em_routing(votes, a, ba, bu, iterations=3, chunk=1)
    assert [len(k) for k in kept] == [3, 3]
