"""The training engine behind ``robustcaps train`` (and the zoo's checkpoints).

``train(model_name, dataset=..., epochs=..., out=...)`` trains a registered architecture the
way Section 5 of Hinton et al. (2018) describes and writes a zoo entry into ``out``:

- Adam; the learning rate decays exponentially, ``lr_t = lr * lr_decay ** (t / steps_per_epoch)``
  (``lr_decay`` is the factor per epoch, default 0.9, a choice of ours: the paper gives none).
- Capsule networks: spread loss on the class activations ``sigmoid(logits)`` with the margin
  growing linearly from 0.2 to 0.9 over all optimisation steps of the run
  (:func:`robustcaps.models.losses.spread_margin`). Other models: cross-entropy (the CNN has
  dropout). ``loss=`` overrides the choice.
- The paper's augmentation (:func:`robustcaps.data.transforms.train_augment`: random 32x32
  crop of the 48x48 image, random brightness and contrast) when the training images are larger
  than the model's input; test-time centre crop, and multi-crop (average of class activations
  over the five crops) for the final test error.
- Evaluation on the test split after each epoch (and every ``eval_every_steps`` steps), on a
  validation split held out from the *training* data (``val_instances`` for NORB-format data,
  ``val_fraction`` otherwise) when asked; ``stop_at_error``/``stop_on`` stop the run once the
  error on that split is at most the target (the matched-accuracy protocol of Table 2; stop on
  ``val`` to keep the test split out of every decision).

Exact resumption. Everything random is a function of ``(seed, epoch, step)`` or lives in the
checkpoint: the data order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)``; the augmentation of step ``t`` uses a generator seeded with ``(seed, t)``;
dropout uses the global torch RNG, saved (with the NumPy and Python RNGs) in each checkpoint
together with the model, the optimizer, the position in the epoch and the running metrics.
So a run stopped after any checkpoint and resumed gives, on the same device and thread count,
bit-identical weights to an uninterrupted run.

Files written into ``out``::

    weights.pt            final state dict (torch.load(weights_only=True))
    card.json, card.md    the model card (see robustcaps.models.zoo)
    metrics.csv           one row per evaluation (epoch/step, train loss/acc, lr, margin, errors)
    checkpoints/last.pt   full training state, replaced atomically; never written with a
                          non-finite model, so a diverging run keeps its last good state
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import platform
import random
import shlex
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import DataError, RobustcapsError
from .models import losses as L
from .utils import resolve_device, seed_everything, sha256_file, tensor_fingerprint

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "robustcaps-train-checkpoint/1"
LOSSES = ("auto", "spread", "margin", "ce")
AUGMENTS = ("auto", "paper", "none")
STOP_SPLITS = ("test", "val")
CROP = 32  # the paper's input crop for 48x48 NORB images

# Config fields that may change between a run and its resumption without changing the result.
_RESUME_FREE = {"resume", "overwrite", "time_limit", "stop_after_steps", "progress", "device",
                "description", "name", "checkpoint_every"}


class TrainingDiverged(RobustcapsError):
    """The loss (or the weights) became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in checkpoints and on the card)."""

    model: str
    dataset: str = "synthnorb"
    test_dataset: str | None = None  # another dataset for the test split (default: ``dataset``)
    out: str | None = None
    epochs: int = 10
    seed: int = 0
    batch_size: int = 32
    lr: float | None = None  # None: 3e-3 for capsule networks, 1e-3 otherwise
    lr_decay: float = 0.9  # multiplicative factor per epoch (applied continuously per step)
    weight_decay: float = 0.0
    loss: str = "auto"
    margin_start: float = 0.2
    margin_end: float = 0.9
    augment: str = "auto"
    grad_clip: float | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    data_seed: int = 0
    train_split: str = "train"
    test_split: str = "test"
    stereo: bool = True
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    steps_per_epoch: int | None = None
    val_instances: tuple[int, ...] = ()
    val_fraction: float | None = None
    stop_at_error: float | None = None
    stop_on: str = "test"
    eval_every_steps: int | None = None
    eval_samples: int | None = None  # evaluations during training on this many test/val images
    multi_crop: bool = True
    checkpoint_every: int | None = None
    time_limit: float | None = None
    stop_after_steps: int | None = None
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    progress: bool = True
    name: str | None = None
    description: str | None = None

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise RobustcapsError(msg)

        if self.epochs < 1:
            bad(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            bad(f"batch size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            bad(f"learning rate must be > 0, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            bad(f"lr decay (factor per epoch) must be in (0, 1], got {self.lr_decay}")
        if self.weight_decay < 0:
            bad(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.loss not in LOSSES:
            bad(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.augment not in AUGMENTS:
            bad(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if not 0 <= self.margin_start <= self.margin_end:
            bad(f"spread margins must satisfy 0 <= start <= end, got {self.margin_start}, {self.margin_end}")
        for key in ("max_train_samples", "max_test_samples", "steps_per_epoch", "eval_every_steps",
                    "eval_samples", "checkpoint_every", "stop_after_steps"):
            v = getattr(self, key)
            if v is not None and v < 1:
                bad(f"{key.replace('_', '-')} must be >= 1, got {v}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            bad(f"grad clip must be > 0, got {self.grad_clip}")
        if self.time_limit is not None and not self.time_limit > 0:
            bad(f"time limit must be > 0 seconds, got {self.time_limit}")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            bad(f"val fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_fraction is not None and self.val_instances:
            bad("give either val instances or a val fraction, not both")
        if self.stop_on not in STOP_SPLITS:
            bad(f"--on must be one of {', '.join(STOP_SPLITS)}, got {self.stop_on!r}")
        if self.stop_at_error is not None and not 0 <= self.stop_at_error <= 1:
            bad(f"stop-at-error is an error rate in [0, 1], got {self.stop_at_error}")
        if self.stop_on == "val" and self.stop_at_error is not None and not self.has_val:
            bad("--on val needs a validation split: give --val-instances or --val-fraction")
        if self.out is None:
            bad("an output folder is required (--out)")

    @property
    def has_val(self) -> bool:
        return bool(self.val_instances) or self.val_fraction is not None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["val_instances"] = list(self.val_instances)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["val_instances"] = tuple(d.get("val_instances", ()))
        return cls(**d)

    def command_line(self) -> str:
        """An equivalent ``robustcaps train`` command (recorded on the model card)."""
        args = ["robustcaps", "train", "--model", self.model, "--dataset", self.dataset]
        default = TrainConfig(model=self.model)
        flags = {
            "epochs": "--epochs", "seed": "--seed", "batch_size": "--batch-size", "lr": "--lr",
            "lr_decay": "--lr-decay", "weight_decay": "--weight-decay", "loss": "--loss",
            "margin_start": "--margin-start", "margin_end": "--margin-end", "augment": "--augment",
            "grad_clip": "--grad-clip", "test_dataset": "--test-dataset", "data_dir": "--data-dir",
            "data_seed": "--data-seed",
            "train_split": "--train-split", "test_split": "--test-split",
            "max_train_samples": "--max-train-samples", "max_test_samples": "--max-test-samples",
            "steps_per_epoch": "--steps-per-epoch", "val_fraction": "--val-fraction",
            "stop_at_error": "--stop-at-error", "eval_every_steps": "--eval-every-steps",
            "eval_samples": "--eval-samples",
            "checkpoint_every": "--checkpoint-every",
        }
        for key, flag in flags.items():
            v = getattr(self, key)
            if v != getattr(default, key) or key in ("epochs", "seed", "batch_size"):
                args += [flag, str(v)]
        if not self.stereo:
            args.append("--mono")
        if not self.multi_crop:
            args.append("--no-multi-crop")
        if self.val_instances:
            args += ["--val-instances", ",".join(map(str, self.val_instances))]
        if self.stop_at_error is not None:
            args += ["--on", self.stop_on]
        for k, v in sorted(self.arch_kwargs.items()):
            args += ["--arch-kw", f"{k}={json.dumps(v)}"]
        args += ["--out", str(self.out)]
        return shlex.join(args)


# --------------------------------------------------------------------------------- data


@dataclass
class Split:
    """An in-memory split: x float32 (N, C, H, W) (48x48 for NORB), y int64 (N,)."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    fingerprint: str


