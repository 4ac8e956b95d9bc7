"""What a training run is: :class:`TrainConfig` (saved in checkpoints and on the card)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import RobustcapsError

CHECKPOINT_FORMAT = "robustcaps-train-checkpoint/1"
LOSSES = ("auto", "spread", "margin", "ce")
AUGMENTS = ("auto", "paper", "none")
STOP_SPLITS = ("test", "val")
CROP = 32  # the paper's input crop for 48x48 NORB images

# Config fields that may change between a run and its resumption without changing the result.
RESUME_FREE = {"resume", "overwrite", "time_limit", "stop_after_steps", "progress", "device",
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
