"""The model zoo: trained checkpoints with model cards, loadable by name.

A zoo entry is a folder ``<zoo>/<name>/`` holding ``card.json`` (machine-readable model
card), ``card.md`` (the same for people) and the state dict named by ``card["weights"]``.
Zoo folders are searched in this order:

1. ``$ROBUSTCAPS_ZOO`` (``os.pathsep``-separated folders), for users' own zoos;
2. the top-level ``models/`` folder of a source checkout;
3. ``robustcaps/_zoo`` inside an installed (non-editable) package, where the build copies
   ``models/``.

Weights are always loaded with ``torch.load(weights_only=True)`` and their sha256 is
checked against the card before use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError
from ..utils import repo_root, sha256_file


@dataclass(frozen=True)
class ZooEntry:
    name: str
    path: Path  # the entry's folder
    card: dict[str, Any]

    @property
    def weights_path(self) -> Path:
        return self.path / self.card.get("weights", "weights.pt")


def zoo_dirs() -> list[Path]:
    dirs: list[Path] = []
    env = os.environ.get("ROBUSTCAPS_ZOO")
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    root = repo_root()
    if root is not None:
        dirs.append(root / "models")
    dirs.append(Path(__file__).resolve().parent.parent / "_zoo")
    return [d for d in dirs if d.is_dir()]


def list_zoo() -> dict[str, ZooEntry]:
    """All zoo entries by name; earlier folders shadow later ones."""
    entries: dict[str, ZooEntry] = {}
    for d in zoo_dirs():
        for card_path in sorted(d.glob("*/card.json")):
            try:
                card = json.loads(card_path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            name = card.get("name", card_path.parent.name)
            entries.setdefault(name, ZooEntry(name, card_path.parent, card))
    return entries


def load_zoo_model(name: str, map_location: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Build the architecture named by the card and load its verified weights."""
    from .registry import create_model

    entry = list_zoo().get(name)
    if entry is None:
        raise ModelLoadError(f"no zoo model named {name!r}")
    card = entry.card
    wpath = entry.weights_path
    if not wpath.is_file():
        raise ModelLoadError(f"zoo model {name!r}: weights file {wpath} is missing")
    if verify and card.get("sha256") and sha256_file(wpath) != card["sha256"]:
        raise ModelLoadError(f"zoo model {name!r}: sha256 of {wpath.name} does not match its card")
    model = create_model(
        card["arch"],
        num_classes=card.get("num_classes"),
        input_shape=tuple(card["input_shape"]) if card.get("input_shape") else None,
        **card.get("arch_kwargs", {}),
    )
    state = torch.load(wpath, map_location=map_location, weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    model.load_state_dict(state)
    model.robustcaps_meta = {**model.robustcaps_meta, "name": name, "zoo": True,
                             "sha256": card.get("sha256")}
    return model
