"""Run directories written before the evaluation package (issue 13) still resume.

``fixtures/old_run_dir/run`` was interrupted by the code of commit 1bf7152 (the last one
with ``robustcaps/attacks/engine.py``) after 3 of its units; ``expected/records.csv.gz`` is
that code's uninterrupted run of the same command::

    robustcaps evaluate --attack all --both --dataset npz:DIR/data.npz
        --model DIR/net.py:build --input-shape 1,8,8 --model-name net
        --source DIR/net.py:build --target DIR/net.py:build --epsilons 0,0.1,0.3 --steps 2
        --n-samples 12 --batch-size 6 -q --no-figures
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

import robustcaps
from robustcaps.errors import RobustcapsError
from robustcaps.evaluation.records import read_records

FIXTURE = Path(__file__).parent / "fixtures" / "old_run_dir"
WRITTEN_AT = "/tmp/core_fx"  # the fixture's folder when the old code wrote it


@pytest.fixture
def old_run(tmp_path) -> Path:
    folder = tmp_path / "fx"
    shutil.copytree(FIXTURE, folder)
    for name in ("config.json", "manifest.json"):
        path = folder / "run" / name
        path.write_text(path.read_text().replace(WRITTEN_AT, str(folder)))
    return folder


def test_an_old_run_directory_resumes_to_the_old_records(old_run):
    done = sorted(p.name for p in (old_run / "run" / "chunks").glob("*.csv.gz"))
    assert len(done) == 3
    r = robustcaps.evaluate(resume=True, out=old_run / "run", progress=False, figures=False)
    expected = read_records(old_run / "expected" / "records.csv.gz")
    for col in ("model", "backend", "source"):
        expected[col] = expected[col].str.replace(WRITTEN_AT, str(old_run), regex=False)
    pd.testing.assert_frame_equal(r.records, expected)
    assert (old_run / "run" / "COMPLETE").is_file()
    # fgsm, bim and transfer-fgsm (its one target is the source) x 3 eps x 12 x (u + 2 targets)
    assert len(r.records) == 3 * 3 * 12 * 3


def test_an_unreadable_old_manifest_is_one_line(old_run):
    path = old_run / "run" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.pop("invocation")
    path.write_text(json.dumps(manifest))
    with pytest.raises(RobustcapsError, match="records no settings") as exc:
        robustcaps.evaluate(resume=True, out=old_run / "run", progress=False)
    assert "\n" not in str(exc.value)
