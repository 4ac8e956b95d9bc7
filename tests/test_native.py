"""The native routing passes (robustcaps/models/native) against torch formulas, and their
build cache and fallback."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustcaps.models import native
from robustcaps.models.em_routing import em_routing

pytestmark = pytest.mark.skipif(native.library() is None,
                                reason=f"native routing unavailable: {native.status()}")


def _votes(layout, M, J, dtype, g):
    """(M, J, 16) votes, slot-major (a transposed view) or parent-major (contiguous)."""
    if layout == "slot":
        return torch.randn(J, M, 16, generator=g, dtype=dtype).transpose(0, 1)
    return torch.randn(M, J, 16, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("layout", ["slot", "parent"])
def test_passes_match_torch_formulas(layout, dtype, tol):
    g = torch.Generator().manual_seed(3)
    M, J, C = 13, 7, 3  # M not a multiple of the kernel's parent block
    V = _votes(layout, M, J, dtype, g)
    R = torch.rand(M, J, generator=g, dtype=dtype)
    A = torch.rand(M // C + 1, J, generator=g, dtype=dtype)
    c = 0.1 * torch.randn(M, 16, generator=g, dtype=dtype)
    dv = V - c[:, None]

    def close(got, want):
        assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())

    rw = R * A[torch.arange(M) // C]
    S, mass = torch.empty(M, 32, dtype=dtype), torch.empty(M, dtype=dtype)
    native.moments(V, R, c, S, A=A, adiv=C, mass=mass)
    close(S[:, :16], (rw[..., None] * dv).sum(1))
    close(S[:, 16:], (rw[..., None] * dv * dv).sum(1))
    close(mass, rw.sum(1))
    # rows shared by C parents (rdiv), no reference, first half only
    rows = torch.rand(M // C + 1, J, generator=g, dtype=dtype)
    S1 = torch.full((M, 16), math.nan, dtype=dtype)
    native.moments(V, rows, None, S1, rdiv=C, second=False)
    close(S1, (rows[torch.arange(M) // C][..., None] * V).sum(1))

    w = torch.randn(M, 32, generator=g, dtype=dtype)
    add, add2 = torch.randn(M, generator=g, dtype=dtype), torch.randn(M, generator=g, dtype=dtype)
    z = torch.empty(M, J, dtype=dtype)
    native.estep(V, c, w, z, add, add2)
    close(z, (dv * w[:, None, :16] + dv * dv * w[:, None, 16:]).sum(-1) + add[:, None]
          + add2[:, None])

    for K in (5, 11):  # one sweep of products, and more than one
        L = torch.randn(M, K, J, generator=g, dtype=dtype)
        P = torch.randn(M, K, 32, generator=g, dtype=dtype)
        cs = torch.randn(M, K, 16, generator=g, dtype=dtype)
        want = sum(L[:, k, :, None] * (P[:, k, None, :16] + 2 * (V - cs[:, k, None])
                                       * P[:, k, None, 16:]) for k in range(K))
        G = torch.empty_like(V)  # same layout as V
        native.vgrad(V, L, P, cs, G)
        close(G, want)
        native.vgrad(V, L, P, cs, G, accumulate=True)
        close(G, 2 * want)


def _iteration_reference(V, rw, c0, types, ba, buh, lam, ds, floor, eps, ratio):
    """One iteration from its documented formulas (float64), per-parent re-centring."""
    def moments(c):
        dv = V - c[:, None]
        return (rw[..., None] * dv).sum(1), (rw[..., None] * dv * dv).sum(1)

    mass = rw.sum(1, keepdim=True)
    den = mass + eps
    c = (rw[..., None] * V).sum(1) / den if c0 is None else c0.clone()
    for again in range(2):
        S1, S2 = moments(c)
        d = (S1 - eps * c) / den
        q = S2 - d * (2 * S1 - d * mass)
        var = q.clamp_min(0) / den + floor
        far = (d * d / var > ratio).any(1)
        if again or c0 is None or not far.any():
            break
        c = torch.where(far[:, None], c + d, c)
    sls = 0.5 * var.log().sum(1)
    logit = lam * (ba[types] - (buh[types] + sls) * mass[:, 0] / ds)
    inv = 1 / var
    k = -0.5 * (d * d * inv).sum(1) - sls - 8 * math.log(2 * math.pi)
    dv = V - c[:, None]
    z = ((dv * (d * inv)[:, None] - 0.5 * dv * dv * inv[:, None]).sum(-1) + k[:, None]
         + F.logsigmoid(logit)[:, None])
    return dict(c=c, S=torch.cat((S1, S2), 1), mass=mass[:, 0], d=d, var=var, q=q, sls=sls,
                logit=logit, z=z)


@pytest.mark.parametrize("with_reference", [False, True])
def test_iteration_matches_its_formulas_and_recentres_per_parent(with_reference):
    g = torch.Generator().manual_seed(5)
    M, J, C = 11, 9, 4
    kw = dict(generator=g, dtype=torch.float64)
    # tight clusters: 0.05 spread around per-parent means of scale 3
    V = (3 * torch.randn(M, 1, 16, **kw) + 0.05 * torch.randn(M, J, 16, **kw)
         ).transpose(0, 1).contiguous().transpose(0, 1)  # slot-major
    R, A = torch.rand(M, J, **kw), torch.rand(M // C + 1, J, **kw)
    rw = R * A[torch.arange(M) // C]
    ba, buh = torch.randn(C, **kw), torch.randn(C, **kw)
    mean = (rw[..., None] * V).sum(1) / (rw.sum(1, keepdim=True) + 1e-8)
    c0 = None
    if with_reference:  # odd parents' references 1 away from their mean (~20 sigma): re-centred
        c0 = (mean + (torch.arange(M) % 2)[:, None] * 1.0).contiguous()
    args = dict(lam=0.7, ds=2.5, floor=1e-4, eps=1e-8, ratio=100.0)
    want = _iteration_reference(V, rw, c0, torch.arange(M) % C, ba, buh, **args)
    got = native.iteration(V, R, c0, rdiv=1, A=A, adiv=C, C=C, beta_a=ba, buh=buh,
                           lam=args["lam"], data_scale=args["ds"], var_floor=args["floor"],
                           eps=args["eps"], ratio=args["ratio"], estep=True)
    for key, ref in want.items():
        torch.testing.assert_close(got[key], ref, rtol=1e-9, atol=1e-9, msg=key)
    torch.testing.assert_close(got["w"], torch.cat((want["d"] / want["var"],
                                                    -0.5 / want["var"]), 1))
    if with_reference:
        moved = (got["c"] != c0).any(1)
        assert moved.tolist() == [bool(i % 2) for i in range(M)]


def test_build_is_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTCAPS_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_STATE", {})
    lib = native.library()
    assert lib is not None and native.library() is lib
    built = list(tmp_path.glob("routing-*.so"))
    assert len(built) == 1
    monkeypatch.setattr(native, "_STATE", {})  # a new process finds the same build
    stamp = built[0].stat().st_mtime_ns
    assert native.library() is not None
    assert [p.stat().st_mtime_ns for p in tmp_path.glob("routing-*.so")] == [stamp]


def test_without_a_working_compiler_routing_falls_back_to_torch(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(8)
    votes = torch.randn(3, 2, 4, 6, 16, generator=g, dtype=torch.float64)
    a = torch.rand(3, 2, 6, generator=g, dtype=torch.float64)
    ba, bu = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    want = em_routing(votes, a, ba, bu)  # native
    monkeypatch.setenv("ROBUSTCAPS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(native, "_STATE", {})
    with pytest.warns(RuntimeWarning, match="native EM routing unavailable"):
        assert native.library() is None
    assert native.status().startswith("torch ops: build failed")
    got = em_routing(votes, a, ba, bu)
    for x, y in zip((got.poses, got.logits, got.R), (want.poses, want.logits, want.R),
                    strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)
    assert not list(tmp_path.glob("*.so"))  # nothing half-built left behind


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("h,stride", [(7, 2), (5, 1)])
def test_per_type_normaliser_kernels_match_torch_ops(h, stride, dtype):
    """rc_norm_type (forward) and rc_norm_type_grad (backward) against the torch ops of
    the per-type fold, including a parent type whose terms are all ~1000 below the
    others' (a per-type max shift is needed, or that type's group would be 0/0)."""
    from robustcaps.models.em_routing import ConvCaps, Fold, _fold_sum, _normalise, _normalise_

    B, C = 2, 3
    base = ConvCaps(B, C, 3, stride).fold(h, h, torch.device("cpu"))
    fold = Fold(base.index, base.n_pos, base.types, per_type=True, initial="types")
    ho = (h - 3) // stride + 1
    g = torch.Generator().manual_seed(11)
    z = torch.randn(2, ho * ho, C, 9 * B, generator=g, dtype=dtype) * 5
    z[:, :, 1] -= 1000.0
    want = _normalise(z, fold)  # torch ops, out of place
    got = native.norm_type_(z.clone(), fold.index, fold.n_pos, B)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-14)
    assert torch.equal(got, _normalise_(z.clone(), fold, False))
    # per (child, type), R sums to 1 over the windows containing the child
    torch.testing.assert_close(_fold_sum(got, fold), torch.ones_like(got))
    gR = torch.randn(got.shape, generator=g, dtype=dtype)
    want_g = (gR - _fold_sum(gR * got, fold)) * got
    out = torch.empty(2 * ho * ho * C, 2, 9 * B, dtype=dtype)[:, 1]  # strided rows
    got_g = native.norm_type_grad(gR, got, out.view(2, ho * ho, C, 9 * B), fold.index,
                                  fold.n_pos, B)
    torch.testing.assert_close(got_g, want_g, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=1e-6 if dtype == torch.float32 else 1e-14)