@dataclass
class TrainData:
    train: Split
    test: Split
    val: Split | None
    num_classes: int
    class_names: list[str]
    bounds: tuple[float, float] | None
    dataset: str


def _fingerprint(ds: Any, x: torch.Tensor, y: torch.Tensor) -> str:
    fp = getattr(ds, "fingerprint", None)
    return fp if isinstance(fp, str) and fp else tensor_fingerprint(x, y)


def _subset(split: Split, idx: torch.Tensor, name: str) -> Split:
    x, y = split.x[idx], split.y[idx]
    return Split(name, x, y, tensor_fingerprint(x, y))


def _split_val(train: Split, meta: dict[str, Any], cfg: TrainConfig) -> tuple[Split, Split | None]:
    """Hold out part of the training data for validation (never touches the test split)."""
    n = len(train.y)
    if cfg.val_instances:
        inst = meta.get("instance") if meta else None
        if inst is None:
            raise DataError(f"dataset {cfg.dataset!r} has no instance metadata; use --val-fraction")
        inst = np.asarray(inst)
        present = set(np.unique(inst).tolist())
        missing = sorted(set(cfg.val_instances) - present)
        if missing:
            raise DataError(f"val instances {missing} are not in the training split "
                            f"(its instances: {sorted(present)})")
        is_val = torch.from_numpy(np.isin(inst, list(cfg.val_instances)))
    elif cfg.val_fraction is not None:
        # Class-stratified random hold-out, fixed by the data seed (not the training seed).
        rng = np.random.default_rng(np.random.SeedSequence([cfg.data_seed, 7919]))
        y = train.y.numpy()
        is_val_np = np.zeros(n, dtype=bool)
        for c in np.unique(y):
            members = np.flatnonzero(y == c)
            k = int(round(cfg.val_fraction * len(members)))
            is_val_np[rng.choice(members, size=k, replace=False)] = True
        is_val = torch.from_numpy(is_val_np)
    else:
        return train, None
    if bool(is_val.all()) or not bool(is_val.any()):
        raise DataError("the validation hold-out leaves no training (or no validation) samples")
    tr = _subset(train, torch.nonzero(~is_val).squeeze(1), train.name)
    va = _subset(train, torch.nonzero(is_val).squeeze(1), f"{train.name}[val]")
    return tr, va


