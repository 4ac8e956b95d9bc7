"""The training engine: exact resume, NaN handling, stop-at-error, cards, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from robustcaps.cli import cli
from robustcaps.errors import RobustcapsError
from robustcaps.training import TrainConfig, Trainer, TrainingDiverged, train
from robustcaps.utils import sha256_file

TINY_CNN = {"channels": [4, 8], "hidden": 16}


@dataclass
class Toy:
    """Three classes told apart by the row of a bright bar; 36x36 so training crops to 32."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int = 3
    name: str = "toy"
    meta: dict = field(default_factory=dict)


def toy(n: int, seed: int, size: int = 36) -> Toy:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 2, size, size, generator=g) * 0.5
    for k in range(3):
        x[y == k, :, 4 + 9 * k:12 + 9 * k, 4:size - 4] += 2.0
    return Toy(x, y, meta={"instance": np.arange(n) % 5})


def run(out: Path, **kw):
    base = dict(epochs=2, out=out, seed=3, train_data=toy(96, 0), test_data=toy(48, 1),
                batch_size=16, arch_kwargs=TINY_CNN, progress=False)
    return train("cnn", **{**base, **kw})


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "weights.pt", weights_only=True)


def test_resume_mid_epoch_and_across_epochs_equals_uninterrupted(tmp_path):
    # Dropout (global RNG), augmentation (per-step generators), the data order and Adam's
    # moments must all continue exactly: the final weights are bit-identical.
    full = run(tmp_path / "full")
    assert full["status"] == "finished" and full["global_step"] == 12
    first = run(tmp_path / "parts", stop_after_steps=4)  # mid-epoch 1 (6 steps per epoch)
    assert first["status"] == "paused" and first["global_step"] == 4 and first["card"] is None
    assert not (tmp_path / "parts" / "weights.pt").exists()
    second = run(tmp_path / "parts", resume=True, stop_after_steps=5)  # across the epoch end
    assert second["status"] == "paused" and second["global_step"] == 9
    last = run(tmp_path / "parts", resume=True)
    assert last["status"] == "finished" and last["global_step"] == 12
    a, b = weights(tmp_path / "full"), weights(tmp_path / "parts")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = [{k: v for k, v in r.items() if k != "train_time_s"} for r in full["history"]]
    assert strip == [{k: v for k, v in r.items() if k != "train_time_s"} for r in last["history"]]
    # One metrics row per epoch, no duplicates after two resumptions.
    lines = (tmp_path / "parts" / "metrics.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[1].startswith("1,6,") and lines[2].startswith("2,12,")
    # A different seed gives different weights (the comparison above can fail).
    other = run(tmp_path / "other", seed=4)
    assert other["status"] == "finished"
    c = weights(tmp_path / "other")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_capsnet_spread_loss_run_resumes_exactly(tmp_path):
    # The EM-routing network with the spread loss and its margin schedule, tiny widths.
    caps = dict(arch_kwargs={"A": 8, "B": 4, "C": 4, "D": 4, "iterations": 2}, batch_size=8,
                train_data=toy(24, 0), test_data=toy(8, 1))
    full = train("capsnet-small", epochs=2, out=tmp_path / "full", seed=0, progress=False, **caps)
    assert full["card"]["training"]["loss"] == "spread" and full["card"]["outputs"] == "capsule_logits"
    assert full["card"]["params"] == sum(v.numel() for v in weights(tmp_path / "full").values())
    part = train("capsnet-small", epochs=2, out=tmp_path / "part", seed=0, progress=False,
                 stop_after_steps=2, **caps)
    assert part["status"] == "paused"
    train("capsnet-small", epochs=2, out=tmp_path / "part", seed=0, progress=False, resume=True,
          **caps)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["card"]["test_error"] == json.loads((tmp_path / "part" / "card.json").read_text())["test_error"]


def test_checkpoint_every_steps_allows_resume_after_a_crash(tmp_path):
    full = run(tmp_path / "full", epochs=1)
    calls = []

    def crash(row):  # evaluation rows every 2 steps; die at the second one (step 4)
        calls.append(row["step"])
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crash", epochs=1, checkpoint_every=3, eval_every_steps=2, callback=crash)
    state = torch.load(tmp_path / "crash" / "checkpoints" / "last.pt", weights_only=True)
    assert state["global_step"] == 3 and state["batch"] == 3
    resumed = run(tmp_path / "crash", epochs=1, checkpoint_every=3, eval_every_steps=2,
                  resume=True)
    full_e = run(tmp_path / "full_e", epochs=1, eval_every_steps=2)
    for k, v in weights(tmp_path / "full").items():
        assert torch.equal(v, weights(tmp_path / "crash")[k])
    assert [r["step"] for r in resumed["history"]] == [2, 4, 6]
    assert [r["test_error"] for r in resumed["history"]] == [r["test_error"] for r in full_e["history"]]
    assert full["status"] == "finished"


def test_sigint_checkpoints_at_the_next_step_and_resumes_exactly(tmp_path):
    def interrupt(row):  # a Ctrl-C while evaluating at step 2
        if row["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    paused = run(tmp_path / "sig", epochs=1, eval_every_steps=2, callback=interrupt)
    assert paused["status"] == "paused" and paused["global_step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    run(tmp_path / "sig", epochs=1, eval_every_steps=2, resume=True)
    run(tmp_path / "ref", epochs=1, eval_every_steps=2)
    for k, v in weights(tmp_path / "ref").items():
        assert torch.equal(v, weights(tmp_path / "sig")[k])


def test_learns_the_toy_problem_and_writes_a_sound_card(tmp_path):
    res = run(tmp_path / "m", epochs=4, val_fraction=0.25, name="toy-cnn")
    card = res["card"]
    # Chance is 2/3 error; the bars are obvious, so a tiny CNN gets far below it.
    assert card["test_error"]["center"] < 0.2
    assert card["test_error"]["multi_crop"] is not None and card["test_error"]["multi_crop"] < 0.3
    assert card["sha256"] == sha256_file(tmp_path / "m" / "weights.pt")
    assert card["name"] == "toy-cnn" and card["arch"] == "cnn" and card["input_shape"] == [2, 32, 32]
    assert card["n_train"] + card["n_val"] == 96 and card["n_val"] == pytest.approx(24, abs=2)
    assert card["params"] == sum(v.numel() for v in weights(tmp_path / "m").values())
    assert card["epochs"] == 4 and card["steps"] == 4 * 5
    assert set(card["data_fingerprint"]) == {"train", "test", "val"}
    assert json.loads((tmp_path / "m" / "card.json").read_text()) == json.loads(json.dumps(card))
    assert "toy-cnn" in (tmp_path / "m" / "card.md").read_text()
    rows = (tmp_path / "m" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 5 and "val_error" in rows[0]


def test_multi_crop_error_matches_an_independent_average_of_five_crops(tmp_path):
    res = run(tmp_path / "m", epochs=1)
    tr = Trainer(TrainConfig(model="cnn", out=str(tmp_path / "m"), arch_kwargs=TINY_CNN,
                             progress=False, resume=True, seed=3, epochs=1, batch_size=16),
                 toy(96, 0), toy(48, 1))
    tr.model.load_state_dict(weights(tmp_path / "m"))
    tr.model.eval()
    test = toy(48, 1)
    with torch.no_grad():
        probs = [tr.model(test.x[:, :, t:t + 32, left:left + 32]).softmax(1)
                 for t, left in [(2, 2), (0, 0), (0, 4), (4, 0), (4, 4)]]
    oracle = float((torch.stack(probs).mean(0).argmax(1) != test.y).float().mean())
    assert res["card"]["test_error"]["multi_crop"] == pytest.approx(oracle, abs=1e-9)
    with torch.no_grad():
        center = float((tr.model(test.x[:, :, 2:34, 2:34]).argmax(1) != test.y).float().mean())
    assert res["card"]["test_error"]["center"] == pytest.approx(center, abs=1e-9)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    bad = toy(96, 0)
    bad.x[40] = float("nan")  # some batch of epoch 1 holds it
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        run(out, train_data=bad, checkpoint_every=1)
    ckpt = out / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    digest = sha256_file(ckpt)
    with pytest.raises(TrainingDiverged):
        run(out, train_data=bad, checkpoint_every=1, resume=True)
    assert sha256_file(ckpt) == digest  # the failing resume did not touch it
    assert not (out / "weights.pt").exists()


def test_stop_at_error_on_validation(tmp_path):
    res = run(tmp_path / "s", epochs=6, val_fraction=0.25, stop_at_error=0.34, stop_on="val",
              eval_every_steps=1)
    assert res["status"] == "stopped" and res["card"]["status"] == "stopped"
    vals = [r["val_error"] for r in res["history"]]
    assert vals[-1] <= 0.34 and all(v > 0.34 for v in vals[:-1])
    assert res["global_step"] < 6 * 5
    assert "val error" in res["card"]["stop_reason"]


def test_eval_samples_limits_evaluations_during_training_not_the_final_error(tmp_path):
    res = run(tmp_path / "e", eval_samples=20, val_fraction=0.25)
    assert [r["eval_samples"] for r in res["history"]] == [20, 20]
    card = res["card"]
    assert card["n_test"] == 48 and card["training"]["eval_samples"] == 20
    # The final error is over all 48 test images: a multiple of 1/48, re-evaluated at the end.
    assert card["test_error"]["center"] * 48 == pytest.approx(round(card["test_error"]["center"] * 48))
    assert "--eval-samples 20" in TrainConfig(model="cnn", out="o", eval_samples=20).command_line()


def test_spread_loss_margin_grows_linearly(tmp_path):
    res = run(tmp_path / "sp", loss="spread", epochs=2)
    margins = [r["margin"] for r in res["history"]]
    # 12 steps in all: the margin of the last step of epoch 1 (step 5) and epoch 2 (step 11).
    assert margins == pytest.approx([0.2 + 0.7 * 5 / 11, 0.9])
    assert res["card"]["training"]["loss"] == "spread"


def test_bad_resumes_and_options(tmp_path):
    run(tmp_path / "r", epochs=1)
    with pytest.raises(RobustcapsError, match="--resume"):
        run(tmp_path / "r", epochs=1)
    with pytest.raises(RobustcapsError, match="epochs"):
        run(tmp_path / "r", epochs=3, resume=True)
    (tmp_path / "r" / "checkpoints" / "last.pt").unlink()  # a committed zoo entry has none
    with pytest.raises(RobustcapsError, match="already holds a model"):
        run(tmp_path / "r", epochs=1)
    first = (tmp_path / "r" / "card.json").read_text()
    run(tmp_path / "r", epochs=1, seed=5, stop_after_steps=1, overwrite=True)
    assert not (tmp_path / "r" / "card.json").exists()  # no stale card beside a new run
    assert json.loads(first)["seed"] == 3
    with pytest.raises(RobustcapsError, match="nothing to resume"):
        run(tmp_path / "none", resume=True)
    with pytest.raises(RobustcapsError, match="validation split"):
        run(tmp_path / "v", stop_at_error=0.1, stop_on="val")
    with pytest.raises(RobustcapsError, match="no instance"):
        run(tmp_path / "v", val_instances=(1,), train_data=Toy(toy(8, 0).x, toy(8, 0).y))
    with pytest.raises(RobustcapsError, match=r"val instances \[7\]"):
        run(tmp_path / "v", val_instances=(7,))


@pytest.mark.parametrize("args, fragment", [
    (["train", "--model", "cnn"], "--out is required"),
    (["train", "--model", "nope", "--out", "{tmp}/x"], "unknown architecture"),
    (["train", "--model", "cnn", "--resume", "--out", "{tmp}/x"], "nothing to resume"),
    (["train", "--model", "cnn", "--stop-at-error", "2", "--out", "{tmp}/x"], "stop-at-error"),
    (["train", "--model", "cnn", "--val-instances", "a,b", "--out", "{tmp}/x"], "integers"),
    (["train", "--model", "cnn", "--dataset", "npz:{tmp}/missing.npz", "--out", "{tmp}/x"],
     "not found"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, args, fragment):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args, prog_name="robustcaps")  # the console script's error handling
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert fragment.lower() in lines[0].lower()


def test_cli_error_seen_by_a_user(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "robustcaps.cli", "train", "--model", "cnn",
                           "--on", "val", "--stop-at-error", "0.1", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("Error: --on val needs a validation split: give "
                                   "--val-instances or --val-fraction")


def test_cli_trains_an_npz_dataset_and_models_lists_it(tmp_path, monkeypatch):
    for split, seed in (("train", 0), ("test", 1)):
        d = toy(64 if split == "train" else 32, seed, size=32)
        np.savez(tmp_path / f"{split}.npz", x=d.x.numpy(), y=d.y.numpy())
    zoo = tmp_path / "zoo"
    cmd = ["train", "--model", "cnn", "--dataset", f"npz:{tmp_path / 'train.npz'}",
           "--test-dataset", f"npz:{tmp_path / 'test.npz'}", "--epochs", "2", "--batch-size", "16", "--arch-kw", "channels=[4, 8]",
           "--arch-kw", "hidden=16", "--out", str(zoo / "toy-npz"), "-q"]
    res = CliRunner().invoke(cli, cmd, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    card = json.loads((zoo / "toy-npz" / "card.json").read_text())
    assert card["command"].startswith("robustcaps train --model cnn --dataset npz:")
    # Interrupted and resumed through the CLI: the same weights (sha256) as in one go.
    cmd_b = [*cmd[:-2], str(tmp_path / "b"), "-q"]
    paused = CliRunner().invoke(cli, [*cmd_b, "--stop-after-steps", "3"], catch_exceptions=False)
    assert paused.exit_code == 0 and "resume" in paused.output
    res = CliRunner().invoke(cli, [*cmd_b, "--resume"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b" / "card.json").read_text())["sha256"] == card["sha256"]
    assert card["test_error"]["multi_crop"] is None  # 32x32 data: nothing to crop
    monkeypatch.setenv("ROBUSTCAPS_ZOO", str(zoo))
    rows = json.loads(CliRunner().invoke(cli, ["models", "--json"]).output)
    row = next(r for r in rows if r["name"] == "toy-npz")
    assert row["test_error"]["center"] == card["test_error"]["center"]
    assert row["sha256"] == sha256_file(zoo / "toy-npz" / "weights.pt")
