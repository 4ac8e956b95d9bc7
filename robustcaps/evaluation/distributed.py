"""One evaluation run on several processes: torchrun ranks or independent ``--shard I/N``.

Every process loads the data and models and plans the same units; the run directory is
the only thing they share. A unit is the atomic grain: its chunk is written atomically, so
a killed process loses at most the unit in flight, and a relaunch (``--resume``, with any
number of processes) runs exactly the units without a chunk.

- torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set): rank 0 creates or checks the run
  directory, writes the plan and clears the claims of earlier launches; then every rank
  takes units from a work queue, most expensive first, claiming each with an ``O_EXCL``
  file in ``claims/`` (a claim is atomic on POSIX file systems, NFS v3+ included). After a
  barrier rank 0 merges. Dynamic claims keep ranks busy whatever the units really cost.
- ``--shard I/N``: no process group; shard I runs the units a deterministic cost-weighted
  assignment gives it. The shard that finds every unit done merges (one, by an ``O_EXCL``
  claim); ``robustcaps report DIR`` merges or names the missing shards.

Results do not depend on the split: each unit's randomness is seeded from the run seed and
its key (:mod:`.seeding`), and records are merged in plan order.
"""

from __future__ import annotations

import heapq
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import RobustcapsError
from ..utils import resolve_device
from .plan import TransferUnit, Unit
from .store import RunStore, write_json

PLAN_FILE = "plan.json"
CLAIMS = "claims"
WORKERS = "workers"
MERGE_CLAIM = "merge.claim"
#: relative cost of an attack per (sample, target, epsilon-sweep): FGSM is one gradient,
#: iterative attacks one per step
SINGLE_STEP = ("fgsm",)


@dataclass(frozen=True)
class Workers:
    """This process's place in a run: ``mode`` single, torchrun or shard."""

    rank: int = 0
    world: int = 1
    mode: str = "single"
    local_rank: int = 0
    attempt: str = ""  # shared by the ranks of one launch: older claims are stale

    @property
    def main(self) -> bool:
        """Prints tables and writes the merged run (shards: the one that merges)."""
        return self.rank == 0 and self.mode != "shard"

    @property
    def writer(self) -> str:
        """Names this process's done log and stats file ('' for a single process)."""
        if self.mode == "torchrun":
            return f"{self.attempt}-rank{self.rank}"
        return f"shard-{self.rank}-of-{self.world}" if self.mode == "shard" else ""

    @property
    def label(self) -> str:
        return f"{'rank' if self.mode == 'torchrun' else 'shard'} {self.rank}/{self.world}"

    def barrier(self) -> None:
        if self.mode == "torchrun":
            torch.distributed.barrier()

    def same(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (e.g. a default run directory named by the time)."""
        if self.mode != "torchrun":
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def device(self, spec: str) -> str:
        """Each torchrun rank on its own GPU (cuda:LOCAL_RANK); ``spec`` otherwise."""
        if self.mode == "torchrun" and resolve_device(spec).type == "cuda":
            return f"cuda:{self.local_rank}"
        return spec


SINGLE = Workers()


def parse_shard(text: str) -> Workers:
    """``"I/N"`` (0 <= I < N) -> the Workers of shard I."""
    try:
        i, n = (int(p) for p in str(text).split("/"))
    except ValueError:
        raise RobustcapsError(f"--shard: expected I/N such as 0/4, got {text!r}") from None
    if not 0 <= i < n:
        raise RobustcapsError(f"--shard: need 0 <= I < N, got {text!r}")
    return Workers(rank=i, world=n, mode="shard")


def detect_workers(device: str = "auto") -> Workers:
    """The torchrun group this process belongs to (initialised here when the launcher's
    environment names one and nobody has yet), else a single process."""
    dist = torch.distributed
    if not dist.is_available():
        return SINGLE
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return SINGLE
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = resolve_device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    box = [uuid.uuid4().hex[:12] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Workers(dist.get_rank(), dist.get_world_size(), "torchrun", local, box[0])


def close_workers(workers: Workers) -> None:
    if workers.mode == "torchrun" and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- plan, costs
def unit_cost(unit: Unit, num_classes: int, steps: int) -> float:
    """A unit's relative cost: (sample, target) pairs x gradients per sweep (+ the cheap
    forward passes of each transfer target)."""
    pairs = len(unit.positions) * ((num_classes - 1) if unit.targeted else 1)
    grads = 1 if unit.attack in SINGLE_STEP else (steps or 100)  # None: the attack's own (<= 100)
    extra = 0.1 * len(unit.targets) if isinstance(unit, TransferUnit) else 0.0
    return float(pairs * (grads + extra))


def assign(costs: Sequence[float], n: int) -> list[list[int]]:
    """Unit indices per shard: longest first, each to the least loaded shard (ties: lowest
    index), so the split depends only on the plan."""
    loads = [(0.0, s) for s in range(n)]
    shares: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, s = heapq.heappop(loads)
        shares[s].append(i)
        heapq.heappush(loads, (load + costs[i], s))
    return [sorted(s) for s in shares]


def write_plan(store: RunStore, units: Sequence[Unit], costs: Sequence[float]) -> None:
    """``plan.json``: every unit key in merge order and its cost (report reads it)."""
    write_json(store.root / PLAN_FILE, {"units": [u.key for u in units], "costs": list(costs)})


def read_plan(root: Path) -> tuple[list[str], list[float]] | None:
    path = Path(root) / PLAN_FILE
    if not path.is_file():
        return None
    plan = json.loads(path.read_text())
    return plan["units"], plan["costs"]


def clear_claims(store: RunStore) -> None:
    """Remove every claim: called before any rank of a new launch claims, so all that exist
    are from launches that died (stale)."""
    claims = store.root / CLAIMS
    claims.mkdir(exist_ok=True)
    for p in claims.iterdir():
        p.unlink(missing_ok=True)
    (store.root / MERGE_CLAIM).unlink(missing_ok=True)


def claim(path: Path, workers: Workers) -> bool:
    """Create ``path`` if nobody has (atomic); True when this process got it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"attempt": workers.attempt, "worker": workers.label, "pid": os.getpid(),
                   "host": socket.gethostname()}, f)
    return True


