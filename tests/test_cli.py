"""The CLI contract: help everywhere, version, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from robustcaps import __version__
from robustcaps.cli import SUBCOMMANDS, cli

REQUIRED = ("evaluate", "diagnose", "train", "data", "models", "bench")


def run(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_help_lists_the_six_subcommands():
    res = run(["--help"])
    assert res.exit_code == 0
    listed = [line.split()[0] for line in res.output.split("Commands:")[1].splitlines() if line.strip()]
    assert set(REQUIRED) <= set(listed)


def test_version():
    res = run(["--version"])
    assert res.exit_code == 0
    assert __version__ in res.output


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name):
    res = run([name, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["no-such-command"], "No such command"),
        (["models", "--no-such-option"], "No such option"),
        (["evaluate", "--device", "tpu"], "invalid device"),
        (["evaluate", "--batch-size", "0"], "batch-size"),
        (["evaluate", "--seed", "abc"], "seed"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, fragment):
    # A real subprocess: what a user sees, stderr and exit code included.
    proc = subprocess.run(
        [sys.executable, "-m", "robustcaps.cli", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ")
    assert fragment.lower() in lines[0].lower()
    assert "Traceback" not in proc.stderr


def test_models_json_fields_and_counts():
    res = run(["models", "--json"])
    assert res.exit_code == 0
    rows = json.loads(res.output)
    by_name = {r["name"]: r for r in rows if r["kind"] == "architecture"}
    for row in rows:
        assert {"name", "params", "num_classes", "input_shape"} <= set(row)
    cnn = by_name["cnn"]
    # Section 5: about 4.2M parameters at 32x32 input; within 3%.
    assert cnn["params"] == 4_253_349
    assert abs(cnn["params"] - 4.2e6) / 4.2e6 < 0.03
    assert cnn["input_shape"] == [2, 32, 32] and cnn["num_classes"] == 5