def load_train_data(cfg: TrainConfig, train_ds: Any = None, test_ds: Any = None) -> TrainData:
    """Load the training and test splits uncropped (48x48 for NORB), plus the validation hold-out.

    The test split comes from ``cfg.test_dataset`` when set (e.g. a second ``npz:`` file), else
    from ``cfg.dataset``. ``train_ds``/``test_ds``: already loaded datasets (anything with ``x``, ``y``,
    ``num_classes`` and optionally ``meta``, ``fingerprint``, ``bounds``, ``class_names``).
    """
    if train_ds is None or test_ds is None:
        from .data import load_dataset

        common = dict(data_dir=cfg.data_dir, seed=cfg.data_seed, stereo=cfg.stereo, crop="none",
                      progress=cfg.progress)
        if train_ds is None:
            train_ds = load_dataset(cfg.dataset, cfg.train_split, n_samples=cfg.max_train_samples,
                                    **common)
        if test_ds is None:
            test_ds = load_dataset(cfg.test_dataset or cfg.dataset, cfg.test_split,
                                   n_samples=cfg.max_test_samples, **common)
    else:  # in-memory datasets: apply the sample limits here (first rows of a fixed permutation)
        train_ds = _limit(train_ds, cfg.max_train_samples, cfg.data_seed)
        test_ds = _limit(test_ds, cfg.max_test_samples, cfg.data_seed)
    splits = []
    for ds, name in ((train_ds, cfg.train_split), (test_ds, cfg.test_split)):
        x, y = ds.x, ds.y
        if x.dim() != 4 or y.dim() != 1 or len(x) != len(y) or len(y) == 0:
            raise DataError(f"split {name!r}: expected x (N, C, H, W) and y (N,), got "
                            f"{tuple(x.shape)} and {tuple(y.shape)}")
        splits.append(Split(name, x.float().contiguous(), y.long(), _fingerprint(ds, x, y)))
    train, test = splits
    if train.fingerprint == test.fingerprint:
        warnings.warn(f"the test split of {cfg.dataset!r} is the training data itself: its test "
                      "error says nothing about generalisation (give --test-dataset)", stacklevel=3)
    if train.x.shape[1:] != test.x.shape[1:]:
        raise DataError(f"train images {tuple(train.x.shape[1:])} and test images "
                        f"{tuple(test.x.shape[1:])} differ in shape")
    train, val = _split_val(train, dict(getattr(train_ds, "meta", {}) or {}), cfg)
    k = int(getattr(train_ds, "num_classes", 0) or int(train_ds.y.max()) + 1)
    names = list(getattr(train_ds, "class_names", []) or [str(i) for i in range(k)])
    bounds = getattr(train_ds, "bounds", None)
    return TrainData(train, test, val, k, names, tuple(bounds) if bounds else None,
                     str(getattr(train_ds, "name", cfg.dataset)))


def _limit(ds: Any, n: int | None, seed: int) -> Any:
    if n is None or n >= len(ds.y):
        return ds
    idx = torch.from_numpy(np.random.default_rng(seed).permutation(len(ds.y))[:n])
    return _View(ds, idx)


class _View:
    """Rows ``idx`` of an in-memory dataset."""

    def __init__(self, ds: Any, idx: torch.Tensor) -> None:
        self.x, self.y = ds.x[idx], ds.y[idx]
        self.meta = {k: np.asarray(v)[idx.numpy()] for k, v in (getattr(ds, "meta", {}) or {}).items()}
        for attr in ("num_classes", "class_names", "bounds", "name"):
            setattr(self, attr, getattr(ds, attr, None))
        self.fingerprint = tensor_fingerprint(self.x, self.y)


