"""Golden records: fixed-seed runs of fgsm, bim --both, transfer and --backend all on small
fitted models give exactly the records pinned below.

The hashes were recorded on the code before the evaluation core was rebuilt (issue 13) and
must not change with any refactor. The *numbers* hash covers only the numeric columns,
grouped by the identity columns (model, attack, backend, source) without their values, so
it proves the results are unchanged even when a label is renamed; the *labels* hash pins
the identity strings too and may only change with a deliberate, documented rename.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import robustcaps
from robustcaps.models.adapter import ModelAdapter
from robustcaps.report.tables import read_records

K = 3
EPS = [0.0, 0.05, 0.1, 0.2, 0.3]
IDENTITY = ["model", "attack", "backend", "source"]
NUMERIC = ["targeted", "target", "epsilon", "sample", "label", "clean_pred", "adv_pred",
           "success", "linf", "l2"]
COLUMNS = ["model", "attack", "backend", "source", "targeted", "target", "epsilon", "sample",
           "label", "clean_pred", "adv_pred", "success", "linf", "l2", "eps_units"]

GOLDEN = {
    "fgsm": ("59a12565cfbffb75", "bdbd80100ded5fa3"),
    "bim_both": ("6232c29c382b37db", "2329f7b4e944cc53"),
    "transfer": ("18e2e2a4a56b6a00", "cf468746b76193c3"),
    "backend_all": ("8beea41a9b83e5ad", "347e68a31183d250"),
}


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 1, 8, 8) in [0, 1]: a fixed pattern per class plus noise."""
    protos = torch.rand(K, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = (0.2 + 0.6 * protos[y] + 0.25 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


def _fit(seed: int, name: str, hidden: int = 4) -> ModelAdapter:
    """A small CNN fitted for 40 full-batch Adam steps (about 90% clean accuracy)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, hidden, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(hidden * 64, K))
    x, y = _blobs(300, seed=1000 + seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return ModelAdapter(model.eval(), input_shape=(1, 8, 8), num_classes=K, bounds=(0.0, 1.0),
                        device="cpu", name=name)


@pytest.fixture(scope="module")
def models() -> dict[str, ModelAdapter]:
    return {n: _fit(s, n, h) for n, s, h in (("a", 0, 4), ("b", 1, 4), ("c", 2, 6))}


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return _blobs(24, seed=7)


def _numbers(group: pd.DataFrame) -> str:
    g = group[NUMERIC].copy()
    g["target"] = g["target"].fillna(-1).astype(int)
    g = g.sort_values(["targeted", "target", "epsilon", "sample"], kind="stable")
    lines = [f"{int(r.targeted)},{r.target},{r.epsilon!r},{r.sample},{r.label},{r.clean_pred},"
             f"{r.adv_pred},{int(r.success)},{r.linf:.6f},{r.l2:.6f}" for r in g.itertuples()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def golden_hashes(records: pd.DataFrame) -> tuple[str, str]:
    """(numbers, labels): numbers hashes the numeric columns of each identity group and the
    sorted multiset of those group hashes, so renaming a label leaves it unchanged."""
    groups = [(tuple(map(str, key)), _numbers(g))
              for key, g in records.fillna({"source": ""}).groupby(IDENTITY, sort=True)]
    numbers = hashlib.sha256("".join(sorted(h for _, h in groups)).encode()).hexdigest()
    labels = hashlib.sha256(repr(sorted(groups)).encode()).hexdigest()
    return numbers[:16], labels[:16]


def _check(name: str, records: pd.DataFrame) -> None:
    assert list(records.columns) == COLUMNS
    got = golden_hashes(records)
    assert got[0] == GOLDEN[name][0], f"{name}: the numbers changed"
    assert got[1] == GOLDEN[name][1], f"{name}: the labels changed"


def test_fitted_models_are_not_trivial(models, data):
    x, y = data
    for a in models.values():
        acc = (a.predict(x).cpu() == y).double().mean().item()
        assert 0.6 <= acc <= 1.0, (a.name, acc)


def test_golden_fgsm(models, data, tmp_path):
    r = robustcaps.evaluate([models["a"], models["b"]], dataset=data, attack="fgsm",
                            epsilons=EPS, batch_size=10, out=tmp_path / "run", figures=False,
                            progress=False)
    assert len(r.records) == 2 * len(EPS) * 24
    _check("fgsm", r.records)
    # the records file holds the same numbers as the returned frame
    assert golden_hashes(read_records(tmp_path / "run" / "records.csv.gz")) == \
        golden_hashes(r.records)


def test_golden_bim_both(models, data):
    r = robustcaps.evaluate([models["a"], models["c"]], dataset=data, attack="bim",
                            targeted="both", epsilons=EPS, steps=4, batch_size=10,
                            progress=False)
    assert len(r.records) == 2 * len(EPS) * 24 * K
    assert r.records["success"].any() and not r.records["success"].all()
    _check("bim_both", r.records)


def test_golden_transfer(models, data):
    r = robustcaps.evaluate(None, dataset=data, attack="transfer", targeted="both",
                            source=models["a"], transfer_targets=[models["b"], models["c"]],
                            transfer_attack="bim", epsilons=EPS, steps=3, batch_size=10,
                            progress=False)
    assert len(r.records) == 3 * len(EPS) * 24 * K
    _check("transfer", r.records)


def test_golden_backend_all(models, data):
    r = robustcaps.evaluate([models["b"]], dataset=data, attack=["fgsm", "bim"], backend="all",
                            epsilons=EPS, steps=3, early_stop=False, batch_size=12,
                            progress=False)
    assert len(r.records) == 3 * 2 * len(EPS) * 24
    assert np.isfinite(r.records["l2"]).all()
    _check("backend_all", r.records)
