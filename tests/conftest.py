"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One intra-op thread: the suite's tensors are small, and on a shared or loaded machine
# OpenMP threads waiting for a descheduled sibling made tests several times slower.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MNIST_T10K = SHARED / "data" / "mnist-t10k"


@pytest.fixture(autouse=True)
def _hermetic_zoo(monkeypatch):
    """Tests see only the zoos they create: committed checkpoints must not change results."""
    monkeypatch.setenv("ROBUSTCAPS_BUILTIN_ZOO", "0")


@pytest.fixture
def mnist_t10k_dir() -> Path:
    if not (MNIST_T10K / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("../shared/data/mnist-t10k is not present")
    return MNIST_T10K
