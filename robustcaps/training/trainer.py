"""``train()`` and the :class:`Trainer` loop (see :mod:`robustcaps.training`)."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..errors import RobustcapsError
from ..models import losses as L
from ..utils import resolve_device, seed_everything, sha256_file
from .config import CHECKPOINT_FORMAT, CROP, RESUME_FREE, TrainConfig, TrainingDiverged
from .data import Split, load_train_data, subset_split
from .evaluator import Evaluator, hardware_description
from .state import (
    all_finite,
    atomic_torch_save,
    derived_seed,
    epoch_order,
    rng_state,
    set_rng_state,
)

log = logging.getLogger(__name__)


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
    from .distributed import make_trainer  # DDP under torchrun

    return make_trainer(cfg, train_data, test_data, callback).run()


class Trainer:
    """One training run (see :func:`train`)."""

    def __init__(self, cfg: TrainConfig, train_ds: Any = None, test_ds: Any = None,
                 callback: Callable[[dict[str, Any]], None] | None = None) -> None:
        from ..models.registry import architectures

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
        from ..models.registry import create_model

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
        self.train_model: nn.Module = self.model  # what a step runs (DDP wraps it)
        self.arch_kwargs = dict(self.model.robustcaps_meta.get("arch_kwargs", cfg.arch_kwargs))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr0,
                                          weight_decay=cfg.weight_decay)
        n = len(data.train.y)
        self.batches_per_epoch = math.ceil(n / cfg.batch_size)
        if cfg.steps_per_epoch is not None:
            self.batches_per_epoch = min(self.batches_per_epoch, cfg.steps_per_epoch)
        self.total_steps = cfg.epochs * self.batches_per_epoch
        self.evaluator = Evaluator(self.model, self.outputs, self.input_shape[1:], cfg.batch_size,
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
            "rng": rng_state(),
        }

    def _tick(self) -> None:
        """Add the wall time since the last tick to ``train_time_s`` (training + evaluation)."""
        now = time.monotonic()
        self.train_time_s += now - self._t_mark
        self._t_mark = now

    def save_checkpoint(self) -> None:
        self._tick()
        if not all_finite(self.model):
            raise TrainingDiverged(
                f"non-finite weights at epoch {self.epoch + 1}, step {self.global_step}; "
                f"not saving them (last good checkpoint: {self.ckpt_path})")
        self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self._state(), self.ckpt_path)

    def load_checkpoint(self) -> None:
        try:
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a user-facing error
            raise RobustcapsError(f"cannot read checkpoint {self.ckpt_path}: {exc}") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise RobustcapsError(f"{self.ckpt_path} is not a robustcaps training checkpoint")
        saved = TrainConfig.from_json(state["config"])
        diffs = [f"{f.name}: {getattr(saved, f.name)!r} then, {getattr(self.cfg, f.name)!r} now"
                 for f in fields(TrainConfig) if f.name not in RESUME_FREE
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
        set_rng_state(state["rng"])

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
            from ..data.transforms import train_augment

            g = torch.Generator().manual_seed(derived_seed(self.cfg.seed, 2, step))
            x = train_augment(x, g, size=self.input_shape[1])
        elif x.shape[-2:] != self.input_shape[1:]:
            from ..data.transforms import center_crop

            x = center_crop(x, self.input_shape[1])
        return x.to(self.device), y.to(self.device)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """One optimisation step at ``self.global_step``; returns (loss, correct)."""
        step = self.global_step
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        scores = self.train_model(x)
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
            self._eval_cache[split.name] = subset_split(split, idx, split.name)
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
            order = epoch_order(cfg.seed, self.epoch, len(self.data.train.y))
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
            return {**result, "status": "paused", "card": None, "interrupted": self._interrupted}
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
        from ..models.registry import count_params
        from ..models.zoo import write_card

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
        atomic_torch_save(state, weights)
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
