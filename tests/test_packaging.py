"""Installation contract: CPU machines get no CUDA packages and no torchvision."""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_dependencies_come_from_requirements_files():
    py = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert set(py["project"]["dynamic"]) == {"dependencies", "optional-dependencies"}
    dyn = py["tool"]["setuptools"]["dynamic"]
    assert dyn["dependencies"]["file"] == ["requirements.txt"]
    names = {
        re.split(r"[<>=;\s\[]", line, maxsplit=1)[0].lower()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"torch", "foolbox", "torchattacks", "numpy", "seaborn", "click"} <= names
    assert "torchvision" not in names
    dev = (REPO / "requirements-dev.txt").read_text()
    for name in ("pytest", "ruff", "hypothesis"):
        assert name in dev
    assert py["project"]["scripts"]["robustcaps"] == "robustcaps.cli:main"


def test_makefile_pins_torch_and_skips_torchvision():
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text()
    mk = (REPO / "Makefile").read_text()
    assert re.search(r"--no-deps .*torchattacks", mk)


def test_cpu_install_has_no_cuda_packages():
    installed = {(d.metadata["Name"] or "").lower() for d in md.distributions()}
    assert "torchvision" not in installed
    if torch.version.cuda is None:
        cuda = sorted(n for n in installed if n.startswith("nvidia-") or n == "triton")
        assert cuda == [], f"CUDA packages on a CPU install: {cuda}"


def test_torchattacks_and_foolbox_import_without_torchvision():
    import foolbox  # noqa: F401
    import torchattacks  # noqa: F401

    assert "torchvision" not in sys.modules
