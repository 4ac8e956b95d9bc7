"""Numbers that cannot lie: non-finite scores and model exceptions stop a run, class counts
come from the model, resume keeps provenance, report --out leaves the run alone, Ctrl-C
says how to continue, and identical runs give identical bytes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import click
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from user_models import user_model

import robustcaps
from robustcaps.cli import cli, run_click_main
from robustcaps.errors import NonFiniteError
from robustcaps.evaluation import run as engine
from robustcaps.evaluation.config import parse_eps_range
from robustcaps.models.adapter import ModelAdapter
from robustcaps.training.trainer import Trainer

K = 3


@pytest.fixture
def npz(tmp_path) -> Path:
    g = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=g.standard_normal((12, 1, 8, 8)).astype(np.float32), y=np.arange(12) % K)
    return path


def cli_run(*args: str):
    return CliRunner().invoke(cli, list(args))


def evaluate_args(npz: Path, spec: str, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--attack", "bim", "--steps", "2", "--dataset", f"npz:{npz}",
            "--model", spec, "--epsilons", "0,0.1,0.3", "--out", str(out), "-q", *extra]


def loud(args: list[str]) -> list[str]:
    return [a for a in args if a != "-q"]  # -q would win over -v


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- NaN / exceptions
def test_nan_after_probe_stops_the_run_and_counts_nothing(tmp_path, npz):
    out = tmp_path / "run"
    res = cli_run(*evaluate_args(npz, user_model(tmp_path, "nan"), out, "--both"))
    assert res.exit_code == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "NaN or Inf scores for 12 of 12 inputs during attack bim" in errors[0]
    assert "Traceback" not in res.stderr
    assert not (out / "COMPLETE").exists() and not (out / "summary.csv").exists()
    assert not (out / "records.csv.gz").exists() and not list((out / "chunks").glob("*.csv.gz"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "NaN or Inf scores" in manifest["error"]


class NanGradient(nn.Module):
    """Finite scores, NaN input gradient (sqrt of a negative number, masked by where)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, K)

    def forward(self, x):
        z = torch.where(x > 100, torch.sqrt(x - 100), torch.zeros_like(x))
        return self.fc((x + z).flatten(1))


@pytest.mark.parametrize("backend", ["native", "torchattacks", "foolbox"])
def test_nan_gradients_stop_every_backend(backend):
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6) % K
    adapter = ModelAdapter(NanGradient(), input_shape=(1, 8, 8), device="cpu", name="g")
    with pytest.raises(NonFiniteError, match="NaN or Inf input gradients for 6 of 6 inputs"):
        robustcaps.evaluate([adapter], dataset=(x, y), attack="fgsm", backend=backend,
                            epsilons=[0, 0.1], progress=False)
    assert adapter.check_finite is False  # the guard is switched off again
    # the same model is measurable outside a run (diagnostics count non-finite entries)
    _, grad, _ = adapter.input_gradient(x, y)
    assert torch.isnan(grad).all()


def test_model_raising_mid_attack_is_one_line_and_traceback_at_debug(tmp_path, npz):
    spec = user_model(tmp_path, "raise")
    res = cli_run(*evaluate_args(npz, spec, tmp_path / "run"))
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        f"Error: model {spec!r} raised RuntimeError: boom in forward during attack bim "
        f"(unit bim__{spec.replace('/', '_').replace(':', '_')}__native__u__b00000); "
        "the run stopped and counted nothing of this unit"]
    assert not (tmp_path / "run" / "COMPLETE").exists()
    debug = cli_run(*loud(evaluate_args(npz, spec, tmp_path / "run2")), "-vv")
    assert debug.exit_code == 2
    assert "Traceback" in debug.stderr and 'raise RuntimeError("boom in forward")' in debug.stderr
    assert sum(line.startswith("Error:") for line in debug.stderr.splitlines()) == 1


