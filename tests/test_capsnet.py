"""The EM-routing capsule network: registry, parameter counts, shapes, oracle agreement."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from robustcaps.errors import RobustcapsError
from robustcaps.models.adapter import ModelAdapter
from robustcaps.models.capsnet import CapsNet
from robustcaps.models.registry import architectures, count_params, create_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_em as ref  # noqa: E402


def _expected_params(a, b, c, d, e=5, cin=2, t=16):
    conv1 = 25 * cin * a + a
    primary = a * b * 17 + b * 17
    caps1 = 9 * b * c * t + 2 * c
    caps2 = 9 * c * d * t + 2 * d
    cls = d * e * t + 2 * e
    return conv1 + primary + caps1 + caps2 + cls


def test_registered_with_capsule_logits():
    archs = architectures()
    for name in ("capsnet", "capsnet-small"):
        assert archs[name].outputs == "capsule_logits"
        assert archs[name].input_shape == (2, 32, 32) and archs[name].num_classes == 5


@pytest.mark.parametrize(
    "name,dims,paper",
    [("capsnet", (32, 32, 32, 32), 310_000), ("capsnet-small", (64, 8, 16, 16), 68_000)],
)
def test_param_counts(name, dims, paper):
    n = count_params(create_model(name))
    assert n == _expected_params(*dims)
    assert abs(n - paper) / paper < 0.03
    assert n == {"capsnet": 317_194, "capsnet-small": 68_754}[name]


def test_models_json_lists_param_counts():
    from click.testing import CliRunner

    from robustcaps.cli import cli

    res = CliRunner().invoke(cli, ["models", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["capsnet"]["params"] == 317_194
    assert rows["capsnet-small"]["params"] == 68_754


def test_ablation_options_change_the_model():
    base = create_model("capsnet-small")
    vec = create_model("capsnet-small", pose="vector")
    # 16x16 transforms instead of 4x4 in the three routed layers
    assert count_params(vec) - count_params(base) == 15 * 16 * (9 * 8 * 16 + 9 * 16 * 16 + 16 * 5)
    for it in range(1, 6):
        m = create_model("capsnet-small", iterations=it)
        assert m.convcaps1.iterations == it and m.classcaps.iterations == it
    assert create_model("capsnet-small", coord_add=False).classcaps.coord_add is False


@pytest.mark.parametrize("shape,k", [((2, 32, 32), 5), ((1, 28, 28), 10)])
def test_forward_shapes(shape, k):
    torch.manual_seed(0)
    model = create_model("capsnet-small", num_classes=k, input_shape=shape).eval()
    x = torch.randn(3, *shape)
    logits = model(x)
    assert logits.shape == (3, k) and torch.isfinite(logits).all()
    out = model(x, return_all=True)
    torch.testing.assert_close(out["logits"], logits)
    torch.testing.assert_close(out["activations"], torch.sigmoid(logits))
    names = [layer["name"] for layer in out["layers"]]
    assert names == ["primary", "conv1", "conv2", "class"]
    g = [12, 5, 3] if shape[1] == 28 else [14, 6, 4]
    prim, c1, c2, cl = out["layers"]
    assert prim["poses"].shape == (3, g[0], g[0], 8, 4, 4) and prim["votes"] is None
    assert c1["poses"].shape == (3, g[1], g[1], 16, 4, 4)
    assert c1["votes"].shape == (3, g[1], g[1], 16, 3, 3, 8, 4, 4)
    assert c1["R"].shape == (3, g[1], g[1], 16, 3, 3, 8)
    assert c2["activations"].shape == (3, g[2], g[2], 16)
    assert cl["votes"].shape == (3, k, g[2], g[2], 16, 4, 4)
    assert cl["R"].shape == (3, k, g[2], g[2], 16)
    # every child of the class layer distributes exactly its whole assignment over classes
    torch.testing.assert_close(cl["R"].sum(1), torch.ones(3, g[2], g[2], 16))
    assert ((c1["activations"] >= 0) & (c1["activations"] <= 1)).all()


def test_batch_independence_and_float64():
    torch.manual_seed(0)
    model = create_model("capsnet-small").eval()
    x = torch.randn(4, 2, 32, 32)
    full = model(x)
    torch.testing.assert_close(model(x[1:2]), full[1:2], rtol=1e-4, atol=1e-4)
    m64 = model.double()
    out64 = m64(x.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), full, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("routing", ["paper", "authors", "pertype", "authors-smooth"])
def test_full_network_matches_oracle_with_input_gradients(routing):
    torch.manual_seed(0)
    model = CapsNet(num_classes=3, in_channels=1, image_size=(24, 24), A=4, B=2, C=2, D=2,
                    iterations=3, routing=routing).double().eval()
    with torch.no_grad():
        for layer in (model.convcaps1, model.convcaps2, model.classcaps):
            if routing.startswith("authors"):  # the routing sees 2500 beta_a: stay off saturation
                layer.beta_a.add_(1e-3 * torch.randn_like(layer.beta_a))
                layer.beta_u.add_(0.3 * torch.randn_like(layer.beta_u))
            else:
                layer.beta_a.normal_()
                layer.beta_u.normal_(std=0.3)
    x = torch.randn(2, 1, 24, 24, dtype=torch.float64, requires_grad=True)
    got = model(x)
    want = ref.capsnet_forward(model, x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    w = torch.randn(2, 3, dtype=torch.float64)
    (g1,) = torch.autograd.grad((got * w).sum(), x)
    (g2,) = torch.autograd.grad((want * w).sum(), x)
    assert g1.abs().max() > 0
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e6])
def test_input_gradients_finite(scale):
    torch.manual_seed(0)
    model = create_model("capsnet-small").eval()
    x = (torch.randn(2, 2, 32, 32) * scale).requires_grad_(True)
    logits = model(x)
    assert torch.isfinite(logits).all()
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])), x)
    assert torch.isfinite(g).all()


def test_adapter_wraps_capsnet():
    adapter = ModelAdapter(create_model("capsnet-small"), device="cpu")
    assert adapter.outputs == "capsule_logits" and adapter.num_classes == 5
    x = torch.randn(2, 2, 32, 32)
    loss, grad, scores = adapter.input_gradient(x, torch.tensor([0, 3]))
    assert grad.shape == x.shape and torch.isfinite(grad).all() and scores.shape == (2, 5)


def test_bad_input_is_a_robustcaps_error():
    model = create_model("capsnet-small")
    with pytest.raises(RobustcapsError, match="expects input"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(RobustcapsError, match="too small"):
        model(torch.randn(2, 2, 16, 16))
    with pytest.raises(RobustcapsError, match="pose"):
        create_model("capsnet", pose="quaternion")
    with pytest.raises(RobustcapsError, match="iterations"):
        create_model("capsnet", iterations=0)
    with pytest.raises(RobustcapsError, match="too small"):
        create_model("capsnet", input_shape=(1, 12, 12))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    model = create_model("capsnet-small").double().eval()
    x = torch.randn(3, 2, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(model.cuda()(x.cuda()).cpu(), model.cpu()(x), rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_compiled_routing_matches_eager():
    torch.manual_seed(0)
    eager = create_model("capsnet-small").eval()
    comp = create_model("capsnet-small", compile_routing=True).eval()
    comp.load_state_dict(eager.state_dict())
    x = torch.randn(4, 2, 32, 32, requires_grad=True)
    a, b = eager(x), comp(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    (ga,) = torch.autograd.grad(a.sum(), x)
    (gb,) = torch.autograd.grad(b.sum(), x)
    torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("pose", ["matrix", "vector"])
def test_chunked_vote_path_equals_whole_batch_votes(pose):
    """ConvCaps routes through em_routing_slots (votes made per sample chunk) unless
    return_all asks for the votes; both paths must give the same logits and gradients."""
    torch.manual_seed(3)
    net = CapsNet(5, 2, (32, 32), A=8, B=3, C=4, D=3, pose=pose).double()
    x = torch.randn(3, 2, 32, 32, dtype=torch.float64, requires_grad=True)
    params = [x] + list(net.parameters())
    fast = net(x)
    g_fast = torch.autograd.grad((fast * torch.arange(1.0, 6.0, dtype=fast.dtype)).sum(), params)
    full = net(x, return_all=True)["logits"]
    g_full = torch.autograd.grad((full * torch.arange(1.0, 6.0, dtype=full.dtype)).sum(), params)
    torch.testing.assert_close(fast, full, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_fast, g_full, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
