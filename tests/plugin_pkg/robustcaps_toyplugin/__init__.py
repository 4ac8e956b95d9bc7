"""A stand-in for a third-party package that ships models for robustcaps.

Its distribution metadata registers entry points in group ``robustcaps.models``
(see ``pyproject.toml``; the checked-in ``*.dist-info`` folder makes the same entry
points visible when this folder is on ``sys.path``, without installing anything).
"""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """(N, 1, 8, 8) in [0, 1] -> (N, num_classes) logits; deterministic weights (seed 0)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def tiny_net(num_classes: int = 4) -> TinyNet:
    """Factory of entry point ``toy-tiny``: declares its input box through robustcaps_meta."""
    model = TinyNet(num_classes)
    model.robustcaps_meta = {"input_shape": (1, 8, 8), "bounds": (0.0, 1.0), "num_classes": num_classes}
    return model


def tiny_adapter():
    """Factory of entry point ``toy-adapter``: returns a ready ModelAdapter (tuple output)."""
    from robustcaps import adapt

    class TupleNet(TinyNet):
        def forward(self, x):  # (scores, features)
            return super().forward(x), x.flatten(1)

    return adapt(TupleNet(3), input_shape=(1, 8, 8), bounds=(0, 1), output_key=0,
                 name="toy-adapter", device="cpu")
