"""Build hook (setuptools ``cmdclass``, see pyproject.toml): ship the model zoo in the package.

The zoo lives in the top-level ``models/`` folder of the source tree (see
:mod:`robustcaps.models.zoo`). A non-editable install has no source tree, so wheels carry
each entry's ``card.json``, ``card.md`` and weights file (the one named by the card) as
``robustcaps/_zoo/<name>/``; training checkpoints and anything else in ``models/`` stay out.
The sdist carries the same files under ``models/`` so that a wheel built from it has them too.
Editable installs read ``models/`` in place.

setuptools loads this file by path while building (no ``robustcaps`` import, no torch).
"""

from __future__ import annotations

import json
from pathlib import Path

from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ZOO_SOURCE = "models"
ZOO_PACKAGE_DIR = ("robustcaps", "_zoo")


def zoo_files(root: Path) -> list[Path]:
    """Files of every zoo entry under ``root/models`` (relative to ``root``), sorted."""
    files: list[Path] = []
    for card in sorted((root / ZOO_SOURCE).glob("*/card.json")):
        try:
            weights = json.loads(card.read_text()).get("weights", "weights.pt")
        except (OSError, ValueError):
            continue
        for name in ("card.json", "card.md", weights):
            f = card.parent / name
            if f.is_file() and f.resolve().parent == card.parent.resolve():
                files.append(f.relative_to(root))
    return files


class BuildPyWithZoo(build_py):
    """``build_py`` that also copies ``models/<entry>/`` files to ``robustcaps/_zoo/``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        root = Path.cwd()
        dest = Path(self.build_lib, *ZOO_PACKAGE_DIR)
        for rel in zoo_files(root):
            target = dest / rel.relative_to(ZOO_SOURCE)
            self.mkpath(str(target.parent))
            self.copy_file(str(root / rel), str(target))


class SdistWithZoo(sdist):
    """``sdist`` that includes the zoo entries' files (not their checkpoints)."""

    def make_distribution(self) -> None:
        # setuptools' sdist takes its file list from egg_info; add the zoo just before writing.
        self.filelist.extend(str(p) for p in zoo_files(Path.cwd()))
        super().make_distribution()
