"""``robustcaps inspect routing`` (paper Fig. 2 / B.2): per-iteration class-layer routing."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from robustcaps.cli import cli
from robustcaps.models.registry import create_model
from robustcaps.report import routing as rr

NAMES = ["a", "b", "c", "d", "e"]


def _model(**kw):
    torch.manual_seed(0)
    return create_model("capsnet-small", **kw).eval()


def _x(n=3, seed=1):
    return torch.randn(n, 2, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", [{"iterations": 3}, {"iterations": 1}, {"iterations": 2, "pose": "vector"},
                                {"iterations": 2, "coord_add": False}])
def test_final_iteration_matches_the_model(kw):
    model, x = _model(**kw), _x()
    trace = rr.trace_routing(model, x)
    with torch.no_grad():
        out = model(x, return_all=True)
    cls = out["layers"][-1]
    n, e = cls["logits"].shape
    # The model routes with the native/chunked passes, the trace with the plain torch ones:
    # the same arithmetic up to float32 rounding.
    torch.testing.assert_close(trace.means[-1], cls["poses"].reshape(n, e, 16), rtol=0, atol=2e-5)
    torch.testing.assert_close(trace.logits[-1], cls["logits"], rtol=0, atol=2e-5)
    torch.testing.assert_close(trace.R[-1], cls["R"].reshape(n, e, -1), rtol=0, atol=2e-5)
    assert torch.equal(trace.logits[-1].argmax(-1), out["logits"].argmax(-1))


def _procedure1(votes, a, beta_a, beta_u, lambdas):
    """Procedure 1 for one sample's class layer, float64, every iteration kept (the
    constants of tests/reference_em.py): [(mu (E, 16), logits (E,), R (E, J))]."""
    e, j, _ = votes.shape
    r, steps = torch.full((e, j), 1.0 / e, dtype=torch.float64), []
    for lam in lambdas:
        rw = (r * a)[..., None]
        mass = rw.sum(1)
        mu = (rw * votes).sum(1) / (mass + 1e-8)
        var = (rw * (votes - mu[:, None]) ** 2).sum(1) / (mass + 1e-8) + 1e-4
        logit = lam * (beta_a - ((beta_u[:, None] + 0.5 * var.log()) * mass / (j / e)).sum(1))
        steps.append((mu, logit, r))
        log_p = (-0.5 * (votes - mu[:, None]) ** 2 / var[:, None]
                 - 0.5 * torch.log(2 * math.pi * var[:, None])).sum(-1)
        r = (torch.nn.functional.logsigmoid(logit)[:, None] + log_p).softmax(0)
    return steps


def test_every_iteration_matches_an_independent_procedure_1():
    model = _model(iterations=3)
    trace = rr.trace_routing(model, _x(2))
    layer = model.classcaps
    lambdas = [layer.final_lambda * (t + 1) / 3 for t in range(3)]
    for b in range(2):
        steps = _procedure1(trace.votes[b].double(), trace.a_in[b].double(), layer.beta_a.double(),
                            layer.beta_u.double(), lambdas)
        for t, (mu, logit, r) in enumerate(steps):
            torch.testing.assert_close(trace.means[t, b].double(), mu, rtol=0, atol=1e-5)
            torch.testing.assert_close(trace.logits[t, b].double(), logit, rtol=0, atol=1e-5)
            torch.testing.assert_close(trace.R[t, b].double(), r, rtol=0, atol=1e-5)


def test_shapes_and_assignment_weights():
    trace = rr.trace_routing(_model(iterations=3), _x())
    j = 4 * 4 * 16  # ConvCaps2 of capsnet-small at 32x32: 4x4 positions, D = 16 types
    assert trace.votes.shape == (3, 5, j, 16) and trace.a_in.shape == (3, j)
    assert trace.means.shape == (3, 3, 5, 16) and trace.R.shape == (3, 3, 5, j)
    assert trace.logits.shape == (3, 3, 5) and trace.child_shape == (4, 4, 16)
    assert trace.distances.shape == (3, 3, 5, j)
    # Every child's assignments sum to 1 over the 5 classes, every iteration; iteration 1 is
    # Procedure 1's uniform start, and the later ones have moved away from it.
    torch.testing.assert_close(trace.R.sum(2), torch.ones(3, 3, j))
    assert torch.all(trace.R[0] == 0.2)
    assert (trace.R[2] - 0.2).abs().max() > 0.05
    manual = (trace.votes[1, 2, 7] - trace.means[1, 1, 2]).pow(2).sum().sqrt()
    torch.testing.assert_close(trace.distances[1, 1, 2, 7], manual)


def test_tables_hold_every_vote_and_weight(tmp_path):
    model, x = _model(iterations=2), _x(4)
    y = torch.tensor([0, 1, 2, 3])
    res = rr.inspect_routing(model, x, y, [2, 0, 2], NAMES, tmp_path, zoom=0.5, full_bins=50)
    votes = pd.read_csv(tmp_path / "votes.csv")
    hist = pd.read_csv(tmp_path / "histograms.csv")
    assert list(votes.columns) == rr.VOTE_COLUMNS and list(hist.columns) == rr.HIST_COLUMNS
    assert len(votes) == 2 * 2 * 5 * 256  # samples (repeat dropped) x iterations x classes x children
    per_panel = votes.groupby(["sample", "iteration"])["weight"].sum()
    np.testing.assert_allclose(per_panel, 256, rtol=1e-4)
    full = hist[hist["view"] == "full"].groupby(["sample", "iteration"])["weight"].sum()
    np.testing.assert_allclose(full, 256, rtol=1e-4)  # the full range holds every vote
    zoom = hist[hist["view"] == "zoom"].groupby(["sample", "iteration"])["weight"].sum()
    below = votes[votes["distance"] < 0.5].groupby(["sample", "iteration"])["weight"].sum()
    np.testing.assert_allclose(zoom, below.reindex(zoom.index, fill_value=0), rtol=1e-4, atol=1e-6)
    assert hist[hist["view"] == "zoom"]["bin_hi"].max() == pytest.approx(0.5)
    np.testing.assert_allclose(res.summary.groupby(["sample", "iteration"])["weight"].sum(), 256, rtol=1e-4)
    assert sorted(p.name for p in res.figures) == ["routing-0-full.png", "routing-0-zoom.png",
                                                   "routing-2-full.png", "routing-2-zoom.png"]
    assert all(p.stat().st_size > 10_000 for p in res.figures)


class _Fixed(torch.nn.Module):
    def __init__(self, preds):
        super().__init__()
        self.preds = torch.tensor(preds)

    def forward(self, x):
        return torch.nn.functional.one_hot(self.preds[x[:, 0, 0, 0].long()], 5).float()


def test_pick_sample_takes_the_lowest_index_across_batches():
    x = torch.arange(7.0).reshape(7, 1, 1, 1)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    model = _Fixed([0, 1, 2, 0, 4, 1, 1])  # index 3 is the first wrong one, 0 the first right
    assert rr.pick_sample(model, x, y, "correct", batch_size=2) == 0
    assert rr.pick_sample(model, x, y, "confused", batch_size=2) == 3
    with pytest.raises(rr.RobustcapsError, match="no confused sample"):
        rr.pick_sample(model, x[:3], y[:3], "confused")


def _data(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(6, 2, 32, 32)).astype(np.float32),
             y=np.arange(6) % 5)
    return f"npz:{tmp_path / 'd.npz'}"


def test_command_writes_figures_and_csvs(tmp_path):
    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["inspect", "routing", "--model", "capsnet-small", "--dataset",
                                   _data(tmp_path), "--index", "4", "--index", "1", "--zoom", "1",
                                   "--bins", "40", "--out", str(out), "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert {"routing-4-zoom.png", "routing-4-full.png", "routing-1-zoom.png", "votes.csv",
            "histograms.csv", "summary.csv"} <= names
    hist = pd.read_csv(out / "histograms.csv")
    assert len(hist[hist["view"] == "full"]) == 2 * 3 * 5 * 40  # samples x iterations x classes x bins
    assert str(out / "summary.csv") in res.output


@pytest.mark.parametrize("args, fragment", [
    (["--index", "6"], "index 6 is outside the data (0..5)"),
    (["--model", "cnn", "--index", "0"], "needs an EM-routing capsule network"),
    ([], "give at least one --index or --pick"),
])
def test_bad_input_is_one_error_line_exit_2(tmp_path, args, fragment):
    proc = subprocess.run([sys.executable, "-m", "robustcaps.cli", "inspect", "routing", "--dataset",
                           _data(tmp_path), "--device", "cpu", "-q", "--out", str(tmp_path / "o"), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    if args[:2] == ["--model", "cnn"]:  # loading an untrained architecture warns first
        lines = [line for line in lines if not line.startswith("WARNING ")]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], proc.stderr
