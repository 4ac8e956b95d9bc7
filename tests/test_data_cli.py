"""``robustcaps data``: fetch / verify / synthnorb / info as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_download import _Server  # tests/ is on sys.path (pytest rootdir-less layout)

from robustcaps.cli import cli
from robustcaps.data import smallnorb
from robustcaps.data.mnist import write_idx

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"


def run(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def run_proc(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robustcaps.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_group_help_lists_subcommands():
    res = run(["data", "--help"])
    assert res.exit_code == 0
    listed = [line.split()[0] for line in res.output.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == ["fetch", "info", "synthnorb", "verify"]
    for sub in listed:
        sub_help = run(["data", sub, "--help"])
        assert sub_help.exit_code == 0 and "Usage: " in sub_help.output


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="../shared/data/mnist-t10k not present")
def test_fetch_real_mnist_t10k_from_loopback(tmp_path):
    """The real t10k files, served locally, pass the official decompressed checksums."""
    with _Server() as server:
        for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
            server.files["/mnist/" + name] = (SHARED_MNIST / name).read_bytes()
        res = run(["data", "fetch", "mnist", "--dir", str(tmp_path), "--split", "test",
                   "--base-url", server.url("/mnist/"), "-q"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(tmp_path)
    res = run(["data", "verify", "--dataset", "mnist", "--dir", str(tmp_path), "--json", "-q"])
    reports = {r["name"]: r for r in json.loads(res.output.split("\n]")[0] + "\n]")}
    assert reports["t10k-images-idx3-ubyte"]["checksum"] == "official match"
    assert reports["t10k-labels-idx1-ubyte"]["ok"] is True
    assert reports["train-images-idx3-ubyte"]["present"] is False
    assert res.exit_code == 2  # the training files are missing


def test_fetch_checksum_mismatch_is_one_error_line(tmp_path):
    images = np.zeros((3, 28, 28), dtype=np.uint8)  # not the real MNIST test set
    write_idx(tmp_path / "src" / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "src" / "t10k-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    with _Server() as server:
        for p in (tmp_path / "src").iterdir():
            server.files["/m/" + p.name] = p.read_bytes()
        proc = run_proc(["data", "fetch", "mnist", "--dir", str(tmp_path / "out"), "--split", "test",
                         "--base-url", server.url("/m/"), "-q"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("Error: t10k-images-idx3-ubyte: checksum verification failed: size")


def test_verify_names_file_and_problem(tmp_path):
    smallnorb.write_matrix(tmp_path / smallnorb.norb_filename("training", "cat"),
                           np.zeros(24300, dtype=np.int32))
    bad = tmp_path / smallnorb.norb_filename("training", "info")
    bad.write_bytes(b"\x00" * 388_820)  # right size, zero magic
    res = run(["data", "verify", "--dir", str(tmp_path), "--no-checksum", "-q"])
    lines = {line.split()[1]: line for line in res.output.splitlines() if line[:3] in ("ok ", "BAD")}
    assert lines[smallnorb.norb_filename("training", "cat")].startswith("ok ")
    assert "bad magic number 0x00000000" in lines[bad.name]
    assert "MISSING" in lines[smallnorb.norb_filename("testing", "dat")]
    assert res.exit_code == 2
    assert res.stderr.strip() == f"Error: 5 of 6 files in {tmp_path} failed verification (see the list above)"


def test_info_npz_and_json_out(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (12, 1, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", x=x, y=np.arange(12) % 4)
    res = run(["data", "info", "--dataset", f"npz:{tmp_path / 'mine.npz'}", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "12" in res.output and "1 x 6 x 6" in res.output and "[0.0, 1.0]" in res.output
    info = json.loads((tmp_path / "o" / "dataset_info.json").read_text())
    assert info["n"] == 12 and info["class_counts"] == [3, 3, 3, 3]
    assert info["fingerprint"] in res.output


def test_info_synthnorb_subset_renders_without_generating(tmp_path):
    res = run(["data", "info", "--data-dir", str(tmp_path / "s"), "--n-samples", "10",
               "--split", "elevation-test-novel", "-q", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "o" / "dataset_info.json").read_text())
    assert info["x_shape"] == [10, 2, 32, 32] and info["bounds"] is None
    assert info["class_counts"] == [2, 2, 2, 2, 2]
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["data", "info", "--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["data", "info", "--dataset", "npz:/no/such.npz"], "npz dataset file not found"),
        (["data", "info", "--dataset", "smallnorb", "--data-dir", "/no/such/dir"], "files not found"),
        (["data", "fetch", "cifar"], "cifar"),
        (["data", "verify", "--dir", "/no/such/dir"], "no such directory"),
        (["data", "synthnorb", "--split", "validation"], "validation"),
    ],
)
def test_bad_input_one_line_exit_2(args, fragment):
    # In-process (a subprocess per case costs seconds of imports); the subprocess path is
    # covered by test_fetch_checksum_mismatch_is_one_error_line.
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert fragment in lines[0]
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_synthnorb_command_calls_generate(tmp_path, monkeypatch):
    from robustcaps.data import synthnorb

    calls = []

    def fake_generate(out_dir, seed=0, splits=("training", "testing"), progress=True, **kw):
        calls.append((Path(out_dir), seed, tuple(splits), progress))
        return [Path(out_dir) / smallnorb.norb_filename(s, "dat") for s in splits]

    monkeypatch.setattr(synthnorb, "generate", fake_generate)
    res = run(["data", "synthnorb", "--out", str(tmp_path), "--seed", "3", "--split", "testing", "-q"])
    assert res.exit_code == 0, res.output
    assert calls == [(tmp_path, 3, ("testing",), False)]
    assert res.output.strip() == str(tmp_path / smallnorb.norb_filename("testing", "dat"))


@pytest.mark.slow
def test_synthnorb_generate_and_verify_real(tmp_path):
    res = run(["data", "synthnorb", "--out", str(tmp_path), "--split", "testing", "-q"])
    assert res.exit_code == 0, res.output
    res = run(["data", "verify", "--dataset", "synthnorb", "--dir", str(tmp_path), "-q", "--json"])
    reports = {r["name"]: r for r in json.loads(res.output.split("\n]")[0] + "\n]")}
    for kind in smallnorb.KINDS:
        assert reports[smallnorb.norb_filename("testing", kind)]["ok"]
