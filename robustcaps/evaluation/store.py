"""The run directory: settings check for resume, per-unit chunks, the done log, manifest,
records and the COMPLETE marker. Every file is written atomically (:func:`robustcaps.utils.atomic_write`),
so an interrupted run loses at most the unit in flight.

Layout::

    config.json            what must match for --resume (data fingerprint, model hashes, ...)
    manifest.json          settings, versions, device, models, timings; status
    chunks/<unit>.csv.gz   one unit's records, written when it finishes
    chunks/done.jsonl      {"unit", "seconds", "rows"} per finished unit (done-<writer>.jsonl
                           per process of a run on several processes)
    examples/*.npz         a few adversarial examples per (attack, model)
    records.csv.gz         every unit's records, once all are done
    COMPLETE               written last
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import RobustcapsError
from ..utils import atomic_write, ensure_dir
from .records import read_chunk

COMPLETE_MARKER = "COMPLETE"


def _part() -> str:
    """A temporary-file suffix of its own: processes sharing a run directory may write the
    same JSON file (manifest, config) at once. (CSVs keep a fixed one: gzip stores the file
    name, and each chunk has one writer.)"""
    return f".{uuid.uuid4().hex[:8]}.part"


def write_json(path: Path, obj: Any) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=str) + "\n"),
                        suffix=_part())


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    """A CSV (gzip-compressed when the name ends in .gz), atomically."""
    # mtime 0: the gzip header would otherwise hold the time, and identical runs differ
    gz = {"method": "gzip", "mtime": 0} if path.suffix == ".gz" else None
    return atomic_write(path, lambda p: df.to_csv(p, index=False, compression=gz))


def now() -> str:
    return datetime.now().isoformat(timespec="seconds")


class RunStore:
    """A run directory on disk (``root``) or, with ``root=None``, nothing written.
    ``writer`` names this process's done log when several processes share the directory."""

    def __init__(self, root: str | Path | None, writer: str = "") -> None:
        self.root = None if root is None else Path(root)
        self.writer = writer
        self.complete = False  # set by open(): a resumed run that had already finished

    def __bool__(self) -> bool:
        return self.root is not None

    def open(self, identity: dict[str, Any], resume: bool) -> None:
        """Start a new run, or check that a resumed one was run with ``identity``."""
        if self.root is None:
            return
        cfg_path = self.root / "config.json"
        if self.root.exists() and not self.root.is_dir():
            raise RobustcapsError(f"--out {self.root} exists and is not a directory")
        if cfg_path.is_file():
            self._check_resume(json.loads(cfg_path.read_text()), identity, resume)
            self.complete = (self.root / COMPLETE_MARKER).is_file()
            return
        if self.root.is_dir() and any(self.root.iterdir()) and not resume:
            raise RobustcapsError(f"--out {self.root} is not empty; choose a new directory")
        ensure_dir(self.root, "--out")
        (self.root / "chunks").mkdir(exist_ok=True)
        (self.root / "examples").mkdir(exist_ok=True)
        write_json(cfg_path, identity)

    def keep_history(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """A resumed run keeps its first ``command`` and ``started`` (provenance); each
        resume is appended to ``resumes``."""
        path = None if self.root is None else self.root / "manifest.json"
        if path is None or not path.is_file():
            return manifest
        old = json.loads(path.read_text())
        resumes = [*old.get("resumes", []),
                   {"command": manifest.get("command"), "started": manifest.get("started")}]
        return {**manifest, "command": old.get("command"), "started": old.get("started"),
                "resumes": resumes}

    def _check_resume(self, old: dict[str, Any], identity: dict[str, Any], resume: bool) -> None:
        if not resume:
            raise RobustcapsError(
                f"{self.root} already holds a run; continue it with --resume or choose another --out")
        diff = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
        if diff:
            raise RobustcapsError(
                f"cannot resume {self.root}: it was run with different settings ({', '.join(diff)})")

    def write_manifest(self, manifest: dict[str, Any]) -> Path | None:
        return None if self.root is None else write_json(self.root / "manifest.json", manifest)

    def unit_seconds(self) -> dict[str, float]:
        """Seconds per finished unit, from the done logs (a torn last line is skipped)."""
        timings: dict[str, float] = {}
        if self.root is None:
            return timings
        lines = [ln for log in sorted((self.root / "chunks").glob("done*.jsonl"))
                 for ln in log.read_text().splitlines()]
        for line in lines:
            try:
                d = json.loads(line)
                timings[d["unit"]] = d["seconds"]
            except (json.JSONDecodeError, KeyError):
                continue
        return timings

    def load_chunk(self, key: str) -> pd.DataFrame | None:
        """A finished unit's records, or None (not done, or nothing stored)."""
        path = self._chunk(key)
        return read_chunk(path) if path is not None and path.is_file() else None

    def has_chunk(self, key: str) -> bool:
        path = self._chunk(key)
        return path is not None and path.is_file()

    def save_chunk(self, key: str, df: pd.DataFrame, seconds: float) -> pd.DataFrame:
        """Store a unit's records and log it done; returns them as read back, so that a
        resumed run holds exactly what an uninterrupted one does."""
        path = self._chunk(key)
        if path is None:
            return df
        write_csv(df, path)
        with open(self._done_log(), "a") as f:
            f.write(json.dumps({"unit": key, "seconds": seconds, "rows": len(df)}) + "\n")
        return read_chunk(path)

    def examples_path(self, name: str) -> Path | None:
        return None if self.root is None else self.root / "examples" / f"{name}.npz"

    def write_records(self, records: pd.DataFrame) -> Path | None:
        return None if self.root is None else write_csv(records, self.root / "records.csv.gz")

    def mark_complete(self) -> Path | None:
        if self.root is None:
            return None
        return atomic_write(self.root / COMPLETE_MARKER, lambda p: p.write_text(now() + "\n"))

    def _chunk(self, key: str) -> Path | None:
        return None if self.root is None else self.root / "chunks" / f"{key}.csv.gz"

    def _done_log(self) -> Path | None:
        name = f"done-{self.writer}.jsonl" if self.writer else "done.jsonl"
        return None if self.root is None else self.root / "chunks" / name
