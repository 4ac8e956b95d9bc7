"""ModelAdapter: one interface for capsule networks, CNNs and third-party models.

Attacks and diagnostics only ever talk to a :class:`ModelAdapter`. It answers:

- ``scores(x)``: (N, num_classes) scores whose argmax is the prediction. They are logits
  for ordinary classifiers, ``log p`` for models that output probabilities, and the
  logits of the class activations (pre-sigmoid) for capsule networks.
- ``loss(scores, y, targeted=False)``: a per-sample (N,) loss that an attack *increases*.
  Untargeted: the loss of the true label ``y``. Targeted: minus the loss of the target
  label (``y`` is then the target), so ascending it moves towards the target.
- ``num_classes``, ``input_shape`` (C, H, W), ``bounds`` ((lo, hi) or None for inputs
  that have no box, like the paper's per-image standardised images), ``device``,
  ``dtype``.

Preprocessing (``mean``/``std`` normalisation) happens inside the adapter, so inputs,
epsilons and bounds all live in the model's *input space* as the user feeds it.

The wrapped module is always in eval mode. Gradients are taken with
``torch.autograd.grad`` w.r.t. the input only, so no parameter gradients are computed.

Attack losses (``loss=``):

``ce``      softmax cross-entropy on the scores (default for every model). For capsule
            networks the scores are the logits of the class activations, so this is the
            cross-entropy of a softmax over those logits: it never saturates to an exactly
            zero gradient, unlike the spread loss.
``spread``  the spread loss (Eq. 3, margin 0.9) on activations: sigmoid(scores) for
            capsules, softmax(scores) otherwise. Zero gradient once all margins hold.
``margin``  Sabour et al.'s margin loss on the same activations.
``cw``      the logit margin ``max_{j != y} z_j - z_y``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError, ModelRuntimeError, NonFiniteError, RobustcapsError
from ..utils import resolve_device
from . import losses as L

OUTPUT_KINDS = ("logits", "probabilities", "capsule_logits")
LOSSES = ("ce", "spread", "margin", "cw")


def _as_tuple(value: Any, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return (float(value),)
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise RobustcapsError(f"{name} must be a number or a list of numbers, got {value!r}") from None


class ModelAdapter:
    """Wrap a classifier ``nn.Module`` for attacks and diagnostics.

    Args:
        model: the module; its ``forward(x)`` takes (N, C, H, W) and returns (N, K) scores,
            or a tuple/dict holding them (select with ``output_key``).
        num_classes: K; inferred from a probe batch when omitted.
        input_shape: (C, H, W) of one input, in the user's input space.
        bounds: (lo, hi) box that inputs and adversarial examples must stay in, or None.
        mean, std: per-channel normalisation applied inside the adapter before the model.
        outputs: ``logits``, ``probabilities`` (a log is taken, with a warning: gradients
            of saturated probabilities vanish) or ``capsule_logits``.
        output_key: key (dict outputs) or index (tuple outputs) of the scores.
        loss: the attack loss, see the module docstring.
        name: a display name for tables and plots.
        device: ``auto``, ``cpu``, ``cuda[:N]`` or a torch.device.
        probe: run one (2, *input_shape) batch to check shape and finiteness.

    Built-in models carry a ``robustcaps_meta`` dict attribute with defaults for
    ``outputs``, ``num_classes``, ``input_shape`` and ``bounds``; third-party modules may
    set one too, also with ``mean``, ``std`` and ``output_key``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
        bounds: Sequence[float] | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        outputs: str | None = None,
        output_key: str | int | None = None,
        loss: str = "ce",
        name: str | None = None,
        device: str | torch.device | None = "auto",
        dtype: torch.dtype | None = None,
        probe: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"expected a torch.nn.Module, got {type(model).__name__}")
        meta = dict(getattr(model, "robustcaps_meta", {}) or {})
        self.outputs = outputs or meta.get("outputs", "logits")
        if self.outputs not in OUTPUT_KINDS:
            raise RobustcapsError(f"outputs must be one of {', '.join(OUTPUT_KINDS)}, got {self.outputs!r}")
        if loss not in LOSSES:
            raise RobustcapsError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if self.outputs == "probabilities":
            warnings.warn(
                "model outputs probabilities: scores are log(p); expect vanishing gradients "
                "where the softmax saturates",
                stacklevel=2,
            )
        self.loss_name = loss
        self.output_key = output_key if output_key is not None else meta.get("output_key")
        self.name = name or meta.get("name") or type(model).__name__
        self.num_classes = num_classes if num_classes is not None else meta.get("num_classes")
        # Said in errors about class counts, so the user knows which number to fix.
        self.num_classes_from = ("the num_classes option" if num_classes is not None else
                                 "the model's robustcaps_meta" if self.num_classes is not None
                                 else "its scores on a probe batch")
        # Evaluation turns this on: NaN/Inf scores or input gradients raise NonFiniteError
        # instead of becoming prediction 0 or a zero attack step (see evaluation.run).
        self.check_finite = False
        shape = input_shape if input_shape is not None else meta.get("input_shape")
        self.input_shape = tuple(int(s) for s in shape) if shape is not None else None
        b = bounds if bounds is not None else meta.get("bounds")
        self.bounds = (float(b[0]), float(b[1])) if b is not None else None
        if self.bounds is not None and not self.bounds[0] < self.bounds[1]:
            raise RobustcapsError(f"bounds must satisfy lo < hi, got {self.bounds}")
        self.device = resolve_device(device)
        self.dtype = dtype or next((p.dtype for p in model.parameters()), torch.float32)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        # A module may declare its own normalisation in robustcaps_meta (mean/std).
        self._mean = self._channel_tensor(_as_tuple(mean if mean is not None else meta.get("mean"), "mean"))
        self._std = self._channel_tensor(_as_tuple(std if std is not None else meta.get("std"), "std"))
        if self._std is not None and bool((self._std <= 0).any()):
            raise RobustcapsError("std must be positive")
        if probe and self.input_shape is not None:
            self._probe()

    # ------------------------------------------------------------------ set-up
    def _channel_tensor(self, values: tuple[float, ...] | None) -> torch.Tensor | None:
        if values is None:
            return None
        t = torch.tensor(values, device=self.device, dtype=self.dtype)
        return t.view(1, -1, 1, 1) if t.numel() > 1 else t.view(1)

    def _probe(self) -> None:
        x = torch.zeros((2, *self.input_shape), device=self.device, dtype=self.dtype)
        if self.bounds is not None:
            x = x.clamp(*self.bounds)
        try:
            with torch.no_grad():
                s = self.scores(x)
        except ModelRuntimeError as exc:
            raise ModelLoadError(f"model {self.name!r} failed on a probe batch of shape "
                                 f"{tuple(x.shape)}: {exc.detail}") from exc.__cause__
        except RobustcapsError:
            raise
        except Exception as exc:  # noqa: BLE001 - user model code can raise anything
            raise ModelLoadError(
                f"model {self.name!r} failed on a probe batch of shape {tuple(x.shape)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if s.ndim != 2 or s.shape[0] != 2:
            raise ModelLoadError(
                f"model {self.name!r} returned scores of shape {tuple(s.shape)} for a batch of 2;"
                " expected (N, num_classes)"
            )
        if self.num_classes is None:
            self.num_classes = int(s.shape[1])
        elif s.shape[1] != self.num_classes:
            raise ModelLoadError(
                f"model {self.name!r} returned {s.shape[1]} scores per sample, "
                f"expected num_classes={self.num_classes}"
            )
        if not torch.isfinite(s).all():
            raise ModelLoadError(f"model {self.name!r} returned NaN or Inf scores on a probe batch")

    # ------------------------------------------------------------------ forward
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Input space -> the tensor the wrapped module sees (normalisation only)."""
        if self._mean is not None:
            x = x - self._mean
        if self._std is not None:
            x = x / self._std
        return x

    def _select(self, out: Any) -> torch.Tensor:
        key = self.output_key
        if isinstance(out, Mapping):
            if key is None:
                if "logits" in out:
                    key = "logits"
                else:
                    raise ModelLoadError(
                        f"model {self.name!r} returns a dict with keys {sorted(map(str, out))}: "
                        "choose one with output_key (CLI: --output-key)"
                    )
            if key not in out:
                raise ModelLoadError(
                    f"unknown output key {key!r} for model {self.name!r}; "
                    f"available: {sorted(map(str, out))}"
                )
            return out[key]
        if isinstance(out, (tuple, list)):
            index = 0 if key is None else key
            if not isinstance(index, int) or not -len(out) <= index < len(out):
                raise ModelLoadError(
                    f"unknown output key {key!r} for model {self.name!r}: "
                    f"it returns a {type(out).__name__} of length {len(out)}"
                )
            return out[index]
        if key is not None:
            raise ModelLoadError(f"unknown output key {key!r} for model {self.name!r}: it returns a plain tensor")
        return out

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, *input_shape) -> (N, num_classes) scores (see module docstring)."""
        x = x.to(device=self.device, dtype=self.dtype)
        if self.check_finite and x.requires_grad:
            x.register_hook(self._finite_gradient)
        try:
            out = self._select(self.model(self.preprocess(x)))
        except RobustcapsError:
            raise
        except Exception as exc:  # noqa: BLE001 - user model code can raise anything
            raise ModelRuntimeError(self.name, f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(out, torch.Tensor):
            raise ModelLoadError(f"model {self.name!r} output is {type(out).__name__}, not a tensor")
        if self.outputs == "probabilities":
            out = torch.log(out.clamp_min(torch.finfo(out.dtype).tiny))
        if self.check_finite:
            _require_finite(out, f"model {self.name!r} returned NaN or Inf scores")
        return out

    def _finite_gradient(self, grad: torch.Tensor) -> None:
        _require_finite(grad, f"model {self.name!r} gave NaN or Inf input gradients")

    __call__ = scores

    def activations(self, scores: torch.Tensor) -> torch.Tensor:
        """Class activations in [0, 1]: sigmoid for capsules, softmax otherwise."""
        if self.outputs == "capsule_logits":
            return torch.sigmoid(scores)
        return torch.softmax(scores, dim=1)

    # ------------------------------------------------------------------ losses
    def loss(
        self,
        scores: torch.Tensor,
        y: torch.Tensor,
        targeted: bool = False,
        kind: str | None = None,
    ) -> torch.Tensor:
        """Per-sample (N,) attack loss to ascend. ``y``: true labels, or targets if targeted."""
        kind = kind or self.loss_name
        if kind == "ce":
            value = L.cross_entropy(scores, y)
        elif kind == "spread":
            value = L.spread_loss(self.activations(scores), y, margin=0.9)
        elif kind == "margin":
            value = L.margin_loss(self.activations(scores), y)
        elif kind == "cw":
            # cw_margin(y) grows as y loses; for a target t we want z_t to win instead.
            value = L.cw_margin(scores, y)
            return -value if targeted else value
        else:
            raise RobustcapsError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
        return -value if targeted else value

    def input_gradient(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        targeted: bool = False,
        kind: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradient of the summed attack loss w.r.t. the input.

        Returns ``(loss (N,), grad (N, *input_shape), scores (N, K))``, all detached.
        Samples are independent (eval mode), so each row of ``grad`` is that sample's own
        gradient.
        """
        x = x.detach().to(device=self.device, dtype=self.dtype).requires_grad_(True)
        y = y.to(self.device)
        with torch.enable_grad():
            s = self.scores(x)
            value = self.loss(s, y, targeted=targeted, kind=kind)
            (grad,) = torch.autograd.grad(value.sum(), x)
        return value.detach(), grad.detach(), s.detach()

    # ------------------------------------------------------------------ helpers
    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """(N, ...) -> (N,) predicted labels on ``self.device``, batched if asked."""
        if batch_size is None or x.shape[0] <= batch_size:
            return self.scores(x).argmax(dim=1)
        return torch.cat([self.scores(c).argmax(dim=1) for c in x.split(batch_size)])

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """Clamp to the declared bounds (no-op without bounds)."""
        return x if self.bounds is None else x.clamp(*self.bounds)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ModelAdapter:
        """A copy of this adapter on another device and/or dtype (the module is deep-copied)."""
        new = copy.copy(self)
        new.device = resolve_device(device) if device is not None else self.device
        new.dtype = dtype or self.dtype
        new.model = copy.deepcopy(self.model).to(device=new.device, dtype=new.dtype).eval()
        new._mean = None if self._mean is None else self._mean.to(new.device, new.dtype)
        new._std = None if self._std is None else self._std.to(new.device, new.dtype)
        return new

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description for manifests."""
        return {
            "name": self.name,
            "module": type(self.model).__name__,
            "params": self.num_params(),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "bounds": list(self.bounds) if self.bounds else None,
            "outputs": self.outputs,
            "loss": self.loss_name,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    def __repr__(self) -> str:
        return (
            f"ModelAdapter(name={self.name!r}, num_classes={self.num_classes}, "
            f"input_shape={self.input_shape}, bounds={self.bounds}, outputs={self.outputs!r}, "
            f"loss={self.loss_name!r}, device={self.device})"
        )


def _require_finite(t: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(t.detach()).flatten(1).all(dim=1) if t.ndim > 1 else ~torch.isfinite(t)
    if bool(bad.any()):
        raise NonFiniteError(f"{what} for {int(bad.sum())} of {bad.numel()} inputs")


def adapt(model: nn.Module | ModelAdapter, **options: Any) -> ModelAdapter:
    """Wrap ``model`` in a :class:`ModelAdapter` (an adapter is returned unchanged)."""
    if isinstance(model, ModelAdapter):
        if options:
            raise RobustcapsError("adapt(): options cannot be applied to an existing ModelAdapter")
        return model
    return ModelAdapter(model, **options)
