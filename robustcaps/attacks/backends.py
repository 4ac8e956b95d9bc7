"""torchattacks and foolbox backends behind the same :class:`~robustcaps.attacks.base.Attack`.

Both libraries are called once per epsilon (that is their API) on exactly the inputs and
with exactly the loss the native engine uses, so the three backends can be cross-checked:

**torchattacks** (3.5) assumes inputs in [0, 1]: ``FGSM``/``BIM`` clamp to that box and use
``nn.CrossEntropyLoss`` on the model output. We therefore attack in a unit box: the
adapter is wrapped as an ``nn.Module`` ``u -> adapter.scores(lo + s * u)`` with ``(lo, hi)``
the declared bounds, or, for unbounded inputs (per-image standardised images), a box
``[min(x) - max(eps) - 1, max(x) + max(eps) + 1]`` that the attack can never reach, so the
clamp never binds; ``s = hi - lo``, ``eps_u = eps / s`` and ``alpha_u = alpha / s``. The
perturbation found in u-space is mapped back as ``x + s * (u_adv - u)`` (clipped to the
eps-ball against rounding), so ``eps = 0`` returns ``x`` bit for bit. With the default
``ce`` loss torchattacks' own, unmodified ``forward`` runs (its mean-reduced CE has the
same gradient sign as our summed CE); for other losses a subclass replays its update
rule with the adapter's loss.

**foolbox** (3.3) takes arbitrary bounds: ``fb.PyTorchModel(module, bounds)`` with the
declared bounds or the same never-binding box as above. Attacks: ``LinfFastGradientAttack``
(FGSM; targeted FGSM, which that class rejects, runs its parent's identical code through
``LinfBasicIterativeAttack(steps=1, abs_stepsize=eps)``) and ``LinfBasicIterativeAttack`` with ``abs_stepsize`` = the native step size
and ``random_start=False``; criteria ``Misclassification`` / ``TargetedMisclassification``.
Non-CE losses override ``get_loss_fn``, the hook foolbox provides for that.

Neither library stops early: compare with the native engine run with ``early_stop=False``
for identical algorithms (the default native BIM only adds successes).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import RobustcapsError
from ..models.adapter import ModelAdapter
from .base import Attack, AttackResult
from .native import (
    BIM_DEFAULT_STEPS,
    _result,
    bim_step_size,
    check_bim_settings,
    check_epsilons,
    check_inputs,
    check_targets,
    project,
)
from .registry import register_attack


class AdapterModule(nn.Module):
    """An adapter as an ``nn.Module``: ``forward(x (N, *input_shape)) -> (N, K) scores``.

    ``offset``/``scale`` reparametrise the input as ``x = offset + scale * u`` (torchattacks'
    unit box); the defaults (0, 1) give the adapter's input space unchanged.
    """

    def __init__(self, adapter: ModelAdapter, offset: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        self.adapter = adapter
        self.inner = adapter.model  # registered so .parameters() reports the device
        self.offset = float(offset)
        self.scale = float(scale)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x = u if (self.offset == 0.0 and self.scale == 1.0) else self.offset + self.scale * u
        return self.adapter.scores(x)


def attack_box(adapter: ModelAdapter, x: torch.Tensor, eps: np.ndarray) -> tuple[float, float]:
    """Declared bounds, or a box the attack can never leave for unbounded inputs."""
    if adapter.bounds is not None:
        return adapter.bounds
    margin = float(eps.max()) + 1.0
    return float(x.min()) - margin, float(x.max()) + margin


class _LibraryAttack(Attack):
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
        eps = check_epsilons(epsilons)
        check_inputs(adapter, x, y)
        check_targets(adapter, y, targets)
        t0 = time.perf_counter()
        targeted = targets is not None
        labels = targets if targeted else y
        dev = adapter.device
        x = x.to(device=dev, dtype=adapter.dtype)
        labels_d = labels.to(dev)
        with torch.no_grad():
            clean_pred = adapter.scores(x).argmax(dim=1)
        xs: list[torch.Tensor] = []
        adv_pred = torch.empty(len(eps), x.shape[0], dtype=torch.long, device=dev)
        bs = self.batch_size or max(1, x.shape[0])
        for e, epsilon in enumerate(eps):
            if epsilon == 0.0:
                xs.append(x)
                adv_pred[e] = clean_pred
                continue
            chunks = [self._attack(adapter, x[i:i + bs], labels_d[i:i + bs], float(epsilon), eps,
                                   targeted) for i in range(0, x.shape[0], bs)]
            xa = project(torch.cat(chunks), x, float(epsilon), adapter.bounds)
            with torch.no_grad():
                adv_pred[e] = adapter.scores(xa).argmax(dim=1)
            xs.append(xa)
        info = {**self.params(), "seconds": time.perf_counter() - t0}
        return _result(self.name, self.backend, targeted, eps, x, y, targets, clean_pred,
                       adv_pred, xs, return_adv, info, labels)

    def _attack(self, adapter, x, labels, epsilon, eps, targeted) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


# --------------------------------------------------------------------------- torchattacks
def _torchattacks():
    try:
        import torchattacks
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise RobustcapsError("the torchattacks backend needs the torchattacks package") from exc
    return torchattacks


def _ta_classes():
    ta = _torchattacks()

    class LossFGSM(ta.FGSM):
        """torchattacks FGSM with the adapter's loss (same update rule as ``ta.FGSM``)."""

        def __init__(self, model, eps, loss_fn):
            super().__init__(model, eps=eps)
            self.loss_fn = loss_fn

        def forward(self, images, labels):
            if self.loss_fn is None:
                return super().forward(images, labels)
            images = images.clone().detach().to(self.device)
            labels = labels.clone().detach().to(self.device)
            images.requires_grad = True
            cost = self.loss_fn(self.get_logits(images), labels, self.targeted)
            grad = torch.autograd.grad(cost, images)[0]
            return torch.clamp(images + self.eps * grad.sign(), min=0, max=1).detach()

    class LossBIM(ta.BIM):
        """torchattacks BIM with the adapter's loss (same update rule as ``ta.BIM``)."""

        def __init__(self, model, eps, alpha, steps, loss_fn):
            super().__init__(model, eps=eps, alpha=alpha, steps=steps)
            self.loss_fn = loss_fn

        def forward(self, images, labels):
            if self.loss_fn is None:
                return super().forward(images, labels)
            images = images.clone().detach().to(self.device)
            labels = labels.clone().detach().to(self.device)
            ori = images.clone().detach()
            for _ in range(self.steps):
                images.requires_grad = True
                cost = self.loss_fn(self.get_logits(images), labels, self.targeted)
                grad = torch.autograd.grad(cost, images)[0]
                adv = images + self.alpha * grad.sign()
                adv = torch.max(torch.min(adv, ori + self.eps), torch.clamp(ori - self.eps, min=0))
                images = torch.clamp(adv, max=1).detach()
            return images

    return LossFGSM, LossBIM


