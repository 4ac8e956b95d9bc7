"""The paper's baseline CNN (Section 5).

Two 5x5 convolutions (32 and 64 channels, stride 1, same padding), each followed by ReLU
and 2x2 max pooling, a 1024-unit fully connected ReLU layer with dropout, and the class
output (logits). At a 2x32x32 input and 5 classes: 4,253,349 parameters (paper: 4.2M).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RobustcapsError
from .registry import register_model


class BaselineCNN(nn.Module):
    """(N, C, H, W) -> (N, num_classes) logits. H and W must be divisible by 4."""

    def __init__(
        self,
        num_classes: int = 5,
        in_channels: int = 2,
        image_size: tuple[int, int] = (32, 32),
        channels: tuple[int, int] = (32, 64),
        hidden: int = 1024,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        h, w = image_size
        if h % 4 or w % 4:
            raise RobustcapsError(f"BaselineCNN needs H and W divisible by 4, got {image_size}")
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * (h // 4) * (w // 4), hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model(
    "cnn",
    description="Baseline CNN of Section 5: conv32-pool-conv64-pool-fc1024(dropout)-fc (~4.2M params)",
)
def cnn(num_classes: int = 5, input_shape: tuple[int, int, int] = (2, 32, 32), **kw) -> BaselineCNN:
    c, h, w = input_shape
    return BaselineCNN(num_classes=num_classes, in_channels=c, image_size=(h, w), **kw)
