"""Training on several processes with DistributedDataParallel (``torchrun ... -m robustcaps
train``; gloo on the CPU, nccl with one GPU per rank).

Every rank loads the same data and draws the same global batch (same seeds); rank r trains
on rows r, r+W, ... of it, and DDP averages the gradients, so one step is the step of a
single process on the whole batch (up to dropout masks, drawn per rank). The loss and
accuracy logged are those of the whole batch (summed over ranks). Every rank evaluates, so
all take the same stop decisions; only rank 0 writes checkpoints, metrics and the card.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ..errors import RobustcapsError
from ..utils import resolve_device
from .config import TrainConfig
from .trainer import Trainer


def world_size() -> int:
    """The torchrun group size this process belongs to (1: no group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_trainer(cfg: TrainConfig, train_ds: Any = None, test_ds: Any = None,
                 callback: Callable[[dict[str, Any]], None] | None = None) -> Trainer:
    """A :class:`Trainer`, or a :class:`DistributedTrainer` under torchrun."""
    if world_size() <= 1:
        return Trainer(cfg, train_ds, test_ds, callback)
    dist = torch.distributed
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = resolve_device(cfg.device).type == "cuda"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    if cfg.batch_size < dist.get_world_size():
        raise RobustcapsError(f"--batch-size {cfg.batch_size} is smaller than the "
                              f"{dist.get_world_size()} processes that share each batch")
    changes: dict[str, Any] = {"device": f"cuda:{local}"} if cuda else {}
    if dist.get_rank() != 0:
        changes["progress"] = False
    return DistributedTrainer(dataclasses.replace(cfg, **changes), train_ds, test_ds, callback)


class DistributedTrainer(Trainer):
    """:class:`Trainer` with DDP: each rank a slice of every batch, rank 0 writes."""

    def _setup(self) -> None:
        super()._setup()
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.train_model = DistributedDataParallel(self.model, device_ids=ids)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """This rank's rows of the batch; the whole batch's mean loss and correct count."""
        xs, ys = x[self.rank::self.world], y[self.rank::self.world]
        loss, correct = super().train_step(xs, ys)
        totals = torch.tensor([loss * len(ys), float(correct)], dtype=torch.float64,
                              device=self.device)
        torch.distributed.all_reduce(totals)
        return float(totals[0]) / len(y), int(totals[1])

    def save_checkpoint(self) -> None:
        if self.rank == 0:
            super().save_checkpoint()
        else:
            self._tick()

    def write_metrics(self) -> Path:
        return super().write_metrics() if self.rank == 0 else self.out / "metrics.csv"

    def finalize(self) -> tuple[dict[str, Any], dict[str, Path]]:
        return super().finalize() if self.rank == 0 else ({}, {})

    def run(self) -> dict[str, Any]:
        result = super().run()
        torch.distributed.barrier()  # the card is written when any rank returns
        return {**result, "rank": self.rank}