class _TorchattacksAttack(_LibraryAttack):
    backend = "torchattacks"

    def _loss_fn(self, adapter: ModelAdapter):
        kind = self.loss or adapter.loss_name
        if kind == "ce":
            return None  # torchattacks' own CE

        def loss_fn(scores, labels, targeted):
            return adapter.loss(scores, labels, targeted=targeted, kind=kind).sum()

        return loss_fn

    def _attack(self, adapter, x, labels, epsilon, eps, targeted) -> torch.Tensor:
        lo, hi = attack_box(adapter, x, eps)
        scale = hi - lo
        # eval() matters: torchattacks restores the wrapper's training flag after the attack,
        # and a fresh nn.Module is in training mode (it would switch dropout on).
        module = AdapterModule(adapter, offset=lo, scale=scale).eval()
        u = ((x - lo) / scale).clamp(0.0, 1.0)
        atk = self._make(module, epsilon / scale, self._loss_fn(adapter), epsilon)
        if targeted:
            atk.set_mode_targeted_by_label(quiet=True)
        try:
            u_adv = atk(u, labels)
        finally:
            adapter.model.eval()
        # Map the u-space perturbation back; eps = 0 gives x exactly.
        return x + (u_adv - u) * scale

    def _make(self, module, eps_u, loss_fn, epsilon):  # pragma: no cover
        raise NotImplementedError


@register_attack("fgsm", backend="torchattacks")
class TorchattacksFGSM(_TorchattacksAttack):
    """``torchattacks.FGSM`` called once per epsilon."""

    name = "fgsm"

    def _make(self, module, eps_u, loss_fn, epsilon):
        return _ta_classes()[0](module, eps=eps_u, loss_fn=loss_fn)


@register_attack("bim", backend="torchattacks")
class TorchattacksBIM(_TorchattacksAttack):
    """``torchattacks.BIM`` (all steps, no early stop) called once per epsilon."""

    name = "bim"

    def __init__(self, *, steps: int = BIM_DEFAULT_STEPS, step_size: float | None = None,
                 loss: str | None = None, batch_size: int | None = None) -> None:
        super().__init__(loss=loss, batch_size=batch_size)
        self.steps, self.step_size = check_bim_settings(steps, step_size)

    def params(self) -> dict[str, Any]:
        return {"loss": self.loss, "steps": self.steps, "step_size": self.step_size,
                "early_stop": False}

    def _make(self, module, eps_u, loss_fn, epsilon):
        scale = module.scale
        alpha_u = bim_step_size(epsilon, self.steps, self.step_size) / scale
        return _ta_classes()[1](module, eps=eps_u, alpha=alpha_u, steps=self.steps, loss_fn=loss_fn)


