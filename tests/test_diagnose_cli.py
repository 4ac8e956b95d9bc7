"""``robustcaps diagnose`` end to end on tiny user models and an npz dataset."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import known_models as km
import numpy as np
import pytest
from click.testing import CliRunner

from robustcaps.cli import cli

MODEL_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Linear(nn.Module):
        def __init__(self, quantise=False):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.fc = nn.Linear(64, 4)
            with torch.no_grad():
                self.fc.weight.copy_(torch.randn(4, 64, generator=gen) / 8.0)
                self.fc.bias.copy_(0.1 * torch.randn(4, generator=gen))
            self.quantise = quantise

        def forward(self, x):
            if self.quantise:
                x = torch.round(x * 4) / 4
            return self.fc(x.flatten(1))

    def clean(num_classes=4, input_shape=(1, 8, 8)):
        return Linear()

    def stepped(num_classes=4, input_shape=(1, 8, 8)):
        return Linear(quantise=True)
    """
)


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "tiny.py").write_text(MODEL_FILE)
    x, y = km.data(24)
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    return {"dir": tmp_path, "model": tmp_path / "tiny.py", "data": tmp_path / "data.npz"}


def run(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_diagnose_writes_report_json_csv_and_figures(setup):
    out = setup["dir"] / "out"
    res = run(["diagnose", "--model", f"{setup['model']}:clean", "--model-name", "clean",
               "--model", f"{setup['model']}:stepped", "--model-name", "stepped",
               "--dataset", f"npz:{setup['data']}", "--n-samples", "16",
               "--device", "cpu", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    for name in ("gradient_report.md", "gradients.json", "gradients.csv", "verdicts.csv",
                 "attack_curves.csv", "grad_log10_hist.png", "grad_norms.png",
                 "loss_profile.png", "attack_curves.png"):
        assert (out / name).is_file(), name
    payload = json.loads((out / "gradients.json").read_text())
    assert payload["models"]["clean"]["zero_fraction"] == 0.0
    assert payload["models"]["stepped"]["zero_fraction"] == 1.0
    assert payload["models"]["clean"]["verdict"] == "PASS"
    assert payload["models"]["stepped"]["verdict"] == "FAIL"
    assert payload["config"]["n_samples"] == 16
    report = (out / "gradient_report.md").read_text()
    # every embedded figure exists next to the report
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / target).is_file(), target
    assert "| P1 | unavailable gradients | PASS | **FAIL** |" in report
    assert "## Method: formulas and thresholds" in report
    csv = (out / "gradients.csv").read_text().splitlines()
    assert csv[0].startswith("model,") and len(csv) == 3


def test_diagnose_prints_verdicts_and_n(setup):
    out = setup["dir"] / "o2"
    res = run(["diagnose", "--model", f"{setup['model']}:clean", "--dataset",
               f"npz:{setup['data']}", "--n-samples", "8", "--gradients-only", "--no-figures",
               "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "diagnose: 8 samples" in res.output
    assert "unavailable gradients" in res.output and "PASS" in res.output
    assert "exact-zero gradient entries" in res.output
    assert not (out / "grad_norms.png").exists()
    verdicts = (out / "verdicts.csv").read_text()
    assert "N/A" in verdicts and ",A," not in verdicts.replace("N/A", "")  # no attack rows run


@pytest.mark.parametrize("args, message", [
    (["--epsilons", "0.1,abc"], "--epsilons: 'abc' is not a number"),
    (["--epsilons", "0.1,-2"], "must be a positive finite number"),
    (["--n-samples", "1"], "--n-samples"),
    (["--loss", "hinge"], "--loss"),
])
def test_diagnose_bad_input_is_one_line_error(setup, args, message):
    res = CliRunner().invoke(cli, ["diagnose", "--model", f"{setup['model']}:clean", "--dataset",
                                   f"npz:{setup['data']}", "--out", str(setup["dir"] / "x"),
                                   *args])
    assert res.exit_code == 2, res.output
    err = res.output.strip().splitlines()[-1]
    assert err.startswith("Error:") and message in err
    assert "Traceback" not in res.output


def test_diagnose_unknown_model(setup):
    res = CliRunner().invoke(cli, ["diagnose", "--model", "no-such-model", "--n-samples", "8",
                                   "--dataset",
                                   f"npz:{setup['data']}", "--out", str(setup["dir"] / "y")])
    assert res.exit_code == 2
    assert "no-such-model" in res.output and "Traceback" not in res.output


def test_diagnose_adaptive_on_a_failing_capsule_network(setup):
    res = run(["diagnose", "--model", f"{setup['model']}:stepped", "--model-name", "caps",
               "--outputs", "capsule_logits", "--dataset", f"npz:{setup['data']}",
               "--n-samples", "8", "--steps", "5", "--no-figures", "--device", "cpu",
               "--out", str(setup["dir"] / "ad"), "--adaptive"])
    assert res.exit_code == 0, res.output
    from robustcaps.diagnostics.adaptive import available

    assert "caps: the checks point at attack failure; capsule-aware attacks to run next: " \
        "pgd-bpda" in res.output and "vote-attack" in res.output
    if not available("vote-attack"):
        assert "vote-attack (unavailable: not in the attack registry)" in res.output
    assert "caps cw: success by eps 0.02: 0.0%" in res.output
    report = (setup["dir"] / "ad" / "gradient_report.md").read_text()
    assert "## Capsule-aware attacks" in report and "**Next:**" in report
