"""evaluate(): records, summaries, outputs, resume after an interruption, and the CLI."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import robustcaps
from robustcaps.cli import main
from robustcaps.errors import RobustcapsError
from robustcaps.evaluation import run as engine
from robustcaps.evaluation.config import parse_eps_range, parse_epsilons
from robustcaps.evaluation.records import read_records
from robustcaps.models.adapter import ModelAdapter
from robustcaps.report.tables import SUMMARY_COLUMNS

evaluate = robustcaps.evaluate


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: one thread is faster and immune to oversubscribed CI machines
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


K = 3


def net(seed: int, name: str) -> ModelAdapter:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, K))
    return ModelAdapter(model, input_shape=(1, 8, 8), num_classes=K, device="cpu", name=name)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(30, 1, 8, 8, generator=g), torch.arange(30) % K


def test_records_and_summary(data):
    x, y = data
    r = evaluate([net(0, "a"), net(1, "b")], dataset=(x, y), attack=["fgsm", "bim"],
                 targeted="both", epsilons=[0, 0.1, 0.5], steps=3, batch_size=8, n_samples=30,
                 progress=False)
    rec = r.records
    # untargeted: 2 models x 2 attacks x 3 eps x 30; targeted: x (K-1) targets
    assert len(rec) == 2 * 2 * 3 * 30 + 2 * 2 * 3 * 30 * (K - 1)
    assert not rec.duplicated(["model", "attack", "targeted", "target", "epsilon", "sample"]).any()
    assert list(r.summary.columns[:10]) == SUMMARY_COLUMNS
    u = r.summary[~r.summary["targeted"]]
    for (model, _attack), grp in u.groupby(["model", "attack"]):
        clean = (net(0 if model == "a" else 1, model).predict(x).cpu() == y).double().mean()
        assert grp.set_index("epsilon").loc[0.0, "accuracy"] == pytest.approx(float(clean), abs=0)
    t = rec[rec["targeted"]]
    assert (t["target"] != t["label"]).all()
    assert (t.groupby(["model", "attack", "epsilon", "sample"]).size() == K - 1).all()
    # summary success rate = mean over target classes (equal pair counts per class here)
    for _, row in r.summary[r.summary["targeted"]].iterrows():
        pt = r.per_target[(r.per_target["model"] == row["model"])
                          & (r.per_target["attack"] == row["attack"])
                          & (r.per_target["epsilon"] == row["epsilon"])]
        assert row["success_rate"] == pytest.approx(
            (pt["success_rate"] * pt["n"]).sum() / pt["n"].sum())
    assert (rec["linf"] <= rec["epsilon"] + 1e-6).all()


def _run(out, x, y, **kw):
    return evaluate([net(0, "a"), net(1, "b")], dataset=(x, y), attack=["fgsm", "bim", "transfer"], targeted="both",
                    epsilons=[0, 0.2, 0.6], steps=2, batch_size=7, out=out, progress=False,
                    source=net(2, "src"), transfer_targets=[net(3, "tgt")], figures=False, n_samples=14, **kw)


def _interrupt_at(n: int, monkeypatch):
    """Make the n-th unit of the next run raise KeyboardInterrupt; returns the real runner."""
    real = engine.run_unit
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "run_unit", flaky)
    return real


def test_resume_equals_uninterrupted(tmp_path, data, monkeypatch):
    x, y = data
    full = _run(tmp_path / "full", x, y)
    assert (tmp_path / "full" / "COMPLETE").is_file()

    real = _interrupt_at(6, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", x, y)
    cut = tmp_path / "cut"
    assert not (cut / "COMPLETE").is_file() and not (cut / "records.csv.gz").exists()
    assert json.loads((cut / "manifest.json").read_text())["status"] == "running"
    assert len(list((cut / "chunks").glob("*.csv.gz"))) == 5
    with pytest.raises(RobustcapsError, match="--resume"):
        _run(cut, x, y)  # not silently overwritten

    seen = []
    monkeypatch.setattr(engine, "run_unit", lambda unit, *a, **k: seen.append(unit.key) or real(unit, *a, **k))
    resumed = _run(cut, x, y, resume=True)
    n_units = len(list((tmp_path / "full" / "chunks").glob("*.csv.gz")))
    assert len(seen) == n_units - 5  # finished units were skipped
    pd.testing.assert_frame_equal(resumed.records, full.records)
    pd.testing.assert_frame_equal(read_records(cut / "records.csv.gz"),
                                  read_records(tmp_path / "full" / "records.csv.gz"))
    assert (cut / "COMPLETE").is_file()
    with pytest.raises(RobustcapsError, match="different settings"):
        evaluate([net(0, "a")], dataset=(x, y), attack="fgsm", epsilons=[0, 0.3],
                 out=cut, resume=True, progress=False, figures=False)


def test_outputs_written(tmp_path, data):
    x, y = data
    r = _run(tmp_path / "run", x, y, n_examples=2)
    run = tmp_path / "run"
    for name in ("records.csv.gz", "summary.csv", "summary_per_target.csv", "manifest.json",
                 "table.txt", "COMPLETE"):
        assert (run / name).is_file(), name
    with gzip.open(run / "records.csv.gz", "rt") as f:
        header = f.readline().strip().split(",")
    assert header[:6] == ["model", "attack", "backend", "source", "targeted", "target"]
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "complete" and m["config"]["epsilons"] == [0.0, 0.2, 0.6]
    assert m["data"]["fingerprint"] and m["models"]["a"]["state_sha256"]
    assert "torch" in m["versions"] and m["timings"]["units_seconds"]
    assert "standardised" in m["data"]["eps_units"]
    tr = r.summary[r.summary["attack"] == "transfer-fgsm"]
    assert set(tr["model"]) == {"src", "tgt"} and set(tr["backend"]) == {"transfer:src"}
    assert len(list((run / "examples").glob("*.npz"))) == 4


def test_backend_all_reports_disagreement(data):
    x, y = data
    r = evaluate([net(0, "a")], dataset=(x, y), attack="bim", backend="all",
                 epsilons=[0, 0.1, 0.4], steps=3, early_stop=False, progress=False)
    assert set(r.summary["backend"]) == {"native", "torchattacks", "foolbox"}
    assert len(r.disagreement) == 2 and r.disagreement["max_abs_diff_pp"].max() <= 0.5


def test_parsers():
    assert parse_epsilons("0, 0.05,0.1") == [0.0, 0.05, 0.1]
    assert parse_eps_range("0:0.5:0.05") == pytest.approx(list(np.arange(11) * 0.05))
    for bad in ("0,,1", "a", "-1"):
        with pytest.raises(RobustcapsError):
            parse_epsilons(bad)
    for bad in ("0:1", "0:1:0", "1:0:0.1", "a:b:c"):
        with pytest.raises(RobustcapsError):
            parse_eps_range(bad)


# --------------------------------------------------------------------------- CLI
@pytest.fixture
def npz(tmp_path):
    g = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=g.standard_normal((24, 1, 8, 8)).astype(np.float32),
             y=np.arange(24) % K)
    return path


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


@pytest.mark.parametrize("args, needle", [
    (["--attack", "fgsm", "--epsilons", "0,abc"], "'abc' is not a number"),
    (["--attack", "fgsm", "--epsilons", "0,-0.1"], ">= 0"),
    (["--attack", "pgd2"], "--attack"),
    (["--attack", "fgsm", "--eps-range", "0:1"], "START:STOP:STEP"),
    (["--attack", "fgsm", "--model", "no-such-model"], "no-such-model"),
    (["--epsilons", "0.1"], "--attack"),
])
def test_cli_bad_input(args, needle, capsys, npz, tmp_path):
    code, out, err = _cli(["evaluate", "--dataset", f"npz:{npz}", "-q",
                           "--out", str(tmp_path / "o"), *args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0]


def test_cli_run_and_report(capsys, npz, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = _cli(["evaluate", "--attack", "fgsm", "--dataset", f"npz:{npz}",
                              "--model", "cnn", "--epsilons", "0,0.1,0.3", "--n-samples", "12",
                              "--out", str(out), "-q", "--no-figures"], capsys)
    assert code == 0, err
    assert (out / "COMPLETE").is_file() and str(out / "summary.csv") in stdout
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns[:10]) == SUMMARY_COLUMNS and len(summary) == 3
    code, stdout, err = _cli(["report", str(out), "--no-figures"], capsys)
    assert code == 0 and "accuracy %" in stdout
    assert pd.read_csv(out / "summary.csv").equals(summary)
    # --resume of a finished run reads its settings back and changes nothing
    code, stdout, err = _cli(["evaluate", "--resume", "--out", str(out), "-q", "--no-figures"],
                             capsys)
    assert code == 0, err
    assert pd.read_csv(out / "summary.csv").equals(summary)


def test_resume_from_python_with_the_run_directory_alone(tmp_path, npz, monkeypatch):
    """evaluate(resume=True, out=DIR) reads every setting back from DIR's manifest."""
    settings = dict(dataset=f"npz:{npz}", attack="bim", targeted="both", epsilons=[0, 0.1, 0.3],
                    steps=2, n_samples=12, batch_size=4, figures=False, progress=False)
    full = evaluate(["cnn"], out=tmp_path / "full", **settings)
    real = _interrupt_at(3, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(["cnn"], out=tmp_path / "cut", **settings)
    monkeypatch.setattr(engine, "run_unit", real)
    resumed = evaluate(resume=True, out=tmp_path / "cut", progress=False)
    pd.testing.assert_frame_equal(resumed.records, full.records)
    assert len(resumed.records) == 3 * 12 * K and (tmp_path / "cut" / "COMPLETE").is_file()
    inv = json.loads((tmp_path / "cut" / "manifest.json").read_text())["invocation"]
    assert inv["models"] == ["cnn"] and inv["targeted"] == "both" and inv["steps"] == 2
    with pytest.raises(RobustcapsError, match="different settings"):
        evaluate(resume=True, out=tmp_path / "cut", steps=3, progress=False)
    with pytest.raises(RobustcapsError, match="holds no manifest"):
        evaluate(resume=True, out=tmp_path / "nothing", progress=False)
