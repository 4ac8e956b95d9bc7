"""A user's model file for CLI tests: a linear map on 1x8x8 inputs that, after its first
forward pass (the adapter's probe batch), may return NaN scores or raise."""

from __future__ import annotations

from pathlib import Path

SOURCE = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, {k})
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.fc(x.flatten(1))
        if self.calls > 1 and {fail!r} == "nan":
            return out * float("nan")
        if self.calls > 1 and {fail!r} == "raise":
            raise RuntimeError("boom in forward")
        return out

def build():
    return Net()
'''


def user_model(folder: Path, fail: str = "", k: int = 3, name: str | None = None) -> str:
    """Write the model file into ``folder``; returns its spec ``PATH:build``.

    ``fail``: "" (never), "nan" (NaN scores after the probe) or "raise" (RuntimeError
    after the probe).
    """
    path = Path(folder) / (name or f"net_{fail or 'ok'}_{k}.py")
    path.write_text(SOURCE.format(k=k, fail=fail))
    return f"{path}:build"