# ------------------------------------------------------------------------------ helpers


def _derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (independent streams for data order, augmentation...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_derived_seed(seed, 1, epoch))
    return torch.randperm(n, generator=g)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global RNG is what code may use
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))  # noqa: NPY002
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.state_dict().values()
               if torch.is_floating_point(p))


def hardware_description(device: torch.device) -> str:
    """E.g. 'cpu: Intel(R) Xeon(R) ... (2 cores, 2 torch threads)' or 'cuda: NVIDIA H100'."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


class _Evaluator:
    """Error rates of a model on uncropped splits (centre crop / multi-crop when larger)."""

    def __init__(self, model: nn.Module, outputs: str, input_hw: tuple[int, int],
                 batch_size: int, device: torch.device, progress: bool) -> None:
        self.model, self.outputs, self.input_hw = model, outputs, input_hw
        self.batch_size, self.device, self.progress = batch_size, device, progress

    def _activation(self, scores: torch.Tensor) -> torch.Tensor:
        # The paper averages class activations: sigmoid of capsule logits, softmax otherwise.
        return torch.sigmoid(scores) if self.outputs == "capsule_logits" else scores.softmax(dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, multi: bool = False) -> torch.Tensor:
        """x: (N, C, H, W) -> (N,) predicted classes (H, W >= the model's input size)."""
        from tqdm.auto import tqdm

        from .data.transforms import center_crop, multi_crop_scores

        was_training = self.model.training
        self.model.eval()
        size = self.input_hw[0]
        crop = tuple(x.shape[-2:]) != self.input_hw
        preds = []
        bs = max(1, self.batch_size * (2 if not multi else 1))
        try:
            for i in tqdm(range(0, len(x), bs), desc="multi-crop eval" if multi else "eval",
                          leave=False, disable=not self.progress, unit="batch"):
                xb = x[i:i + bs].to(self.device)
                if multi and crop:
                    s = multi_crop_scores(self.model, xb, size=size, activation=self._activation)
                else:
                    s = self.model(center_crop(xb, size) if crop else xb)
                preds.append(s.argmax(dim=1).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(preds)

    def error(self, split: Split, multi: bool = False) -> float:
        """Error rate (wrong / N, exact) on a split."""
        return int((self.predict(split.x, multi) != split.y).sum()) / len(split.y)


# -------------------------------------------------------------------------------- train


def train(
    model_name: str,
    dataset: str = "synthnorb",
    epochs: int = 10,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    resume: bool = False,
    *,
    train_data: Any = None,
    test_data: Any = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train ``model_name`` (a registered architecture) and write a zoo entry into ``out``.

    Args:
        model_name: e.g. ``capsnet-small``, ``capsnet``, ``cnn``.
        dataset: a :func:`robustcaps.data.load_dataset` name (``synthnorb``, ``smallnorb``,
            ``mnist``, ``npz:PATH``); ignored when ``train_data``/``test_data`` are given.
        epochs, out, seed, resume: see :class:`TrainConfig`; ``options`` are its other fields
            (e.g. ``test_dataset="npz:test.npz"``, ``val_instances=(4,)``, ``stop_at_error``).
        train_data, test_data: already loaded splits (x (N, C, H, W), y (N,), ...).
        callback: called with each metrics row (a dict) after it is recorded.

    Returns:
        ``{"status": "finished" | "stopped" | "paused", "card": {...} | None, "history": [...],
        "paths": {...}, "global_step": int, "epoch": int}``. ``paused`` means a time or step
        limit was reached: a checkpoint was written and ``resume=True`` continues.

    Raises:
        TrainingDiverged: a non-finite loss or weights (the last good checkpoint is kept).
        RobustcapsError: bad options, an existing run without ``resume``/``overwrite``, or a
            resume with a configuration that differs in anything that changes the result.
    """
    options.setdefault("arch_kwargs", {})
    options["val_instances"] = tuple(options.get("val_instances") or ())
    cfg = TrainConfig(model=model_name, dataset=dataset, epochs=epochs,
                      out=str(out) if out is not None else None, seed=seed, resume=resume, **options)
    cfg.validate()
    return Trainer(cfg, train_data, test_data, callback).run()


class Trainer:
    """One training run (see :func:`train`)."""

    def __init__(self, cfg: TrainConfig, train_ds: Any = None, test_ds: Any = None,
                 callback: Callable[[dict[str, Any]], None] | None = None) -> None:
        from .models.registry import architectures

        self.cfg = cfg
        self.out = Path(cfg.out)  # type: ignore[arg-type]
        self.ckpt_path = self.out / "checkpoints" / "last.pt"
        self._stale: list[Path] = []
        self.callback = callback
        arch = architectures().get(cfg.model)
        if arch is None:
            raise RobustcapsError(f"unknown architecture {cfg.model!r}; known: "
                                  f"{', '.join(sorted(architectures()))}")
        self.outputs = arch.outputs
        self.device = resolve_device(cfg.device)
        self._in_memory = train_ds is not None
        self._check_out()
        self.data = load_train_data(cfg, train_ds, test_ds)
        self._setup()

    # -------------------------------------------------------------------- set-up
    def _check_out(self) -> None:
        """Refuse to clobber a run or a zoo entry unless told; --overwrite clears the old files."""
        cfg = self.cfg
        if cfg.resume:
            if not self.ckpt_path.is_file():
                raise RobustcapsError(f"nothing to resume: {self.ckpt_path} does not exist")
            return
        old = [p for p in (self.ckpt_path, self.out / "weights.pt", self.out / "card.json",
                           self.out / "card.md", self.out / "metrics.csv") if p.is_file()]
        if old and not cfg.overwrite:
            what = "a training run" if self.ckpt_path in old else "a model (weights or card)"
            raise RobustcapsError(f"{self.out} already holds {what}; pass --resume to continue "
                                  "a run or --overwrite to start again")
        self._stale = old  # removed once the data and model are set up (see _run)

    def _setup(self) -> None:
        from .models.registry import create_model

        cfg, data = self.cfg, self.data
        c, h, w = data.train.x.shape[1:]
        self.augment = cfg.augment
        if self.augment == "auto":
            self.augment = "paper" if min(h, w) > CROP else "none"
        if self.augment == "paper" and min(h, w) < CROP:
            raise RobustcapsError(f"--augment paper needs images of at least {CROP}x{CROP}, got {h}x{w}")
        self.input_shape = (int(c), CROP, CROP) if self.augment == "paper" or min(h, w) > CROP \
            else (int(c), int(h), int(w))
        self.loss_name = cfg.loss
        if self.loss_name == "auto":
            self.loss_name = "spread" if self.outputs == "capsule_logits" else "ce"
        self.lr0 = cfg.lr if cfg.lr is not None else (3e-3 if self.outputs == "capsule_logits" else 1e-3)

        seed_everything(cfg.seed)
        self.model = create_model(cfg.model, num_classes=data.num_classes,
                                  input_shape=self.input_shape, **cfg.arch_kwargs).to(self.device)
        self.arch_kwargs = dict(self.model.robustcaps_meta.get("arch_kwargs", cfg.arch_kwargs))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr0,
                                          weight_decay=cfg.weight_decay)
        n = len(data.train.y)
        self.batches_per_epoch = math.ceil(n / cfg.batch_size)
        if cfg.steps_per_epoch is not None:
            self.batches_per_epoch = min(self.batches_per_epoch, cfg.steps_per_epoch)
        self.total_steps = cfg.epochs * self.batches_per_epoch
        self.evaluator = _Evaluator(self.model, self.outputs, self.input_shape[1:], cfg.batch_size,
                                    self.device, cfg.progress)
        # Position and running state (replaced by a checkpoint on resume).
        self.epoch = 0  # the epoch in progress (0-based)
        self.batch = 0  # the next batch within it
        self.global_step = 0
        self.epoch_stats = {"loss_sum": 0.0, "correct": 0, "count": 0}
        self.history: list[dict[str, Any]] = []
        self.train_time_s = 0.0  # wall time of training and per-epoch evaluation, over all resumes
        self._t_mark = time.monotonic()
        self.status = "running"
        self.stop_reason: str | None = None
        self._eval_cache: dict[str, Split] = {}
        self._interrupted = False

    # -------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_json(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "batch": self.batch,
            "global_step": self.global_step,
            "epoch_stats": dict(self.epoch_stats),
            "history": json.dumps(self.history),
            "train_time_s": self.train_time_s,
            "status": self.status,
            "stop_reason": self.stop_reason,
            "data_fingerprint": self.data_fingerprint(),
            "rng": _rng_state(),
        }

    def _tick(self) -> None:
        """Add the wall time since the last tick to ``train_time_s`` (training + evaluation)."""
        now = time.monotonic()
        self.train_time_s += now - self._t_mark
        self._t_mark = now

    def save_checkpoint(self) -> None:
        self._tick()
        if not _all_finite(self.model):
            raise TrainingDiverged(
                f"non-finite weights at epoch {self.epoch + 1}, step {self.global_step}; "
                f"not saving them (last good checkpoint: {self.ckpt_path})")
        self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(self._state(), self.ckpt_path)

    def load_checkpoint(self) -> None:
        try:
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a user-facing error
            raise RobustcapsError(f"cannot read checkpoint {self.ckpt_path}: {exc}") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise RobustcapsError(f"{self.ckpt_path} is not a robustcaps training checkpoint")
        saved = TrainConfig.from_json(state["config"])
        diffs = [f"{f.name}: {getattr(saved, f.name)!r} then, {getattr(self.cfg, f.name)!r} now"
                 for f in fields(TrainConfig) if f.name not in _RESUME_FREE
                 and getattr(saved, f.name) != getattr(self.cfg, f.name)]
        if diffs:
            raise RobustcapsError("cannot resume with different settings (" + "; ".join(diffs) + ")")
        if state["data_fingerprint"] != self.data_fingerprint():
            raise RobustcapsError(f"cannot resume: the data differ from the checkpoint's "
                                  f"({state['data_fingerprint']} vs {self.data_fingerprint()})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.global_step = int(state["global_step"])
        self.epoch_stats = dict(state["epoch_stats"])
        self.history = json.loads(state["history"])
        self.train_time_s = float(state["train_time_s"])
        self.status = state.get("status", "running")
        self.stop_reason = state.get("stop_reason")
        _set_rng_state(state["rng"])

    def data_fingerprint(self) -> dict[str, str]:
        d = {"train": self.data.train.fingerprint, "test": self.data.test.fingerprint}
        if self.data.val is not None:
            d["val"] = self.data.val.fingerprint
        return d

    # --------------------------------------------------------------- schedules
    def lr_at(self, step: int) -> float:
        return self.lr0 * self.cfg.lr_decay ** (step / self.batches_per_epoch)

    def margin_at(self, step: int) -> float:
        return L.spread_margin(step / max(1, self.total_steps - 1), self.cfg.margin_start,
                               self.cfg.margin_end)

    def loss(self, scores: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """Mean training loss of a batch; scores (N, K), y (N,)."""
        if self.loss_name == "ce":
            return L.cross_entropy(scores, y).mean()
        a = torch.sigmoid(scores) if self.outputs == "capsule_logits" else scores.softmax(dim=1)
        if self.loss_name == "spread":
            return L.spread_loss(a, y, self.margin_at(step)).mean()
        return L.margin_loss(a, y).mean()

    # -------------------------------------------------------------------- loop
    def _batch(self, order: torch.Tensor, b: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.cfg.batch_size
        idx = order[b * bs:(b + 1) * bs]
        x, y = self.data.train.x[idx], self.data.train.y[idx]
        if self.augment == "paper":
            from .data.transforms import train_augment

            g = torch.Generator().manual_seed(_derived_seed(self.cfg.seed, 2, step))
            x = train_augment(x, g, size=self.input_shape[1])
        elif x.shape[-2:] != self.input_shape[1:]:
            from .data.transforms import center_crop

            x = center_crop(x, self.input_shape[1])
        return x.to(self.device), y.to(self.device)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """One optimisation step at ``self.global_step``; returns (loss, correct)."""
        step = self.global_step
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        scores = self.model(x)
        loss = self.loss(scores, y, step)
        if not bool(torch.isfinite(loss)):
            raise TrainingDiverged(
                f"loss is {loss.item()} at epoch {self.epoch + 1}, step {step}: training stopped; "
                + (f"the last good checkpoint {self.ckpt_path} is kept"
                   if self.ckpt_path.is_file() else "no checkpoint was written")
                + " (try a lower --lr or --grad-clip)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        return float(loss.detach()), int((scores.detach().argmax(dim=1) == y).sum())

    def evaluate(self, end_of_epoch: bool) -> dict[str, Any]:
        st = self.epoch_stats
        row: dict[str, Any] = {
            "epoch": self.epoch + (1 if end_of_epoch else 0),
            "step": self.global_step,
            "epoch_fraction": round(self.global_step / self.batches_per_epoch, 4),
            "train_loss": st["loss_sum"] / max(1, st["count"]),
            "train_acc": st["correct"] / max(1, st["count"]),
            "lr": self.lr_at(max(0, self.global_step - 1)),
            "margin": self.margin_at(max(0, self.global_step - 1)) if self.loss_name == "spread" else None,
            "test_error": self.evaluator.error(self._eval_subset(self.data.test)),
            "val_error": (self.evaluator.error(self._eval_subset(self.data.val))
                          if self.data.val is not None else None),
            "eval_samples": len(self._eval_subset(self.data.test).y),
        }
        self._tick()
        row["train_time_s"] = round(self.train_time_s, 2)
        self.history.append(row)
        return row

    def _eval_subset(self, split: Split) -> Split:
        """The images evaluated during training: all, or ``eval_samples`` of a fixed permutation."""
        n = self.cfg.eval_samples
        if n is None or n >= len(split.y):
            return split
        if split.name not in self._eval_cache:
            idx = torch.from_numpy(np.random.default_rng(
                np.random.SeedSequence([self.cfg.data_seed, 4243])).permutation(len(split.y))[:n])
            self._eval_cache[split.name] = _subset(split, idx, split.name)
        return self._eval_cache[split.name]

    def _report(self, row: dict[str, Any], echo: Callable[[str], None]) -> None:
        msg = (f"epoch {row['epoch_fraction']:.2f}/{self.cfg.epochs}  step {row['step']}  "
               f"loss {row['train_loss']:.4f}  train acc {row['train_acc']:.2%}  "
               f"test err {row['test_error']:.2%}")
        if row["val_error"] is not None:
            msg += f"  val err {row['val_error']:.2%}"
        echo(msg)
        if self.callback is not None:
            self.callback(row)

    def _stop_reached(self, row: dict[str, Any]) -> bool:
        target = self.cfg.stop_at_error
        if target is None:
            return False
        err = row["val_error"] if self.cfg.stop_on == "val" else row["test_error"]
        if err is not None and err <= target:
            self.stop_reason = (f"{self.cfg.stop_on} error {err:.4f} <= {target} at step "
                                f"{row['step']} (epoch {row['epoch_fraction']:.2f})")
            return True
        return False

    def write_metrics(self) -> Path:
        path = self.out / "metrics.csv"
        cols = ["epoch", "step", "epoch_fraction", "train_loss", "train_acc", "lr", "margin",
                "test_error", "val_error", "eval_samples", "train_time_s"]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for row in self.history:
                w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})
        os.replace(tmp, path)
        return path

    def _pause_due(self, t_start: float, steps_this_run: int) -> bool:
        """A signal, --time-limit or --stop-after-steps asks to checkpoint and stop here."""
        cfg = self.cfg
        return (self._interrupted
                or (cfg.time_limit is not None and time.monotonic() - t_start >= cfg.time_limit)
                or (cfg.stop_after_steps is not None and steps_this_run >= cfg.stop_after_steps))

    @contextlib.contextmanager
    def _graceful_signals(self, echo: Callable[[str], None]) -> Iterator[None]:
        """First SIGINT/SIGTERM: finish the step, checkpoint, pause. Second SIGINT: abort."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._interrupted and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._interrupted = True
            echo(f"{signal.Signals(signum).name}: checkpointing after this step "
                 "(Ctrl-C again aborts without it)")

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        echo = (lambda m: tqdm.write(m)) if self.cfg.progress else (lambda m: log.info(m))
        with self._graceful_signals(echo):
            return self._run(echo)

    def _run(self, echo: Callable[[str], None]) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        for p in self._stale:  # --overwrite: no stale card or checkpoint beside the new run
            p.unlink(missing_ok=True)
        if cfg.resume:
            self.load_checkpoint()
            echo(f"resuming {self.out} at epoch {self.epoch + 1}, batch {self.batch} "
                 f"(step {self.global_step})")
        t_start = self._t_mark = time.monotonic()
        steps_this_run = 0
        paused = False
        while self.status == "running" and self.epoch < cfg.epochs:
            order = _epoch_order(cfg.seed, self.epoch, len(self.data.train.y))
            bar = tqdm(total=self.batches_per_epoch, initial=self.batch, unit="step",
                       desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                       dynamic_ncols=True)
            while self.batch < self.batches_per_epoch:
                x, y = self._batch(order, self.batch, self.global_step)
                loss, correct = self.train_step(x, y)
                self.global_step += 1
                self.batch += 1
                st = self.epoch_stats
                st["loss_sum"] += loss * len(y)
                st["correct"] += correct
                st["count"] += len(y)
                steps_this_run += 1
                bar.update(1)
                bar.set_postfix(loss=f"{st['loss_sum'] / st['count']:.4f}",
                                acc=f"{st['correct'] / st['count']:.1%}")
                if self.batch == self.batches_per_epoch:
                    break  # the end-of-epoch evaluation and checkpoint follow
                if cfg.eval_every_steps and self.global_step % cfg.eval_every_steps == 0:
                    row = self.evaluate(end_of_epoch=False)
                    self._report(row, echo)
                    if self._stop_reached(row):
                        self.status = "stopped"
                        break
                want_ckpt = cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0
                paused = self._pause_due(t_start, steps_this_run)
                if want_ckpt or paused:
                    self.save_checkpoint()
                    self.write_metrics()
                if paused:
                    break
            bar.close()
            if paused:
                break
            if self.status == "running":  # the epoch is complete
                row = self.evaluate(end_of_epoch=True)
                self.epoch += 1
                self.batch = 0
                self.epoch_stats = {"loss_sum": 0.0, "correct": 0, "count": 0}
                self._report(row, echo)
                if self._stop_reached(row):
                    self.status = "stopped"
            self.save_checkpoint()
            self.write_metrics()
            if self.status == "running" and self.epoch < cfg.epochs \
                    and self._pause_due(t_start, steps_this_run):
                paused = True
                break
        result: dict[str, Any] = {
            "global_step": self.global_step, "epoch": self.epoch, "history": self.history,
            "paths": {"checkpoint": self.ckpt_path, "metrics": self.out / "metrics.csv"},
        }
        if paused:
            echo(f"paused at step {self.global_step} (epoch {self.epoch + 1}, batch {self.batch}); "
                 f"continue with --resume")
            return {**result, "status": "paused", "card": None}
        if self.status == "running":
            self.status = "finished"
            self.save_checkpoint()
        if self.stop_reason:
            echo(f"stopped: {self.stop_reason}")
        card, paths = self.finalize()
        return {**result, "status": self.status, "card": card, "paths": {**result["paths"], **paths}}

    # ------------------------------------------------------------------- final
    def finalize(self) -> tuple[dict[str, Any], dict[str, Path]]:
        """Final test errors, the weights file and the model card."""
        from .models.registry import count_params
        from .models.zoo import write_card

        cfg, data = self.cfg, self.data
        last = self.history[-1] if self.history else None
        if last is not None and last["step"] == self.global_step and self.cfg.eval_samples is None:
            # just evaluated on the same images: reuse
            center, val = last["test_error"], last["val_error"]
        else:
            center = self.evaluator.error(data.test)
            val = self.evaluator.error(data.val) if data.val is not None else None
        multi_ok = cfg.multi_crop and tuple(data.test.x.shape[-2:]) != tuple(self.input_shape[1:])
        multi = self.evaluator.error(data.test, multi=True) if multi_ok else None
        weights = self.out / "weights.pt"
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        _atomic_torch_save(state, weights)
        name = cfg.name or self.out.resolve().name
        epochs_done: float | int = round(self.global_step / self.batches_per_epoch, 4)
        if float(epochs_done).is_integer():
            epochs_done = int(epochs_done)
        description = cfg.description or (
            f"{cfg.model} trained on {data.dataset} ({len(data.train.y)} training images) for "
            f"{epochs_done:g} epochs, seed {cfg.seed}")
        card = {
            "name": name,
            "arch": cfg.model,
            "arch_kwargs": json.loads(json.dumps(self.arch_kwargs, default=list)),
            "num_classes": data.num_classes,
            "class_names": data.class_names,
            "input_shape": list(self.input_shape),
            "outputs": self.outputs,
            "bounds": list(data.bounds) if data.bounds else None,
            "dataset": data.dataset,
            "splits": {"train": cfg.train_split, "test": cfg.test_split,
                       "val": ({"instances": list(cfg.val_instances)} if cfg.val_instances else
                               {"fraction": cfg.val_fraction} if cfg.val_fraction else None)},
            "params": count_params(self.model),
            "weights": weights.name,
            "sha256": sha256_file(weights),
            "test_error": {"center": center, "multi_crop": multi},
            "val_error": val,
            "n_test": len(data.test.y),
            "n_train": len(data.train.y),
            "n_val": len(data.val.y) if data.val is not None else 0,
            "seed": cfg.seed,
            "epochs": epochs_done,
            "epochs_planned": cfg.epochs,
            "steps": self.global_step,
            "status": self.status,
            "stop_reason": self.stop_reason,
            "command": cfg.command_line() if not self._in_memory else "(Python API, in-memory data)",
            "data_fingerprint": self.data_fingerprint(),
            "train_time_s": round(self.train_time_s, 1),
            "hardware": hardware_description(self.device),
            "training": {
                "optimizer": "Adam", "lr": self.lr0, "lr_decay_per_epoch": cfg.lr_decay,
                "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
                "loss": self.loss_name,
                "spread_margin": ([cfg.margin_start, cfg.margin_end]
                                  if self.loss_name == "spread" else None),
                "augment": self.augment, "grad_clip": cfg.grad_clip,
                "steps_per_epoch": self.batches_per_epoch,
                "max_train_samples": cfg.max_train_samples,
                "max_test_samples": cfg.max_test_samples, "eval_samples": cfg.eval_samples,
                "data_seed": cfg.data_seed,
            },
            "versions": {"robustcaps": __version__, "torch": torch.__version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "description": description,
        }
        paths = write_card(self.out, card)
        return card, {"weights": weights, **paths}


def parse_arch_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``["iterations=2", "pose=\\"vector\\""]`` -> ``{"iterations": 2, "pose": "vector"}``.

    Values are JSON when they parse as JSON, plain strings otherwise.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RobustcapsError(f"--arch-kw expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out