def open_run(store: RunStore, identity: dict[str, Any], resume: bool, workers: Workers,
             setup) -> None:
    """Create or check the run directory: rank 0 (or each shard) first, with ``setup()``
    (manifest, plan) before the other ranks check it, so they never see half a run."""
    first = workers.rank == 0 or workers.mode == "shard"
    if first:
        store.open(identity, resume or workers.mode == "shard")
        if not store.complete:  # a complete run is left as it is
            setup()
    workers.barrier()
    if not first:
        store.open(identity, True)


def my_units(units: Sequence[Unit], costs: Sequence[float], store: RunStore,
             workers: Workers) -> Iterator[Unit]:
    """The units this process runs, as it reaches them (torchrun: claimed from the queue)."""
    if workers.mode == "shard":
        mine = assign(costs, workers.world)[workers.rank]
        yield from (units[i] for i in mine if not store.has_chunk(units[i].key))
        return
    claims = store.root / CLAIMS
    for i in sorted(range(len(units)), key=lambda i: (-costs[i], i)):
        key = units[i].key
        if not store.has_chunk(key) and claim(claims / key, workers) and not store.has_chunk(key):
            yield units[i]


# --------------------------------------------------------------------------- balance
def write_stats(store: RunStore, workers: Workers, ran: dict[str, float], wall: float) -> None:
    """This process's share: units run, busy seconds (sum of unit times) and wall time."""
    (store.root / WORKERS).mkdir(exist_ok=True)
    write_json(store.root / WORKERS / f"{workers.writer}.json", {
        "worker": workers.label, "rank": workers.rank, "mode": workers.mode, "attempt": workers.attempt,
        "host": socket.gethostname(), "units": len(ran), "busy_seconds": sum(ran.values()),
        "wall_seconds": wall, "finished": time.time()})


def scale_summary(root: Path, workers: Workers) -> dict[str, Any]:
    """Per-worker busy time of this launch (torchrun) or of the shards, and the imbalance:
    max / mean busy time - 1 (0 when all finish together)."""
    pattern = f"{workers.attempt}-rank*.json" if workers.mode == "torchrun" \
        else f"shard-*-of-{workers.world}.json"
    stats = sorted((json.loads(p.read_text()) for p in (Path(root) / WORKERS).glob(pattern)),
                   key=lambda s: s["rank"])
    busy = [s["busy_seconds"] for s in stats]
    mean = sum(busy) / len(busy) if busy else 0.0
    return {"mode": workers.mode, "world_size": workers.world, "workers": stats,
            "busy_seconds": busy, "imbalance": (max(busy) / mean - 1) if mean > 0 else 0.0}
