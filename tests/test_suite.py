"""TOML attack suites: shipped recipes, validation naming the key, CLI overrides."""

from __future__ import annotations

import numpy as np
import pytest

from robustcaps.cli import main
from robustcaps.errors import RobustcapsError
from robustcaps.evaluation.suite import SUITE_KEYS, find_suite, load_suite, suite_to_kwargs
from robustcaps.utils import repo_root

SHIPPED = ["fgsm", "bim", "transfer", "paper-fig3"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_suites_are_valid(name):
    if repo_root() is None:
        pytest.skip("suites live in the source checkout")
    suite = load_suite(name)
    assert suite["name"] == name
    kw = suite_to_kwargs(suite)
    assert kw["epsilons"][0] == 0.0 and kw["epsilons"][-1] == pytest.approx(0.5)
    assert len(kw["epsilons"]) == 11
    assert set(kw) <= {"attack", "targeted", "models", "dataset", "epsilons", "steps",
                       "early_stop", "loss", "n_samples", "batch_size", "backend", "seed",
                       "source", "transfer_targets", "transfer_attack"}


def test_paper_fig3_settings():
    if repo_root() is None:
        pytest.skip("suites live in the source checkout")
    s = load_suite("paper-fig3")
    assert s["attack"] == ["fgsm", "bim"] and s["mode"] == "both"
    np.testing.assert_allclose(s["epsilons"], np.arange(11) * 0.05, atol=1e-12)


def _write(tmp_path, text):
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, needle", [
    ('attack = "fgsm"\nepsilon = [0.1]\n', "unknown key 'epsilon'"),
    ('attack = "pgd2"\n', "'attack' must be"),
    ('steps = 0\n', "'steps' must be an integer >= 1"),
    ('steps = 2.5\n', "'steps'"),
    ('epsilons = [0.1, -0.2]\n', "'epsilons' must be"),
    ('epsilons = [0.1, 0.1]\n', "duplicates"),
    ('eps_range = "0:1"\n', "'eps_range'"),
    ('epsilons = [0.1]\neps_range = "0:1:0.5"\n', "not both"),
    ('early_stop = "yes"\n', "'early_stop' must be true or false"),
    ('mode = "sideways"\n', "'mode'"),
    ('loss = "hinge"\n', "'loss'"),
    ('models = []\n', "'models'"),
    ('attack = \n', "invalid TOML"),
])
def test_bad_suites(tmp_path, text, needle):
    with pytest.raises(RobustcapsError, match=None) as exc:
        load_suite(_write(tmp_path, text))
    assert needle in str(exc.value)


def test_eps_range_and_keys(tmp_path):
    s = load_suite(_write(tmp_path, 'attack = ["fgsm", "bim"]\neps_range = "0:0.2:0.1"\nsteps = 3\n'))
    assert s["epsilons"] == [0.0, 0.1, 0.2] and "eps_range" not in s
    assert "loss" in SUITE_KEYS
    with pytest.raises(RobustcapsError, match="not found"):
        find_suite(tmp_path / "missing.toml")


def test_cli_suite_with_override(tmp_path, capsys):
    g = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=g.standard_normal((12, 1, 8, 8)).astype(np.float32), y=np.arange(12) % 3)
    suite = _write(tmp_path, f'attack = "fgsm"\nmodels = ["cnn"]\ndataset = "npz:{data}"\n'
                             'epsilons = [0.0, 0.1, 0.2, 0.3]\nn_samples = 9\n')
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--suite", str(suite), "--epsilons", "0,0.5", "--out", str(out), "-q",
              "--no-figures"])
    assert exc.value.code == 0, capsys.readouterr().err
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["epsilons"] == [0.0, 0.5]  # the command line wins
    assert cfg["n_samples"] == 9 and cfg["attacks"] == ["fgsm"]
    bad = _write(tmp_path, 'attacks = "fgsm"\n')
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--suite", str(bad), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "unknown key 'attacks'" in err[0]


def test_suite_model_tables_carry_adapter_options(tmp_path, capsys):
    """A model entry may be a table with adapter options; bad options name the key."""
    import gzip
    import json

    g = np.random.default_rng(1)
    data = tmp_path / "d.npz"
    np.savez(data, x=g.uniform(0, 1, (9, 1, 8, 8)).astype(np.float32), y=np.arange(9) % 3)
    net = tmp_path / "net.py"
    net.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); torch.manual_seed(0); self.fc = torch.nn.Linear(64, 3)\n"
        "    def forward(self, x):\n"
        "        return {'aux': x.sum(), 'logits_out': self.fc(x.flatten(1))}\n"
        "def build():\n"
        "    return Net()\n")
    suite = _write(tmp_path, f'attack = "fgsm"\ndataset = "npz:{data}"\nepsilons = [0.0, 0.1]\n'
                             f'models = [{{spec = "{net}:build", output_key = "logits_out", '
                             'bounds = [0.0, 1.0], name = "mine"}]\n')
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--suite", str(suite), "--out", str(out), "-q", "--no-figures"])
    assert exc.value.code == 0, capsys.readouterr().err
    with gzip.open(out / "records.csv.gz", "rt") as f:
        header = f.readline()
        rows = f.readlines()
    assert len(rows) == 9 * 2 and "mine" in rows[0]
    assert json.loads((out / "config.json").read_text())["n_samples"] == 9
    assert "model" in header
    bad = _write(tmp_path, f'attack = "fgsm"\nmodels = [{{spec = "{net}:build", colour = 1}}]\n')
    with pytest.raises(RobustcapsError, match="colour"):
        load_suite(bad)
