"""Pintor et al.'s six Indicators of Attack Failure, as functions of what an attack records.

The formulas follow the authors' reference implementation (pralab/IndicatorsOfAttackFailure,
``src/indicators/indicators.py``); the names are theirs. Each function returns one value
per sample; :mod:`.indicators` aggregates them into verdicts. Losses here are the attack
loss the attack *ascends* (the reference minimises its negative: same formulas, mirrored).

- unavailable gradients: the computational graph is interrupted, or the sample's gradient
  of the attack loss is exactly zero (every entry);
- unstable predictions: mean over ``gamma`` uniform draws ``delta`` in
  ``[-r/2, r/2]^d`` of ``|L(x + delta) - L(x)| / |L(x)|`` (``|L(x)| = 0`` counts as 1),
  capped at 1;
- silent success: some iterate of the attack's path is adversarial but the point the
  attack returns is not;
- incomplete optimization: the loss history rescaled to [0, 1], made monotone (running
  best), still moves by more than 0.05 over its last ``min(10, T)`` entries;
- transfer failure: the model labels the example differently than the surrogate it was
  crafted on did;
- unconstrained attack failure: the attack with an infinite budget leaves the sample
  correctly classified (and not as a silent success).

Shapes: histories are (T, N), T passes of the attack (the start included), N samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: the reference's settings
INCOMPLETE_WINDOW = 10
INCOMPLETE_TOLERANCE = 0.05
UNSTABLE_DRAWS = 100
#: robustcaps' default: the model-level mean over N samples x 20 draws is already stable
#: to ~0.01, and 100 draws cost as much as the whole PGD sweep on a small CNN
UNSTABLE_DRAWS_DEFAULT = 20
UNSTABLE_RADIUS = 8 / 255  # in units of the data scale: the box width for [0, 1] images

NAMES = {
    "P1": "unavailable gradients",
    "P2": "unstable predictions",
    "P3": "silent success",
    "P4": "incomplete optimization",
    "P5": "transfer failure",
    "P6": "unconstrained attack failure",
}


def unavailable_gradients(grad: torch.Tensor) -> torch.Tensor:
    """(N, ...) gradients -> (N,) bool: every entry is exactly zero."""
    return (grad.flatten(1) == 0).all(dim=1)


def graph_interrupted(gradient: Callable[[], object]) -> str | None:
    """Run ``gradient()``; the error text when autograd cannot reach the input, else None.

    A model that leaves the graph (``detach``, numpy, ``torch.no_grad``) makes
    ``torch.autograd.grad`` raise: the reference counts that as unavailable gradients."""
    try:
        gradient()
    except RuntimeError as exc:
        text = str(exc)
        if "does not require grad" in text or "not have been used in the graph" in text:
            return text.splitlines()[0]
        raise
    return None


def rescaled_best(loss: torch.Tensor) -> torch.Tensor:
    """(T, N) ascended losses -> (T, N) running best rescaled to [0, 1] per sample.

    0 is the sample's lowest loss, 1 its highest; a constant history stays 0. NaN (a pass
    the sample sat out, having stopped early) keeps the best so far."""
    lo = torch.nan_to_num(loss, nan=math.inf).min(dim=0).values
    span = torch.nan_to_num(loss, nan=-math.inf).max(dim=0).values - lo
    scaled = (loss - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.cummax(torch.nan_to_num(scaled, nan=-math.inf), dim=0).values


def incomplete_optimization(loss: torch.Tensor, window: int = INCOMPLETE_WINDOW,
                            tolerance: float = INCOMPLETE_TOLERANCE) -> torch.Tensor:
    """(T, N) loss histories -> (N,) bool: the rescaled running best still moves by more
    than ``tolerance`` over the last ``min(window, T)`` entries."""
    best = rescaled_best(loss.double())
    last = best[-min(window, best.shape[0]):]
    return (last[-1] - last[0]) > tolerance


def silent_success(path_success: torch.Tensor, returned_success: torch.Tensor) -> torch.Tensor:
    """(T, N) per-iterate success and (N,) success of the returned point -> (N,) bool."""
    return path_success.any(dim=0) & ~returned_success


def relative_change(reference: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """(N,) and (G, N) losses -> (N,) mean over draws of ``|L' - L| / |L|``, capped at 1."""
    den = reference.abs()
    den = torch.where(den == 0, torch.ones_like(den), den)
    return ((perturbed - reference).abs() / den).mean(dim=0).clamp(max=1.0)


def transfer_failure(surrogate_pred: torch.Tensor, target_pred: torch.Tensor) -> torch.Tensor:
    """(N,) the label the surrogate gives the crafted example differs from the model's."""
    return surrogate_pred != target_pred


def unconstrained_attack_failure(clean_correct: torch.Tensor, success: torch.Tensor,
                                 silent: torch.Tensor) -> torch.Tensor:
    """(N,) correctly classified, not fooled by the unbounded attack, not a silent success."""
    return clean_correct & ~success & ~silent
