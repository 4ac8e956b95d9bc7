"""Tiny models whose gradient-masking diagnosis is known in advance.

All take (N, C, H, W) inputs (default 1x8x8, 4 classes) and are cheap enough for fast tests.

- :class:`LinearNet`: a clean linear classifier, ``z = W vec(x) + b``. Its CE gradient is
  ``W^T (softmax(z) - onehot(y))`` (closed form used as an oracle). Nothing must be flagged.
- :class:`QuantisedNet`: ``round(x * levels) / levels`` before the same linear map. The
  autograd gradient of ``round`` is exactly zero, so every input gradient is exactly zero,
  while the model's output does change with the input (finite differences see the steps).
  Unavailable gradients: FAIL.
- :class:`SaturatedNet`: the linear map scaled by a large ``gain``, returning a dict with
  ``logits`` and float32 softmax ``probabilities``, like the saturated network of Brendel &
  Bethge (2017). With ``outputs="probabilities"`` the attack loss is computed from the
  probabilities (``-log p_y`` of a float32 softmax whose non-true entries underflow to 0),
  and its gradient is exactly zero: flagged. With the logits and the logit-margin loss
  (``cw``) the gradient is ``w_j - w_y``, independent of saturation: not flagged.
- :class:`RandomisedNet`: the linear model evaluated on ``x + sigma * noise`` with fresh
  noise at every forward pass (a randomised defence). Unstable predictions: FAIL.
"""

from __future__ import annotations

import torch
from torch import nn

from robustcaps.models.adapter import ModelAdapter

SHAPE = (1, 8, 8)
K = 4


class LinearNet(nn.Module):
    """(N, C, H, W) -> (N, K) logits ``W vec(x) + b`` with seeded Gaussian weights."""

    def __init__(self, shape: tuple[int, int, int] = SHAPE, k: int = K, seed: int = 0,
                 zero_inputs: int = 0) -> None:
        super().__init__()
        d = shape[0] * shape[1] * shape[2]
        gen = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(d, k)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(k, d, generator=gen) / d**0.5)
            self.fc.bias.copy_(0.1 * torch.randn(k, generator=gen))
            # Inputs the model ignores: their gradient entries are exactly zero.
            self.fc.weight[:, :zero_inputs] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class QuantisedNet(LinearNet):
    """A step (quantisation) layer in front of :class:`LinearNet`: zero gradients everywhere."""

    def __init__(self, levels: float = 4.0, **kw) -> None:
        super().__init__(**kw)
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.round(x * self.levels).flatten(1) / self.levels)


class SaturatedNet(LinearNet):
    """``gain * (W x + b)`` as logits and their float32 softmax as probabilities (dict output)."""

    def __init__(self, gain: float = 1000.0, **kw) -> None:
        super().__init__(**kw)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.gain * self.fc(x.flatten(1))
        return {"logits": z, "probabilities": torch.softmax(z, dim=1)}


class RandomisedNet(LinearNet):
    """:class:`LinearNet` on ``x + sigma * N(0, 1)``, fresh noise at every call, even in eval."""

    def __init__(self, sigma: float = 1.0, **kw) -> None:
        super().__init__(**kw)
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x + self.sigma * torch.randn_like(x)).flatten(1))


def adapter(model: nn.Module, name: str, **options) -> ModelAdapter:
    """Wrap a known model on the CPU with the test input shape and no input box."""
    return ModelAdapter(model, input_shape=SHAPE, num_classes=K, name=name, device="cpu", **options)


def linear(seed: int = 0, **kw) -> ModelAdapter:
    return adapter(LinearNet(seed=seed, **kw), f"linear{seed}")


def quantised() -> ModelAdapter:
    return adapter(QuantisedNet(), "quantised")


def saturated_probabilities() -> ModelAdapter:
    """Loss computed from the saturated float32 probabilities (cross-entropy on log p)."""
    return adapter(SaturatedNet(), "saturated-probs", outputs="probabilities",
                   output_key="probabilities")


def saturated_logits(loss: str = "cw") -> ModelAdapter:
    """The same network attacked through its logits (logit-margin loss by default)."""
    return adapter(SaturatedNet(), f"saturated-logits-{loss}", outputs="logits",
                   output_key="logits", loss=loss)


def randomised() -> ModelAdapter:
    return adapter(RandomisedNet(), "randomised")


def data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (n, *SHAPE) standard normal, ``y`` (n,) = the clean linear model's prediction,
    so every sample starts correctly classified by the linear-family models."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=gen)
    with torch.no_grad():
        y = LinearNet()(x).argmax(dim=1)
    return x, y


class BumpNet(nn.Module):
    """Two classes on a (1, 1, 1) input x: ``z = (0, 1 - 4 (x - 1)^2)``, label 0.

    Misclassified exactly for 0.5 < x < 1.5 and the cross-entropy peaks at x = 1. BIM with
    step 0.8 from x = 0 visits 0.8 (adversarial), 1.6 (not), 0.8, 1.6, ...: with an even
    number of steps the last iterate is not adversarial although iterate 1 was (silent
    success, known in advance).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1)[:, :1]
        return torch.cat([torch.zeros_like(v), 1 - 4 * (v - 1) ** 2], dim=1)


class RampNet(nn.Module):
    """Two classes on a (1, 1, 1) input: ``z = (10, x)``. The cross-entropy of label 0 rises
    steadily with x, and no x below 10 is misclassified: BIM with a budget < 10 fails while
    its loss is still rising at the last step (incomplete optimisation) unless the budget
    stops it early (then the loss plateaus)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1)[:, :1]
        return torch.cat([torch.full_like(v, 10.0), v], dim=1)


def scalar_adapter(model: nn.Module, name: str) -> ModelAdapter:
    return ModelAdapter(model, input_shape=(1, 1, 1), num_classes=2, name=name, device="cpu")
