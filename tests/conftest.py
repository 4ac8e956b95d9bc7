"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tests share 2 cores with nothing else in CI; one thread avoids oversubscription in
# parallel workers and keeps results deterministic.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MNIST_T10K = SHARED / "data" / "mnist-t10k"


@pytest.fixture
def mnist_t10k_dir() -> Path:
    if not (MNIST_T10K / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("../shared/data/mnist-t10k is not present")
    return MNIST_T10K
