"""A third-party-style MNIST classifier: the kind of file a user brings to robustcaps.

It imports nothing from robustcaps. Like many published models it

- normalises its input itself (MNIST mean/std held as buffers): it takes images in [0, 1];
- returns a dict, ``{"class_scores": (N, 10) logits, "embedding": (N, 64) features}``,
  so robustcaps must be told which entry holds the scores (``--output-key class_scores``).

Factory: ``build(weights=None, num_classes=10)``; it loads ``third_party_net.pt`` beside
this file (a plain state dict, read with ``torch.load(weights_only=True)``) when present.
Those weights were trained by ``train_third_party_net.py`` on MNIST split ``t10k-train``
(the first 8,000 t10k images); evaluate on ``t10k-test`` (the last 2,000).

Use it::

    robustcaps evaluate --attack fgsm --dataset mnist --split t10k-test \\
        --model models/examples/third_party_net.py:build \\
        --output-key class_scores --input-shape 1,28,28 --bounds 0,1
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("third_party_net.pt")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class SmallMnistNet(nn.Module):
    """(N, 1, 28, 28) images in [0, 1] -> dict of (N, num_classes) logits and (N, 64) features."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MNIST_MEAN))
        self.register_buffer("std", torch.tensor(MNIST_STD))
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),   # 16x12x12
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),  # 32x4x4
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = (x - self.mean) / self.std
        embedding = self.features(z)
        return {"class_scores": self.head(embedding), "embedding": embedding}


def build(weights: str | None = None, num_classes: int = 10) -> SmallMnistNet:
    """The model, with the trained weights beside this file (or ``weights``) when present."""
    model = SmallMnistNet(num_classes)
    path = Path(weights) if weights else WEIGHTS
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        warnings.warn(f"{path} not found: the model is untrained", stacklevel=2)
    return model.eval()
