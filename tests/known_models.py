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

import functools
from pathlib import Path

import numpy as np
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


# ---------------------------------------------------------------- the calibration suite
# Models fitted in the tests (fixed seeds, seconds on one core) on MNIST t10k when the
# shared copy is present, else on generated digit-like data of the same shape. All take
# (N, 1, 28, 28) images in [0, 1] and return 10 logits unless said otherwise.

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"
IMAGE = (1, 28, 28)


def fit_data(n: int = 2000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(x, y, source) for fitting: MNIST t10k-train when present, else generated data."""
    if MNIST_DIR.is_dir():
        from robustcaps.data.coerce import as_dataset

        d = as_dataset("mnist", "t10k-train", n_samples=n, seed=seed, data_dir=MNIST_DIR,
                       progress=False)
        return d.x.float(), d.y.long(), "mnist t10k-train"
    return (*generated_digits(n, seed), "generated")


def eval_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out samples: MNIST t10k-test when present, else generated (another seed)."""
    if MNIST_DIR.is_dir():
        from robustcaps.data.coerce import as_dataset

        d = as_dataset("mnist", "t10k-test", n_samples=n, seed=seed, data_dir=MNIST_DIR,
                       progress=False)
        return d.x.float(), d.y.long()
    return generated_digits(n, seed + 1000)


def generated_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 fixed smooth blob templates plus per-sample noise, clipped to [0, 1]."""
    gen = torch.Generator().manual_seed(1234)
    templates = torch.nn.functional.avg_pool2d(torch.rand(10, 1, 28, 28, generator=gen), 7, 1, 3)
    templates = (templates - templates.mean()) * 8 + 0.3
    gen.manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=gen)
    x = templates[y] + 0.3 * torch.randn(n, *IMAGE, generator=gen)
    return x.clamp(0, 1), y


class SmallCNN(nn.Module):
    """Two conv + max-pool blocks and a linear head: an ordinary MNIST CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 4 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Logistic(nn.Module):
    """Multinomial logistic regression on the 784 pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 3, seed: int = 0,
        lr: float = 3e-3) -> nn.Module:
    """Adam on cross-entropy, batches of 50 in a seeded order; returns the model in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


class QuantisedInput(nn.Module):
    """``round(x * levels) / levels`` before ``base``: autograd sees exactly zero gradients."""

    def __init__(self, base: nn.Module, levels: int = 4) -> None:
        super().__init__()
        self.base, self.levels = base, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(torch.round(x * self.levels) / self.levels)


class Saturated(nn.Module):
    """``gain`` x the base's logits, and their float32 softmax (dict output)."""

    def __init__(self, base: nn.Module, gain: float = 1000.0) -> None:
        super().__init__()
        self.base, self.gain = base, gain

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.gain * self.base(x)
        return {"logits": z, "probabilities": torch.softmax(z, dim=1)}


class Randomised(nn.Module):
    """The base on ``x + sigma * N(0, 1)``, fresh noise at every call (a randomised defence)."""

    def __init__(self, base: nn.Module, sigma: float = 0.5) -> None:
        super().__init__()
        self.base, self.sigma = base, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x + self.sigma * torch.randn_like(x))


def smooth_and_quantise(x: np.ndarray) -> np.ndarray:
    """A 3x3 median filter after 8-level bit-depth reduction, in numpy (as a JPEG or a
    library filter would be): no autograd graph survives it."""
    q = np.round(x * 8) / 8
    p = np.pad(q, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = x.shape[-2:]
    windows = [p[..., i:i + h, j:j + w] for i in range(3) for j in range(3)]
    return np.median(np.stack(windows), axis=0).astype(x.dtype)


class NumpyPreprocessed(nn.Module):
    """``base(smooth_and_quantise(x))`` computed outside autograd. With ``bpda=True`` the
    backward pass treats the preprocessing as the identity (BPDA, Athalye et al. 2018):
    the same forward values, a usable gradient."""

    def __init__(self, base: nn.Module, bpda: bool = False) -> None:
        super().__init__()
        self.base, self.bpda = base, bpda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.from_numpy(smooth_and_quantise(x.detach().cpu().numpy())).to(x)
        return self.base(x + (z - x).detach() if self.bpda else z)


def image_adapter(model: nn.Module, name: str, **options) -> ModelAdapter:
    """A 28x28 model on the CPU with the [0, 1] box."""
    return ModelAdapter(model, input_shape=IMAGE, num_classes=10, name=name, device="cpu",
                        bounds=(0.0, 1.0), **options)


def frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@functools.lru_cache(maxsize=1)
def fitted() -> dict[str, nn.Module]:
    """The fitted CNN and logistic regression (cached: several tests share them)."""
    x, y, _ = fit_data()
    return {"cnn": frozen(fit(SmallCNN(), x, y)), "linear": frozen(fit(Logistic(), x, y, epochs=5))}


def third_party_net() -> ModelAdapter:
    """The shipped example model, loaded as a user would (file spec + output key)."""
    from robustcaps.models.resolve import resolve_model

    spec = f"{Path(__file__).resolve().parents[1] / 'models/examples/third_party_net.py'}:build"
    return resolve_model(spec, defaults={"input_shape": IMAGE, "num_classes": 10, "bounds": (0.0, 1.0)},
                         device="cpu", output_key="class_scores", name="third-party-net")


def calibration_models() -> dict[str, ModelAdapter]:
    """Every calibration model by name (the zoo capsule network is built separately)."""
    f = fitted()
    return {
        "clean-cnn": image_adapter(f["cnn"], "clean-cnn"),
        "clean-linear": image_adapter(f["linear"], "clean-linear"),
        "third-party-net": third_party_net(),
        "quantised-input": image_adapter(QuantisedInput(f["cnn"]), "quantised-input"),
        "saturated-probs": image_adapter(Saturated(f["linear"]), "saturated-probs",
                                         outputs="probabilities", output_key="probabilities"),
        "saturated-logits": image_adapter(Saturated(f["linear"]), "saturated-logits",
                                          outputs="logits", output_key="logits", loss="cw"),
        "randomised": image_adapter(Randomised(f["cnn"]), "randomised"),
        "numpy-preprocessed": image_adapter(NumpyPreprocessed(f["cnn"]), "numpy-preprocessed"),
    }