# --------------------------------------------------------------------------- foolbox
def _foolbox():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import foolbox
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise RobustcapsError("the foolbox backend needs the foolbox package") from exc
    return foolbox


def _with_adapter_loss(cls, adapter: ModelAdapter, kind: str):
    """Subclass a foolbox gradient attack so it differentiates the adapter's loss."""
    import eagerpy as ep

    class WithLoss(cls):
        def get_loss_fn(self, model, labels):
            def loss_fn(inputs):
                scores = model(inputs).raw
                # foolbox descends this for targeted attacks (sign -1), ascends otherwise.
                return ep.astensor(adapter.loss(scores, labels.raw, targeted=False, kind=kind).sum())

            return loss_fn

    return WithLoss


class _FoolboxAttack(_LibraryAttack):
    backend = "foolbox"

    def _attack(self, adapter, x, labels, epsilon, eps, targeted) -> torch.Tensor:
        fb = _foolbox()
        bounds = attack_box(adapter, x, eps)
        fmodel = fb.PyTorchModel(AdapterModule(adapter).eval(), bounds=bounds,
                                 device=adapter.device)
        kind = self.loss or adapter.loss_name
        cls = self._cls(fb, targeted)
        if kind != "ce":
            cls = _with_adapter_loss(cls, adapter, kind)
        attack = self._make(cls, epsilon, targeted)
        criterion = (fb.criteria.TargetedMisclassification(labels) if targeted
                     else fb.criteria.Misclassification(labels))
        _, clipped, _ = attack(fmodel, x, criterion, epsilons=[epsilon])
        return clipped[0]

    def _cls(self, fb, targeted):  # pragma: no cover
        raise NotImplementedError

    def _make(self, cls, epsilon, targeted):  # pragma: no cover
        raise NotImplementedError


@register_attack("fgsm", backend="foolbox")
class FoolboxFGSM(_FoolboxAttack):
    """``foolbox.attacks.LinfFastGradientAttack`` called once per epsilon."""

    name = "fgsm"

    def _cls(self, fb, targeted):
        # foolbox 3.3's FGSM class rejects targeted criteria; its parent
        # LinfBaseGradientDescent.run is the same code with steps=1 and step eps, so the
        # targeted case uses LinfBasicIterativeAttack configured exactly like that.
        return fb.attacks.LinfBasicIterativeAttack if targeted else fb.attacks.LinfFastGradientAttack

    def _make(self, cls, epsilon, targeted):
        if targeted:
            return cls(abs_stepsize=epsilon, steps=1, random_start=False)
        return cls()


@register_attack("bim", backend="foolbox")
class FoolboxBIM(_FoolboxAttack):
    """``foolbox.attacks.LinfBasicIterativeAttack`` (no random start) once per epsilon."""

    name = "bim"

    def __init__(self, *, steps: int = BIM_DEFAULT_STEPS, step_size: float | None = None,
                 loss: str | None = None, batch_size: int | None = None) -> None:
        super().__init__(loss=loss, batch_size=batch_size)
        self.steps, self.step_size = check_bim_settings(steps, step_size)

    def params(self) -> dict[str, Any]:
        return {"loss": self.loss, "steps": self.steps, "step_size": self.step_size,
                "early_stop": False}

    def _cls(self, fb, targeted):
        return fb.attacks.LinfBasicIterativeAttack

    def _make(self, cls, epsilon, targeted):
        alpha = bim_step_size(epsilon, self.steps, self.step_size)
        return cls(abs_stepsize=alpha, steps=self.steps, random_start=False)


class TorchattacksPGD(_TorchattacksAttack):
    """``torchattacks.PGD`` (L-inf) or ``PGDL2`` with a random start, once per epsilon; step
    ``alpha`` as native PGD (default ``2.5 * eps / steps``). CE only: torchattacks' loss."""

    name = "pgd"

    def __init__(self, *, norm: str = "linf", steps: int = 50, step_size: float | None = None,
                 batch_size: int | None = None) -> None:
        from .sweep import check_norm

        super().__init__(batch_size=batch_size)
        self.norm = check_norm(norm)
        self.steps, self.step_size = check_bim_settings(steps, step_size)

    def params(self) -> dict[str, Any]:
        return {"loss": "ce", "norm": self.norm, "steps": self.steps, "step_size": self.step_size}

    def _attack(self, adapter, x, labels, epsilon, eps, targeted) -> torch.Tensor:
        return super()._attack(adapter, x, labels, epsilon, eps, targeted).detach()

    def _make(self, module, eps_u, loss_fn, epsilon):
        alpha = self.step_size if self.step_size is not None else 2.5 * epsilon / self.steps
        cls = _torchattacks().PGD if self.norm == "linf" else _torchattacks().PGDL2
        return cls(module, eps=eps_u, alpha=alpha / module.scale, steps=self.steps,
                   random_start=True)


