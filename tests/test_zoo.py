"""The model zoo: cards, listing, sha256 checks, loading from anywhere and from a wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from robustcaps.cli import cli
from robustcaps.errors import ModelLoadError
from robustcaps.models.zoo import (
    CARD_FIELDS,
    list_zoo,
    load_zoo_model,
    render_card_markdown,
    verify_entry,
    write_card,
    zoo_dirs,
)
from robustcaps.training import train
from robustcaps.utils import sha256_file

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Toy:
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int = 3
    name: str = "toy"
    bounds: tuple = (0.0, 1.0)


def toy(n: int, seed: int) -> Toy:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand(n, 1, 16, 16, generator=g) * 0.3
    for k in range(3):
        x[y == k, :, 5 * k:5 * k + 4, 2:14] += 0.6
    return Toy(x, y)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """A zoo folder with one small trained CNN entry, 'toy-cnn'."""
    root = tmp_path_factory.mktemp("zoo")
    train("cnn", epochs=4, out=root / "toy-cnn", seed=1, train_data=toy(128, 0), lr=1e-2,
          test_data=toy(32, 1), batch_size=16, arch_kwargs={"channels": [4, 8], "hidden": 16},
          progress=False, description="a toy CNN for the zoo tests")
    return root


def test_zoo_entry_lists_loads_and_predicts_like_the_trained_model(zoo, monkeypatch):
    monkeypatch.setenv("ROBUSTCAPS_ZOO", str(zoo))
    entry = list_zoo()["toy-cnn"]
    assert verify_entry(entry) == []
    card = entry.card
    assert set(CARD_FIELDS) <= set(card)
    assert card["sha256"] == sha256_file(zoo / "toy-cnn" / "weights.pt")
    model = load_zoo_model("toy-cnn").eval()
    assert model.robustcaps_meta["bounds"] == (0.0, 1.0)
    assert model.robustcaps_meta["input_shape"] == (1, 16, 16)
    # The card's test error is reproduced by the loaded weights on the same test data.
    test = toy(32, 1)
    with torch.no_grad():
        err = float((model(test.x).argmax(1) != test.y).float().mean())
    assert err == pytest.approx(card["test_error"]["center"], abs=1e-9)
    assert err < 0.4  # chance is 2/3
    # weights.pt is a bare state dict that weights_only loading accepts.
    state = torch.load(zoo / "toy-cnn" / "weights.pt", weights_only=True)
    assert sum(v.numel() for v in state.values()) == card["params"]


def test_models_command_lists_the_zoo_with_test_errors(zoo, monkeypatch):
    monkeypatch.setenv("ROBUSTCAPS_ZOO", str(zoo))
    res = CliRunner().invoke(cli, ["models", "--json"])
    assert res.exit_code == 0, res.output
    row = next(r for r in json.loads(res.output) if r["name"] == "toy-cnn")
    assert row["kind"] == "zoo" and row["test_error"]["multi_crop"] is None
    assert row["description"] == "a toy CNN for the zoo tests"
    table = CliRunner().invoke(cli, ["models"])
    assert table.exit_code == 0 and "toy-cnn" in table.output and "center" in table.output
    ok = CliRunner().invoke(cli, ["models", "--verify"])
    assert ok.exit_code == 0 and "toy-cnn: ok" in ok.output
    shown = CliRunner().invoke(cli, ["models", "--card", "toy-cnn"])
    assert shown.exit_code == 0 and shown.output.startswith("# Model card: toy-cnn")


def test_tampered_weights_are_refused(zoo, tmp_path, monkeypatch):
    bad = tmp_path / "zoo"
    shutil.copytree(zoo / "toy-cnn", bad / "toy-cnn")
    state = torch.load(bad / "toy-cnn" / "weights.pt", weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1e-3
    torch.save(state, bad / "toy-cnn" / "weights.pt")
    monkeypatch.setenv("ROBUSTCAPS_ZOO", str(bad))
    entry = list_zoo()["toy-cnn"]
    assert verify_entry(entry) == ["sha256 of weights.pt does not match its card"]
    with pytest.raises(ModelLoadError, match="sha256"):
        load_zoo_model("toy-cnn")
    res = CliRunner().invoke(cli, ["models", "--verify"])
    assert res.exit_code == 2 and "does not match" in res.output
    proc = subprocess.run([sys.executable, "-m", "robustcaps.cli", "models", "--card", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("Error: no zoo model named 'nope'")


def test_write_card_requires_every_field_and_renders_markdown(tmp_path):
    card = {k: None for k in CARD_FIELDS}
    card.update(name="x", params=12, test_error={"center": 0.05, "multi_crop": 0.04})
    paths = write_card(tmp_path / "x", card)
    assert json.loads(paths["card_json"].read_text()) == card
    md = paths["card_md"].read_text()
    assert "**5.00%**" in md and "**4.00%**" in md
    assert render_card_markdown(card) == md
    del card["sha256"]
    with pytest.raises(ModelLoadError, match="sha256"):
        write_card(tmp_path / "y", card)


def test_repo_zoo_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("ROBUSTCAPS_ZOO", raising=False)
    monkeypatch.setenv("ROBUSTCAPS_BUILTIN_ZOO", "1")
    monkeypatch.chdir(tmp_path)
    assert (REPO / "models").resolve() in [d.resolve() for d in zoo_dirs()]


def test_models_gitignore_keeps_checkpoints_out(tmp_path):
    proc = subprocess.run(["git", "check-ignore", "-q", "models/some-model/checkpoints/last.pt"],
                          cwd=REPO, capture_output=True)
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.returncode == 0
    proc = subprocess.run(["git", "check-ignore", "-q", "models/some-model/weights.pt"], cwd=REPO)
    assert proc.returncode == 1


def _copy_source(dest: Path) -> None:
    for name in ("pyproject.toml", "README.md", "LICENSE", "requirements.txt",
                 "requirements-dev.txt"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "robustcaps", dest / "robustcaps",
                    ignore=shutil.ignore_patterns("__pycache__", "_zoo"))


@pytest.mark.slow
def test_wheel_ships_the_zoo_and_an_installed_copy_loads_it(zoo, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _copy_source(src)
    shutil.copytree(zoo / "toy-cnn", src / "models" / "toy-cnn")  # includes checkpoints/
    assert (src / "models" / "toy-cnn" / "checkpoints" / "last.pt").is_file()
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(tmp_path / "w"),
                    "--no-deps", "--no-build-isolation", "-q"], check=True, timeout=300)
    wheel = next((tmp_path / "w").glob("robustcaps-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    zoo_files = sorted(n for n in names if n.startswith("robustcaps/_zoo/"))
    assert zoo_files == [f"robustcaps/_zoo/toy-cnn/{f}" for f in ("card.json", "card.md", "weights.pt")]
    # The installed copy, run from an unrelated folder, finds and verifies the entry.
    code = ("import robustcaps, json; from robustcaps.models.zoo import list_zoo, load_zoo_model;"
            "m = load_zoo_model('toy-cnn'); e = list_zoo()['toy-cnn'];"
            "print(json.dumps([robustcaps.__file__, str(e.path), sum(p.numel() for p in m.parameters())]))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    env.pop("ROBUSTCAPS_ZOO", None)
    env.pop("ROBUSTCAPS_BUILTIN_ZOO", None)
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    out = subprocess.run([sys.executable, "-c", code], cwd=run_dir, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    module_file, entry_path, params = json.loads(out.stdout)
    assert module_file.startswith(str(tmp_path / "site"))
    assert entry_path == str(tmp_path / "site" / "robustcaps" / "_zoo" / "toy-cnn")
    assert params == json.loads((zoo / "toy-cnn" / "card.json").read_text())["params"]


def test_builtin_zoo_can_be_switched_off(monkeypatch):
    monkeypatch.delenv("ROBUSTCAPS_ZOO", raising=False)
    monkeypatch.setenv("ROBUSTCAPS_BUILTIN_ZOO", "1")
    assert (REPO / "models").resolve() in [d.resolve() for d in zoo_dirs()]
    monkeypatch.setenv("ROBUSTCAPS_BUILTIN_ZOO", "0")
    assert (REPO / "models").resolve() not in [d.resolve() for d in zoo_dirs()]
