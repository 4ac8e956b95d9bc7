"""The Table 1 / Table 2 recipes (results/table*/run.py) end to end at the tiny budget.

Each trains two rows for 2 steps on 40 SynthNORB images (a few seconds each), builds the
table, and is rerun to check that finished rows are skipped.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "results" / name / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _args(tmp_path: Path, rows: str) -> list[str]:
    return ["--tiny", "--rows", rows, "--runs", str(tmp_path / "runs"), "--out", str(tmp_path),
            "--device", "cpu", "--capsule", "capsnet-small", "--arch-kw", "final_lambda=0.01"]


def _card(tmp_path: Path, row: str) -> dict:
    return json.loads((tmp_path / "runs" / row / "card.json").read_text())


def test_table1_recipe_trains_rows_collects_and_skips_done_rows(tmp_path):
    t1 = _recipe("table1")
    table = t1.main(_args(tmp_path, "it2,cnn"))
    rows = _csv(tmp_path / "table.csv")
    assert list(rows[0]) == t1.COLUMNS and [r["row"] for r in rows] == ["it2", "cnn"]
    for r, t in zip(rows, table, strict=True):
        card = _card(tmp_path, r["row"])
        assert r["status"] == "finished" and card["steps"] == 2
        assert float(r["test_center_error"]) == card["test_error"]["center"] == t["test_center_error"]
        assert float(r["test_multi_crop_error"]) == card["test_error"]["multi_crop"]
        assert float(r["val_error"]) == card["val_error"]
        assert card["n_test"] == 20 and (20 * float(r["test_center_error"])).is_integer()
        assert float(r["train_time_s"]) > 0 and r["hardware"]
    assert [r["paper_test_error"] for r in rows] == ["2.2%", "5.2%"]
    caps = _card(tmp_path, "it2")
    assert caps["arch_kwargs"]["iterations"] == 2 and caps["arch_kwargs"]["final_lambda"] == 0.01
    assert "final_lambda" not in _card(tmp_path, "cnn").get("arch_kwargs", {})  # preset: capsules only
    md = (tmp_path / "table.md").read_text()
    assert f"| it2 | 2 iterations, matrix, spread, coord. add. | 2.2% | {100 * caps['val_error']:.1f}% |" in md
    log = _csv(tmp_path / "runs" / "invocations.csv")
    assert [r["row"] for r in log] == ["it2", "cnn"] and all(r["exit_code"] == "0" for r in log)
    assert all(float(r["wall_s"]) > 0 for r in log)
    t1.main(_args(tmp_path, "it2,cnn"))  # done rows are skipped, not retrained
    assert len(_csv(tmp_path / "runs" / "invocations.csv")) == 2
    assert _csv(tmp_path / "table.csv") == rows


def test_table2_recipe_matches_on_val_and_tests_both_viewpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTCAPS_ZOO", "")  # the recipe points the zoo at its runs
    t2 = _recipe("table2")
    assert t2.main(_args(tmp_path, "azimuth-caps"))[0]["matched"] == "not run"  # waits for its CNN
    t2.main(_args(tmp_path, "azimuth-cnn,azimuth-caps"))
    cnn, caps = _csv(tmp_path / "table.csv")
    assert list(cnn) == t2.COLUMNS and (cnn["model"], caps["model"]) == ("CNN", "capsules (capsnet-small)")
    assert (cnn["paper_novel_error"], caps["paper_novel_error"]) == ("20%", "13.5%")
    # The capsule network's stop target is the CNN's familiar-viewpoint validation error.
    assert float(caps["target_val_error"]) == pytest.approx(_card(tmp_path, "azimuth-cnn")["val_error"], abs=1e-6)
    card = _card(tmp_path, "azimuth-caps")
    assert "--stop-at-error" in card["command"] and "--on val" in card["command"]
    assert caps["matched"] == ("yes" if card["status"] == "stopped" else "no (budget ended)")
    for r, row in ((cnn, "azimuth-cnn"), (caps, "azimuth-caps")):
        c = _card(tmp_path, row)
        # familiar = the training run's own test split: the recipe's evaluation agrees with it
        assert float(r["familiar_center_error"]) == c["test_error"]["center"]
        assert float(r["familiar_multi_crop_error"]) == c["test_error"]["multi_crop"]
        for key in ("novel_center_error", "novel_multi_crop_error"):
            assert 0 <= float(r[key]) <= 1 and (20 * float(r[key])).is_integer()
        assert json.loads((tmp_path / "runs" / row / "viewpoints.json").read_text())["novel"]["center"] \
            == float(r["novel_center_error"])
