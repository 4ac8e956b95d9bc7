"""Classification losses of the paper's Table 1, per sample.

All functions return a per-sample tensor of shape (N,); reduce it yourself. ``y`` is a
(N,) int64 tensor of class indices.

- :func:`spread_loss` (Eq. 3) on class activations ``a`` in [0, 1]:
  ``L = sum_{i != t} max(0, m - (a_t - a_i))**2``. The margin ``m`` grows linearly from
  0.2 to 0.9 during training (:func:`spread_margin`).
- :func:`margin_loss` of Sabour et al. (2017) on activations (or capsule lengths):
  ``T_k max(0, m+ - a_k)**2 + lam (1 - T_k) max(0, a_k - m-)**2`` summed over classes.
- :func:`cross_entropy` on logits.
- :func:`cw_margin` (Carlini & Wagner's logit margin), useful as an attack loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def spread_loss(a: torch.Tensor, y: torch.Tensor, margin: float = 0.9) -> torch.Tensor:
    """Spread loss (Eq. 3). ``a``: (N, K) activations; returns (N,)."""
    a_t = a.gather(1, y[:, None])
    gap = torch.clamp(margin - (a_t - a), min=0.0) ** 2
    # The true class contributes max(0, m)^2 = m^2 to the sum above: remove it.
    gap = gap.masked_fill(F.one_hot(y, a.shape[1]).bool(), 0.0)
    return gap.sum(dim=1)


def spread_margin(progress: float, start: float = 0.2, end: float = 0.9) -> float:
    """The spread-loss margin at ``progress`` in [0, 1] of training (linear schedule)."""
    progress = min(max(progress, 0.0), 1.0)
    return start + (end - start) * progress


def margin_loss(
    a: torch.Tensor,
    y: torch.Tensor,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lam: float = 0.5,
) -> torch.Tensor:
    """Margin loss of Sabour et al. (2017). ``a``: (N, K) activations; returns (N,)."""
    t = F.one_hot(y, a.shape[1]).to(a.dtype)
    pos = t * torch.clamp(m_pos - a, min=0.0) ** 2
    neg = lam * (1.0 - t) * torch.clamp(a - m_neg, min=0.0) ** 2
    return (pos + neg).sum(dim=1)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy on logits. (N, K) -> (N,)."""
    return F.cross_entropy(logits, y, reduction="none")


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} z_j - z_y``: positive once the sample is misclassified. Returns (N,)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return other.max(dim=1).values - z_y
