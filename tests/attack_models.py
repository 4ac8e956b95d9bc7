"""Small models for the attack tests: closed-form linear ones and a fitted MLP."""

from __future__ import annotations

import torch
from torch import nn

from robustcaps.models.adapter import ModelAdapter


def linear_adapter(k: int = 2, d: int = 12, seed: int = 0, bounds=None) -> ModelAdapter:
    """A linear classifier on (1, 3, 4) inputs (d = 12) with small weights."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d, k)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(k, d, generator=g) * 0.3)
        lin.bias.copy_(torch.randn(k, generator=g) * 0.1)
    model = nn.Sequential(nn.Flatten(), lin)
    return ModelAdapter(model, input_shape=(1, 3, 4), num_classes=k, device="cpu", bounds=bounds)


def blobs(n: int, k: int, seed: int, shape=(1, 6, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian class blobs: class means fixed by k (seed 123), noise by ``seed``."""
    d = int(torch.tensor(shape).prod())
    means = torch.randn(k, d, generator=torch.Generator().manual_seed(123)) * 0.6
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    x = means[y] + torch.randn(n, d, generator=g)
    return x.view(n, *shape), y


def fitted_mlp(k: int = 5, seed: int = 0, steps: int = 300) -> ModelAdapter:
    """A 2-layer MLP fitted to :func:`blobs` (~0.3 s on one thread)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 48), nn.ReLU(), nn.Linear(48, k))
    x, y = blobs(1000, k, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return ModelAdapter(model.eval(), input_shape=(1, 6, 6), num_classes=k, device="cpu")