class _TorchattacksAPGDBase(_TorchattacksAttack):
    """Shared settings of the torchattacks APGD wrappers (untargeted only: torchattacks'
    APGD ignores the targeted mode, and its APGDT is untargeted by success criterion)."""

    def __init__(self, *, norm: str = "linf", steps: int = 100, restarts: int = 1,
                 rho: float = 0.75, seed: int = 0, batch_size: int | None = None) -> None:
        from .sweep import check_norm, check_positive_int

        super().__init__(batch_size=batch_size)
        self.norm = check_norm(norm)
        self.steps = check_positive_int("steps", steps)
        self.restarts = check_positive_int("restarts", restarts)
        self.rho, self.seed = float(rho), int(seed)

    def params(self) -> dict[str, Any]:
        return {"loss": self.loss, "norm": self.norm, "steps": self.steps,
                "restarts": self.restarts, "rho": self.rho, "seed": self.seed}

    def run(self, adapter, x, y, epsilons, targets=None, *, return_adv=False) -> AttackResult:
        if targets is not None:
            raise RobustcapsError(f"torchattacks {self.name} is untargeted: give no targets")
        self._check_classes(adapter.num_classes or 0)
        # torchattacks seeds torch's global generator: keep the caller's stream intact.
        with torch.random.fork_rng(devices=[]):
            return super().run(adapter, x, y, epsilons, return_adv=return_adv)

    def _attack(self, adapter, x, labels, epsilon, eps, targeted) -> torch.Tensor:
        # torchattacks' APGD returns tensors still attached to its autograd graph
        return super()._attack(adapter, x, labels, epsilon, eps, targeted).detach()

    def _check_classes(self, k: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def _ta_norm(self) -> str:
        return "Linf" if self.norm == "linf" else "L2"


class TorchattacksAPGD(_TorchattacksAPGDBase):
    """``torchattacks.APGD`` (loss ``ce`` or ``dlr``) called once per epsilon."""

    name = "apgd"

    def __init__(self, *, loss: str = "ce", **settings: Any) -> None:
        super().__init__(**settings)
        if loss not in ("ce", "dlr"):
            raise RobustcapsError(f"torchattacks APGD loss must be ce or dlr, got {loss!r}")
        self.loss = loss

    def _check_classes(self, k: int) -> None:
        if self.loss == "dlr" and k < 3:
            raise RobustcapsError(f"torchattacks APGD-DLR needs >= 3 classes, the model has {k}")

    def _make(self, module, eps_u, loss_fn, epsilon):
        return _torchattacks().APGD(module, norm=self._ta_norm(), eps=eps_u, steps=self.steps,
                                    n_restarts=self.restarts, seed=self.seed, loss=self.loss,
                                    rho=self.rho)


class TorchattacksAPGDT(_TorchattacksAPGDBase):
    """``torchattacks.APGDT`` over ``min(9, K - 1)`` (or ``n_target_classes``) top wrong
    classes, called once per epsilon. torchattacks tries ``n_classes - 1`` targets, so it
    is given ``n_classes = targets + 1``; it needs K >= 4 (the targeted DLR)."""

    name = "apgd-t"

    def __init__(self, *, n_target_classes: int | None = None, **settings: Any) -> None:
        super().__init__(**settings)
        self.loss = "dlr"
        self.n_target_classes = n_target_classes

    def params(self) -> dict[str, Any]:
        return {**super().params(), "n_target_classes": self.n_target_classes}

    def _check_classes(self, k: int) -> None:
        if k < 4:
            raise RobustcapsError(f"torchattacks APGD-T needs >= 4 classes, the model has {k}")

    def _make(self, module, eps_u, loss_fn, epsilon):
        k = module.adapter.num_classes
        n = min(9, k - 1) if self.n_target_classes is None else min(self.n_target_classes, k - 1)
        return _torchattacks().APGDT(module, norm=self._ta_norm(), eps=eps_u, steps=self.steps,
                                     n_restarts=self.restarts, seed=self.seed, rho=self.rho,
                                     n_classes=n + 1)
