"""Runs on several processes give the records of one process (issue 16).

Real processes: torch's launcher (``python -m torch.distributed.run``, gloo on the CPU) with
2 and 3 ranks, a rank killed mid-run and the run resumed on 3, and ``--shard I/N``
processes merged by the last shard, with ``report`` naming a missing shard. The models are
two small CNNs fitted on blobs (test_golden_records' models), saved as TorchScript so every
process loads the same weights.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_golden_records import K, _blobs, _fit  # tests/ is on sys.path

from robustcaps.attacks.pgd import PGD
from robustcaps.attacks.registry import attack_entry
from robustcaps.errors import RobustcapsError
from robustcaps.evaluation.config import EvaluationConfig, OutputSettings
from robustcaps.evaluation.distributed import assign, parse_shard
from robustcaps.evaluation.run import evaluate
from robustcaps.evaluation.seeding import takes_seed, unit_seed
from robustcaps.models.adapter import ModelAdapter

N_UNITS = 24  # bim x 2 models x (untargeted, targeted) x 6 batches of 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scale")
    for name, seed, hidden in (("a", 0, 4), ("b", 1, 6)):
        model = _fit(seed, name, hidden).model
        torch.jit.trace(model, torch.zeros(1, 1, 8, 8)).save(str(d / f"{name}.pt"))
    x, y = _blobs(24, seed=7)
    np.savez(d / "data.npz", x=x.numpy(), y=y.numpy(), bounds=np.array([0.0, 1.0]))
    return d


def _args(d: Path, out: Path) -> list[str]:
    return ["evaluate", "--dataset", f"npz:{d / 'data.npz'}", "--model", str(d / "a.pt"),
            "--model-name", "a", "--model", str(d / "b.pt"), "--model-name", "b",
            "--attack", "bim", "--both", "--epsilons", "0,0.05,0.1,0.2,0.3", "--steps", "8",
            "--n-samples", "24", "--batch-size", "4", "--device", "cpu", "--no-figures",
            "--out", str(out)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(args: list[str], nproc: int | None) -> list[str]:
    if nproc is None:
        return [sys.executable, "-m", "robustcaps", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(_free_port()), "-m", "robustcaps", *args]


def _run(args: list[str], nproc: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(args, nproc), env=ENV, capture_output=True, text=True,
                          timeout=240)


def _sorted_records(run: Path) -> bytes:
    df = pd.read_csv(io.BytesIO(gzip.decompress((run / "records.csv.gz").read_bytes())))
    return df.sort_values(list(df.columns), kind="stable").to_csv(index=False).encode()


@pytest.fixture(scope="module")
def reference(files) -> bytes:
    p = _run([*_args(files, files / "single"), "-q"])
    assert p.returncode == 0, p.stderr
    return _sorted_records(files / "single")


@pytest.mark.parametrize("nproc", [2])
def test_torchrun_ranks_give_the_single_process_records(files, reference, nproc):
    # 3 ranks: the resumed run below (and the 3 shards) compare with the same records
    out = files / f"ranks{nproc}"
    p = _run(_args(files, out), nproc)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _sorted_records(out) == reference
    assert (out / "COMPLETE").is_file()
    assert p.stdout.count("files:") == 1  # only rank 0 prints the table
    scale = json.loads((out / "manifest.json").read_text())["scale"]
    assert scale["mode"] == "torchrun" and scale["world_size"] == nproc
    assert [w["rank"] for w in scale["workers"]] == list(range(nproc))
    assert sum(w["units"] for w in scale["workers"]) == N_UNITS
    assert all(w["units"] > 0 for w in scale["workers"])
    assert scale["imbalance"] >= 0.0


def _claimed_in_flight(out: Path, worker: str) -> int | None:
    """The pid of ``worker`` while it holds a claim on a unit with no chunk yet."""
    for c in (out / "claims").glob("*"):
        try:
            info = json.loads(c.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if info["worker"] == worker and not (out / "chunks" / f"{c.name}.csv.gz").exists():
            return info["pid"]
    return None


def _kill_rank_mid_unit(out: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "chunks").glob("*.csv.gz"))) >= 3:
            pid = _claimed_in_flight(out, "rank 1/2")
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                return
        time.sleep(0.002)
    pytest.fail("the run ended before a rank could be killed")


def test_killed_rank_resumes_on_another_process_count(files, reference):
    out = files / "killed"
    proc = subprocess.Popen(_cmd([*_args(files, out), "-q"], 2), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_rank_mid_unit(out, proc)
    assert proc.wait(timeout=120) != 0
    report = _run(["report", str(out)])
    assert report.returncode == 2
    assert report.stderr.startswith("Error: ") and report.stderr.count("\n") == 1
    assert "units have no records" in report.stderr
    done = len(list((out / "chunks").glob("*.csv.gz")))
    assert done < N_UNITS
    p = _run(["evaluate", "--resume", "--out", str(out), "-q"], 3)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _sorted_records(out) == reference
    scale = json.loads((out / "manifest.json").read_text())["scale"]
    assert scale["world_size"] == 3
    assert sum(w["units"] for w in scale["workers"]) == N_UNITS - done  # only the lost ones
    logged = [json.loads(ln)["unit"] for log in (out / "chunks").glob("done*.jsonl")
              for ln in log.read_text().splitlines()]
    assert len(logged) == len(set(logged))  # no unit ran twice


def test_shards_merge_when_all_are_done_and_name_the_missing_one(files, reference):
    out = files / "shards"
    procs = [subprocess.Popen(_cmd([*_args(files, out), "-q", "--shard", f"{i}/3"], None),
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in (0, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    report = _run(["report", str(out)])
    assert report.returncode == 2
    assert report.stderr.startswith("Error: ") and report.stderr.count("\n") == 1
    assert "shards not finished: 1/3" in report.stderr
    assert not (out / "records.csv.gz").exists()
    last = _run([*_args(files, out), "--shard", "1/3"])
    assert last.returncode == 0, last.stderr[-3000:]
    assert "files:" in last.stdout  # the last shard merged
    assert _sorted_records(out) == reference
    scale = json.loads((out / "manifest.json").read_text())["scale"]
    assert scale["mode"] == "shard" and scale["world_size"] == 3
    assert sorted(w["units"] for w in scale["workers"]) == [8, 8, 8]


# --------------------------------------------------------------------------- in process
def _config(models, out: Path | None, seed: int = 5) -> EvaluationConfig:
    return EvaluationConfig.from_kwargs(
        models=models, dataset=_blobs(12, seed=3), attack="bim", epsilons=[0.0, 0.1, 0.2],
        steps=3, batch_size=3, seed=seed,
        output=OutputSettings(out=out, figures=False, progress=False))


def test_seeded_attack_is_independent_of_the_split(files, tmp_path, monkeypatch):
    # PGD (random starts seeded per sample) stands in for "bim" until the registry lists it
    monkeypatch.setitem(attack_entry("bim").implementations, "native", PGD)
    assert takes_seed("bim", "native")
    models = [ModelAdapter(torch.jit.load(str(files / "a.pt")), input_shape=(1, 8, 8),
                           num_classes=K, bounds=(0.0, 1.0), device="cpu", name="a")]
    single = evaluate(_config(models, tmp_path / "single")).records
    out = tmp_path / "run"
    first = evaluate(_config(models, out), workers=parse_shard("1/2"))  # order reversed
    assert not first.complete and len(first.records) < len(single)
    merged = evaluate(_config(models, out), workers=parse_shard("0/2"))
    assert merged.complete
    pd.testing.assert_frame_equal(merged.records, single)
    other = evaluate(_config(models, tmp_path / "other", seed=6)).records
    assert not np.allclose(other["l2"], single["l2"])  # the run seed reaches the starts


def test_unit_seeds_and_cost_weighted_shares():
    assert unit_seed(0, "bim__a__native__u__b00000") == unit_seed(0, "bim__a__native__u__b00000")
    assert unit_seed(0, "bim__a__native__u__b00000") != unit_seed(1, "bim__a__native__u__b00000")
    assert not takes_seed("fgsm", "native")
    costs = [40.0] * 6 + [10.0] * 6 + [1.0] * 5
    shares = assign(costs, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert loads == [101.0, 101.0, 103.0] or max(loads) - min(loads) <= 2.0
    assert assign(costs, 3) == shares  # every shard computes the same split
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(RobustcapsError, match="--shard"):
            parse_shard(bad)


# --------------------------------------------------------------------------- training
def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes told apart by the row of a bright bar (as in test_train), 2x36x36."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 2, 36, 36, generator=g) * 0.5
    for k in range(3):
        x[y == k, :, 4 + 9 * k:12 + 9 * k, 4:32] += 2.0
    return x.numpy(), y.numpy()


def test_ddp_training_follows_the_single_process_loss_curve(tmp_path):
    for name, n, seed in (("train", 96, 0), ("test", 48, 1)):
        x, y = _toy(n, seed)
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    # without dropout (its masks are drawn per rank) a step on 2 ranks is the same step
    args = ["train", "--model", "cnn", "--dataset", f"npz:{tmp_path / 'train.npz'}",
            "--test-dataset", f"npz:{tmp_path / 'test.npz'}", "--arch-kw", "channels=[4,8]",
            "--arch-kw", "hidden=16", "--arch-kw", "dropout=0", "--epochs", "3",
            "--batch-size", "16", "--device", "cpu", "-q"]
    curves = []
    for nproc, out in ((None, "one"), (2, "two")):
        p = _run([*args, "--out", str(tmp_path / out)], nproc)
        assert p.returncode == 0, p.stderr[-3000:]
        curves.append(pd.read_csv(tmp_path / out / "metrics.csv"))
    one, two = curves
    assert list(one["step"]) == list(two["step"]) == [6, 12, 18]
    assert one["train_loss"].iloc[-1] < one["train_loss"].iloc[0] - 0.1  # it learns
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(two["train_acc"], one["train_acc"], atol=1e-9)
    assert (tmp_path / "two" / "card.json").is_file()