def test_verbose_logs_data_models_and_units(tmp_path, npz):
    res = cli_run(*loud(evaluate_args(npz, user_model(tmp_path, k=K),
                                      tmp_path / "run")), "--no-figures", "-v")
    assert res.exit_code == 0, res.stderr
    info = [line for line in res.stderr.splitlines() if line.startswith("INFO")]
    assert any("3 classes (from the largest label + 1)" in line for line in info)
    assert any("unit bim__" in line and "36 records" in line for line in info)
    quiet = cli_run(*evaluate_args(npz, user_model(tmp_path, k=K), tmp_path / "q"),
                    "--no-figures")
    assert "INFO" not in quiet.stderr


# --------------------------------------------------------------------------- class counts
def test_class_absent_from_the_file_takes_the_models_count(tmp_path):
    path = tmp_path / "four.npz"  # labels 0..3 for a 5-class model: class 4 is absent
    g = np.random.default_rng(1)
    np.savez(path, x=g.standard_normal((8, 1, 8, 8)).astype(np.float32), y=np.arange(8) % 4)
    out = tmp_path / "run"
    res = cli_run("evaluate", "--attack", "fgsm", "--targeted", "--dataset", f"npz:{path}",
                  "--model", user_model(tmp_path, k=5), "--epsilons", "0,0.2",
                  "--out", str(out), "-q", "--no-figures")
    assert res.exit_code == 0, res.stderr
    rec = pd.read_csv(out / "records.csv.gz")
    assert len(rec) == 8 * 4 * 2  # every sample towards each of the 4 wrong classes
    assert sorted(rec["target"].unique()) == [0, 1, 2, 3, 4]
    data = json.loads((out / "manifest.json").read_text())["data"]
    assert data["num_classes"] == 5 and data["class_names"] == ["0", "1", "2", "3", "4"]


def test_class_names_decide_the_count(tmp_path):
    path = tmp_path / "named.npz"
    g = np.random.default_rng(1)
    np.savez(path, x=g.standard_normal((8, 1, 8, 8)).astype(np.float32), y=np.arange(8) % 4,
             class_names=np.array(["a", "b", "c", "d"]))
    spec = user_model(tmp_path, k=5)
    res = cli_run("evaluate", "--attack", "fgsm", "--dataset", f"npz:{path}", "--model", spec,
                  "--out", str(tmp_path / "r"), "-q")
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        f"Error: model {spec!r} has 5 classes (its scores on a probe batch) "
        f"but dataset 'npz:{path}' has 4 (from 'class_names' in {path})")


# --------------------------------------------------------------------------- report, resume
@pytest.fixture
def complete_run(tmp_path, npz) -> Path:
    out = tmp_path / "run"
    res = cli_run(*evaluate_args(npz, user_model(tmp_path, k=K), out))
    assert res.exit_code == 0, res.stderr
    return out


def test_report_out_writes_elsewhere_and_leaves_the_run_untouched(complete_run, tmp_path):
    before = digest(complete_run)
    other = tmp_path / "other"
    res = cli_run("report", str(complete_run), "--out", str(other), "-q")
    assert res.exit_code == 0, res.stderr
    assert digest(complete_run) == before
    assert (other / "summary.csv").read_bytes() == (complete_run / "summary.csv").read_bytes()
    assert (other / "figures" / "accuracy_vs_epsilon.png").is_file()
    assert str(other / "summary.csv") in res.stdout


def test_resuming_a_complete_run_says_so_and_rewrites_nothing(complete_run):
    before = digest(complete_run)
    res = CliRunner().invoke(cli, ["evaluate", "--resume", "--out", str(complete_run)])
    assert res.exit_code == 0, res.stderr
    assert f"{complete_run} is already complete: nothing to resume" in res.stdout
    stored = robustcaps.evaluate(resume=True, out=complete_run, progress=False)
    assert stored.summary["accuracy"].tolist() == \
        pd.read_csv(complete_run / "summary.csv")["accuracy"].tolist()
    assert len(stored.records) == 12 * 3 and stored.manifest["status"] == "complete"
    assert digest(complete_run) == before


