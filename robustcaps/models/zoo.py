"""The model zoo: trained checkpoints with model cards, loadable by name.

A zoo entry is a folder ``<zoo>/<name>/`` holding ``card.json`` (machine-readable model
card), ``card.md`` (the same for people) and the state dict named by ``card["weights"]``.
Zoo folders are searched in this order:

1. ``$ROBUSTCAPS_ZOO`` (``os.pathsep``-separated folders), for users' own zoos;
2. the top-level ``models/`` folder of a source checkout;
3. ``robustcaps/_zoo`` inside an installed (non-editable) package, where the build copies
   ``models/``.

``ROBUSTCAPS_BUILTIN_ZOO=0`` leaves out 2 and 3 (the test suite does, so that its results do
not depend on which checkpoints are committed).

Weights are always loaded with ``torch.load(weights_only=True)`` and their sha256 is
checked against the card before use.

``robustcaps train --out models/<name>`` writes an entry (see :mod:`robustcaps.training`); its
full training checkpoints go to ``models/<name>/checkpoints/``, which is not committed and
not packaged. :data:`CARD_FIELDS` lists what every card holds.
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

# Fields every model card holds (card.json); card.md renders the same information.
CARD_FIELDS = (
    "name", "arch", "arch_kwargs", "num_classes", "input_shape", "dataset", "params", "sha256",
    "weights", "test_error", "seed", "epochs", "command", "data_fingerprint", "train_time_s",
    "hardware", "description",
)


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
    if os.environ.get("ROBUSTCAPS_BUILTIN_ZOO", "1") != "0":
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
    meta = {**model.robustcaps_meta, "name": name, "zoo": True, "sha256": card.get("sha256")}
    if card.get("bounds"):
        meta["bounds"] = tuple(card["bounds"])
    model.robustcaps_meta = meta
    return model


def verify_entry(entry: ZooEntry) -> list[str]:
    """Problems with a zoo entry (missing card fields, missing weights, sha256 mismatch).

    An empty list means the entry is sound.
    """
    problems = [f"card lacks {k!r}" for k in CARD_FIELDS if k not in entry.card]
    wpath = entry.weights_path
    if not wpath.is_file():
        problems.append(f"weights file {wpath.name} is missing")
    elif entry.card.get("sha256") != sha256_file(wpath):
        problems.append(f"sha256 of {wpath.name} does not match its card")
    return problems


def _pct(v: Any) -> str:
    return f"{v:.2%}" if isinstance(v, (int, float)) else "n/a"


def render_card_markdown(card: dict[str, Any]) -> str:
    """The human-readable model card (card.md) for a card dict."""
    err = card.get("test_error") or {}
    tr = card.get("training") or {}
    fp = card.get("data_fingerprint")
    fp_s = ", ".join(f"{k} `{v}`" for k, v in fp.items()) if isinstance(fp, dict) else f"`{fp}`"
    lines = [
        f"# Model card: {card.get('name')}",
        "",
        card.get("description") or "",
        "",
        "| | |",
        "| --- | --- |",
        f"| architecture | `{card.get('arch')}` {json.dumps(card.get('arch_kwargs') or {})} |",
        f"| parameters | {card.get('params', 0):,} |",
        f"| input | {'x'.join(map(str, card.get('input_shape') or []))}, "
        f"bounds {card.get('bounds') or 'none (per-image standardised)'} |",
        f"| classes | {card.get('num_classes')}: {', '.join(card.get('class_names') or [])} |",
        f"| dataset | {card.get('dataset')} (splits {json.dumps(card.get('splits'))}) |",
        f"| samples | train {card.get('n_train')}, validation {card.get('n_val')}, test {card.get('n_test')} |",
        f"| **test error, centre crop** | **{_pct(err.get('center'))}** |",
        f"| **test error, multi-crop** | **{_pct(err.get('multi_crop'))}** |",
        f"| validation error | {_pct(card.get('val_error'))} |",
        f"| seed | {card.get('seed')} |",
        f"| epochs | {card.get('epochs')} of {card.get('epochs_planned', card.get('epochs'))} "
        f"({card.get('steps')} steps; {card.get('status', '')}"
        f"{'; ' + card['stop_reason'] if card.get('stop_reason') else ''}) |",
        f"| training time | {card.get('train_time_s')} s on {card.get('hardware')} |",
        f"| data fingerprint | {fp_s} |",
        f"| weights | `{card.get('weights')}`, sha256 `{card.get('sha256')}` |",
        f"| versions | {json.dumps(card.get('versions'))} |",
        f"| created | {card.get('created', '')} |",
        "",
        "## Training",
        "",
        "```",
        card.get("command") or "",
        "```",
        "",
    ]
    if tr:
        lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in tr.items()] + [""]
    subset = tr.get("max_test_samples")
    stopped_on_test = (card.get("stop_reason") or "").startswith("test error")
    lines += [
        f"Test errors are over {card.get('n_test')} images of the test split"
        + (" (a class-stratified subset)" if subset else "")
        + "; centre 32x32 crop, and multi-crop = class activations averaged over the centre and "
        "four corner crops (n/a when the images are not larger than the input). "
        + ("Training was stopped on the test error (--on test): this test error is not an "
           "unbiased estimate." if stopped_on_test else "No choice was made on the test split."),
        "",
    ]
    notes = card.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in ([notes] if isinstance(notes, str) else notes)] + [""]
    return "\n".join(lines)


def write_card(folder: str | os.PathLike, card: dict[str, Any]) -> dict[str, Path]:
    """Write ``card.json`` and ``card.md`` into ``folder``; returns their paths."""
    folder = Path(folder)
    missing = [k for k in CARD_FIELDS if k not in card]
    if missing:
        raise ModelLoadError(f"model card lacks {', '.join(missing)}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"card_json": folder / "card.json", "card_md": folder / "card.md"}
    for key, text in (("card_json", json.dumps(card, indent=2) + "\n"),
                      ("card_md", render_card_markdown(card))):
        tmp = paths[key].with_name(paths[key].name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, paths[key])
    return paths
