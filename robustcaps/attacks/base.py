"""The Attack protocol and its result type.

Every attack implementation (native, torchattacks, foolbox, transfer) satisfies
``Attack.run(adapter, x, y, epsilons, targets=None) -> AttackResult`` so they can be
swapped and cross-checked on identical inputs.

Epsilons are L-infinity budgets in the model's *input space* (the space the adapter's
``scores`` takes; per-image standardised units for the built-in models).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import RobustcapsError
from ..models.adapter import LOSSES, ModelAdapter


@dataclass
class AttackResult:
    """Per-sample, per-epsilon outcome of one attack on one model.

    Shapes: N samples, E epsilons. All tensors live on the CPU.

    Attributes:
        attack: attack name, e.g. ``fgsm``, ``bim``.
        backend: ``native``, ``torchattacks``, ``foolbox`` or ``transfer:<source>``.
        targeted: whether ``targets`` were attacked towards.
        epsilons: (E,) float64 array.
        y: (N,) true labels.
        targets: (N,) target labels, or None when untargeted.
        clean_pred: (N,) predictions on the clean inputs.
        adv_pred: (E, N) predictions on the adversarial inputs.
        success: (E, N) bool: ``adv_pred != y`` untargeted, ``adv_pred == targets`` targeted.
        linf, l2: (E, N) norms of the perturbation actually applied.
        x_adv: (E, N, *input_shape) adversarial inputs when requested, else None.
        info: free-form extras (timings, step counts, ...).
    """

    attack: str
    backend: str
    targeted: bool
    epsilons: np.ndarray
    y: torch.Tensor
    targets: torch.Tensor | None
    clean_pred: torch.Tensor
    adv_pred: torch.Tensor
    success: torch.Tensor
    linf: torch.Tensor
    l2: torch.Tensor
    x_adv: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> np.ndarray:
        """(E,) fraction of samples still classified as their true label."""
        return (self.adv_pred == self.y[None]).double().mean(dim=1).numpy()

    @property
    def success_rate(self) -> np.ndarray:
        """(E,) fraction of samples where the attack succeeded."""
        return self.success.double().mean(dim=1).numpy()


class Attack(ABC):
    """An L-infinity evasion attack evaluated over an epsilon sweep."""

    name: str = "attack"
    backend: str = "native"

    def __init__(self, *, loss: str | None = None, batch_size: int | None = None) -> None:
        """``loss``: the adapter loss to differentiate (None: the adapter's own);
        ``batch_size``: samples per forward/backward (None: all at once)."""
        if loss is not None and loss not in LOSSES:
            raise RobustcapsError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if batch_size is not None and batch_size < 1:
            raise RobustcapsError(f"batch_size must be >= 1, got {batch_size}")
        self.loss = loss
        self.batch_size = batch_size

    def params(self) -> dict[str, Any]:
        """The settings that identify this attack's results (for manifests and resume)."""
        return {"loss": self.loss}

    @abstractmethod
    def run(
        self,
        adapter: ModelAdapter,
        x: torch.Tensor,
        y: torch.Tensor,
        epsilons: Sequence[float],
        targets: torch.Tensor | None = None,
        *,
        return_adv: bool = False,
    ) -> AttackResult:
        """Attack ``x`` (N, *input_shape) with labels ``y`` (N,) at every epsilon.

        With ``targets`` (N,) the attack is targeted towards them.
        """