def test_resume_keeps_command_and_started(tmp_path, npz, monkeypatch):
    spec = user_model(tmp_path, k=K)
    out = tmp_path / "cut"
    real, calls = engine.run_unit, []

    def flaky(unit, ctx):
        calls.append(unit.key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(unit, ctx)

    monkeypatch.setattr(engine, "run_unit", flaky)
    res = cli_run(*evaluate_args(npz, spec, out, "--both", "--no-figures"))
    assert res.exit_code == 130
    assert res.stderr.strip() == f"Interrupted: continue with: robustcaps evaluate --resume --out {out}"
    path = out / "manifest.json"
    first = json.loads(path.read_text())
    first.update(command="robustcaps evaluate (the original)", started="2000-01-01T00:00:00")
    path.write_text(json.dumps(first))
    monkeypatch.setattr(engine, "run_unit", real)
    res = cli_run("evaluate", "--resume", "--out", str(out), "-q", "--no-figures")
    assert res.exit_code == 0, res.stderr
    m = json.loads(path.read_text())
    assert m["command"] == "robustcaps evaluate (the original)"
    assert m["started"] == "2000-01-01T00:00:00" and m["status"] == "complete"
    assert len(m["resumes"]) == 1 and m["resumes"][0]["started"] > "2000"


def test_ctrl_c_outside_a_resumable_run_exits_130():
    @click.command()
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        run_click_main(interrupted, [], "robustcaps")
    assert exc.value.code == 130


# --------------------------------------------------------------------------- epsilons
def test_eps_range_includes_stop(tmp_path, npz):
    assert parse_eps_range("0:0.5:0.3") == [0.0, 0.3, 0.5]
    assert parse_eps_range("0:0.3:0.1") == [0.0, 0.1, 0.2, 0.3]  # 0.3/0.1 = 2.9999999999999996
    assert parse_eps_range("0.1:0.1:1") == [0.1]
    assert parse_eps_range("0:0.5:0.05") == pytest.approx(list(np.arange(11) * 0.05))
    res = cli_run("evaluate", "--attack", "fgsm", "--dataset", f"npz:{npz}", "--model",
                  user_model(tmp_path, k=K), "--eps-range", "0:0.5:0.3",
                  "--out", str(tmp_path / "r"), "-q", "--no-figures")
    assert res.exit_code == 0, res.stderr
    assert sorted(pd.read_csv(tmp_path / "r" / "summary.csv")["epsilon"]) == [0.0, 0.3, 0.5]


# --------------------------------------------------------------------------- reproducibility
def test_identical_runs_give_identical_bytes(tmp_path, npz):
    spec = user_model(tmp_path, k=K)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        res = cli_run(*evaluate_args(npz, spec, out, "--both"))
        assert res.exit_code == 0, res.stderr
        runs.append(out)
    a, b = runs
    figures = sorted(p.relative_to(a) for p in (a / "figures").iterdir())
    assert {p.suffix for p in figures} == {".png", ".svg"} and len(figures) >= 4
    for rel in [Path("records.csv.gz"), Path("summary.csv"), Path("summary_per_target.csv"),
                *figures]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "records.csv.gz").read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime 0


def test_ctrl_c_during_train_checkpoints_exits_130_and_resumes(tmp_path, monkeypatch):
    g = np.random.default_rng(0)
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", x=g.standard_normal((32, 1, 32, 32)).astype(np.float32),
                 y=np.arange(32) % K)
    out = tmp_path / "m"
    cmd = ["train", "--model", "cnn", "--dataset", f"npz:{tmp_path / 'train.npz'}",
           "--test-dataset", f"npz:{tmp_path / 'test.npz'}", "--epochs", "1", "--batch-size", "16",
           "--arch-kw", "channels=[4, 8]", "--arch-kw", "hidden=16", "--no-multi-crop",
           "--out", str(out), "-q"]
    real = Trainer.train_step

    def ctrl_c_at_first_step(self, x, y):
        if self.global_step == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_at_first_step)
    res = cli_run(*cmd)
    assert res.exit_code == 130, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"Interrupted: checkpoint written; continue with the same command plus --resume --out {out}")
    assert (out / "checkpoints" / "last.pt").is_file() and not (out / "card.json").exists()
    monkeypatch.setattr(Trainer, "train_step", real)
    res = cli_run(*cmd, "--resume")
    assert res.exit_code == 0, res.stderr
    assert json.loads((out / "card.json").read_text())["epochs"] == 1
