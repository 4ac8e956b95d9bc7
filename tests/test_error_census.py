"""The one-line-error promise, as a census of malformed inputs across every subcommand.

Each case must end with exit code 2, exactly one ``Error:`` line on stderr that says what
is wrong (the fragment), no traceback, and no output folder that looks complete (no
``COMPLETE`` marker, no ``summary.csv``). They run in-process with click's CliRunner; the
models are tiny, so a case that gets as far as an attack still takes well under a second.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from user_models import user_model

from robustcaps.cli import cli

K = 3  # classes of the tiny model and data

RAISES_AT_LOAD = """
def build():
    raise ImportError("no such backbone")
"""


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, Path]:
    """The census' inputs: data files, model files, a regular file, run directories."""
    d = tmp_path_factory.mktemp("census")
    g = np.random.default_rng(0)
    x = g.standard_normal((12, 1, 8, 8)).astype(np.float32)
    paths = {"dir": d}

    def npz(name, **arrays):
        paths[name] = d / f"{name}.npz"
        np.savez(paths[name], **arrays)

    npz("good", x=x, y=np.arange(12) % K)
    npz("empty", x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64))
    npz("empty_y", x=x, y=np.zeros(0, np.int64))
    npz("no_y", x=x)
    npz("high_label", x=x, y=np.r_[np.arange(11) % K, 11])
    npz("float_labels", x=x, y=np.full(12, 0.5))
    npz("nan_x", x=np.full((12, 1, 8, 8), np.nan, np.float32), y=np.arange(12) % K)
    npz("names_short", x=x, y=np.arange(12) % K, class_names=np.array(["a", "b"]))
    paths["text"] = d / "text.npz"
    paths["text"].write_text("x,y\n1,2\n")
    paths["file"] = d / "regular_file"
    paths["file"].write_text("not a folder\n")
    for name, fail in (("tiny", ""), ("nan_after_probe", "nan"), ("raises_mid_attack", "raise")):
        paths[name] = Path(user_model(d, fail, K, f"{name}.py").rsplit(":", 1)[0])
    paths["raises_at_load"] = d / "raises_at_load.py"
    paths["raises_at_load"].write_text(RAISES_AT_LOAD)
    paths["complete"] = _complete_run(d / "complete", paths)
    paths["unfinished"] = d / "unfinished"
    (paths["unfinished"] / "chunks").mkdir(parents=True)
    paths["corrupt"] = d / "corrupt"
    paths["corrupt"].mkdir()
    (paths["corrupt"] / "records.csv.gz").write_bytes(gzip.compress(b"model,attack\ncnn\n")[:20])
    paths["nonempty"] = d / "nonempty"
    paths["nonempty"].mkdir()
    (paths["nonempty"] / "keep.txt").write_text("mine\n")
    return paths


def _complete_run(out: Path, p: dict[str, Path]) -> Path:
    res = CliRunner().invoke(cli, ["evaluate", "--attack", "fgsm", "--dataset", f"npz:{p['good']}",
                                   "--model", f"{p['tiny']}:build", "--epsilons", "0,0.1",
                                   "--out", str(out), "-q", "--no-figures"])
    assert res.exit_code == 0, res.output
    return out


def ev(*args: str):
    """evaluate on the good data with the tiny model, plus ``args``."""
    return lambda p, t: ["evaluate", "-q", "--no-figures", "--dataset", f"npz:{p['good']}",
                         "--model", f"{p['tiny']}:build", "--out", str(t / "run"),
                         *[a.format(**{k: str(v) for k, v in p.items()}, t=t) for a in args]]


def cmd(*args: str):
    """Any command line; ``{name}`` is a census input, ``{t}`` the case's own folder."""
    return lambda p, t: [a.format(**{k: str(v) for k, v in p.items()}, t=t) for a in args]


E_MODEL = ["--model", "{tiny}:build"]
D = ["diagnose", "-q", "--no-figures", "--n-samples", "6", "--steps", "1"]
T = ["train", "-q", "--model", "cnn", "--epochs", "1"]

CASES = [
    # ---- evaluate: options
    ("evaluate-no-attack", ev(), "--attack"),
    ("evaluate-unknown-attack", ev("--attack", "nope"), "--attack"),
    ("evaluate-eps-not-number", ev("--attack", "fgsm", "--epsilons", "0,abc"), "'abc' is not a number"),
    ("evaluate-eps-negative", ev("--attack", "fgsm", "--epsilons", "0,-0.1"), ">= 0"),
    ("evaluate-eps-nan", ev("--attack", "fgsm", "--epsilons", "nan"), "finite"),
    ("evaluate-eps-empty", ev("--attack", "fgsm", "--epsilons", ","), "--epsilons"),
    ("evaluate-eps-range-two-parts", ev("--attack", "fgsm", "--eps-range", "0:1"), "START:STOP:STEP"),
    ("evaluate-eps-range-inf", ev("--attack", "fgsm", "--eps-range", "0:inf:0.1"), "finite"),
    ("evaluate-eps-range-reversed", ev("--attack", "fgsm", "--eps-range", "1:0:0.1"), "STOP >= START"),
    ("evaluate-eps-range-zero-step", ev("--attack", "fgsm", "--eps-range", "0:1:0"), "STEP > 0"),
    ("evaluate-eps-range-huge", ev("--attack", "fgsm", "--eps-range", "0:1:1e-300"), "more than 1000"),
    ("evaluate-eps-both", ev("--attack", "fgsm", "--epsilons", "0", "--eps-range", "0:1:0.5"), "not both"),
    ("evaluate-device", ev("--attack", "fgsm", "--device", "tpu"), "invalid device"),
    ("evaluate-batch-size", ev("--attack", "fgsm", "--batch-size", "0"), "batch-size"),
    ("evaluate-seed", ev("--attack", "fgsm", "--seed", "abc"), "seed"),
    ("evaluate-n-samples", ev("--attack", "fgsm", "--n-samples", "0"), "n-samples"),
    ("evaluate-steps", ev("--attack", "bim", "--steps", "0"), "steps"),
    ("evaluate-step-size", ev("--attack", "bim", "--step-size", "-1"), "step"),
    ("evaluate-backend", ev("--attack", "fgsm", "--backend", "nope"), "backend"),
    ("evaluate-suite-missing", ev("--suite", "{t}/no-suite.toml"), "no-suite"),
    ("evaluate-resume-no-out", cmd("evaluate", "--resume", "-q"), "--out"),
    ("evaluate-resume-nothing", ev("--resume"), "manifest"),
    # ---- evaluate: models
    ("evaluate-unknown-model", cmd("evaluate", "-q", "--attack", "fgsm", "--dataset", "npz:{good}",
                                   "--model", "no-such-model", "--out", "{t}/run"), "no-such-model"),
    ("evaluate-model-file-missing", cmd("evaluate", "-q", "--attack", "fgsm", "--dataset", "npz:{good}",
                                        "--model", "{t}/none.py:build", "--out", "{t}/run"), "none.py"),
    ("evaluate-model-no-function", cmd("evaluate", "-q", "--attack", "fgsm", "--dataset", "npz:{good}",
                                       "--model", "{tiny}:nosuch", "--out", "{t}/run"), "nosuch"),
    ("evaluate-model-raises-at-load", cmd("evaluate", "-q", "--attack", "fgsm", "--dataset",
                                          "npz:{good}", "--model", "{raises_at_load}:build",
                                          "--out", "{t}/run"), "no such backbone"),
    ("evaluate-model-nan-after-probe", cmd("evaluate", "-q", "--attack", "bim", "--dataset",
                                           "npz:{good}", "--model", "{nan_after_probe}:build",
                                           "--epsilons", "0,0.1", "--out", "{t}/run"), "NaN or Inf scores"),
    ("evaluate-model-raises-mid-attack", cmd("evaluate", "-q", "--attack", "fgsm", "--dataset",
                                             "npz:{good}", "--model", "{raises_mid_attack}:build",
                                             "--epsilons", "0,0.1", "--out", "{t}/run"),
     "RuntimeError: boom in forward during attack fgsm"),
    ("evaluate-input-shape", ev("--attack", "fgsm", "--input-shape", "1,2"), "input"),
    ("evaluate-bounds", ev("--attack", "fgsm", "--bounds", "1,0"), "bounds"),
    ("evaluate-num-classes", ev("--attack", "fgsm", "--num-classes", "abc"), "num"),
    ("evaluate-num-classes-wrong", ev("--attack", "fgsm", "--num-classes", "5"), "5"),
    ("evaluate-transfer-source", ev("--attack", "transfer", "--source", "no-such-model"), "no-such-model"),
    # ---- evaluate: data
    ("evaluate-npz-missing", ev("--attack", "fgsm", "--dataset", "npz:{t}/none.npz"), "not found"),
    ("evaluate-npz-text", ev("--attack", "fgsm", "--dataset", "npz:{text}"), "not a valid .npz"),
    ("evaluate-npz-empty", ev("--attack", "fgsm", "--dataset", "npz:{empty}"), "no data"),
    ("evaluate-npz-empty-y", ev("--attack", "fgsm", "--dataset", "npz:{empty_y}"), "'y'"),
    ("evaluate-npz-no-y", ev("--attack", "fgsm", "--dataset", "npz:{no_y}"), "missing ['y']"),
    ("evaluate-npz-label-out-of-range", ev("--attack", "fgsm", "--dataset", "npz:{high_label}"),
     "label 11 is out of range for a 3-class model"),
    ("evaluate-npz-float-labels", ev("--attack", "fgsm", "--dataset", "npz:{float_labels}"), "integer"),
    ("evaluate-npz-nan-x", ev("--attack", "fgsm", "--dataset", "npz:{nan_x}"), "NaN"),
    ("evaluate-npz-class-names-short", ev("--attack", "fgsm", "--dataset", "npz:{names_short}"),
     "class_names"),
    ("evaluate-unknown-dataset", ev("--attack", "fgsm", "--dataset", "bogus"), "unknown dataset"),
    ("evaluate-npz-split", ev("--attack", "fgsm", "--split", "nope"), "no split"),
    # ---- evaluate: --out
    ("evaluate-out-proc", ev("--attack", "fgsm", "--out", "/proc/robustcaps-x"), "/proc/robustcaps-x"),
    ("evaluate-out-under-file", ev("--attack", "fgsm", "--out", "{file}/sub"), "regular_file/sub"),
    ("evaluate-out-is-file", ev("--attack", "fgsm", "--out", "{file}"), "regular_file"),
    ("evaluate-out-not-empty", ev("--attack", "fgsm", "--out", "{nonempty}"), "not empty"),
    ("evaluate-out-holds-run", ev("--attack", "fgsm", "--epsilons", "0,0.1", "--out", "{complete}"),
     "--resume"),
    ("evaluate-resume-other-settings", ev("--resume", "--attack", "fgsm", "--epsilons", "0,0.3",
                                          "--out", "{complete}"), "different settings"),
    # ---- attacks
    ("attacks-unknown-option", cmd("attacks", "--bogus"), "No such option"),
    ("attacks-extra-argument", cmd("attacks", "fgsm"), "unexpected extra argument"),
    # ---- diagnose
    ("diagnose-out-proc", cmd(*D, "--dataset", "npz:{good}", *E_MODEL, "--out", "/proc/robustcaps-x"),
     "/proc/robustcaps-x"),
    ("diagnose-out-under-file", cmd(*D, "--dataset", "npz:{good}", *E_MODEL, "--out", "{file}/sub"),
     "regular_file/sub"),
    ("diagnose-npz-empty", cmd(*D, "--dataset", "npz:{empty}", *E_MODEL, "--out", "{t}/d"), "no data"),
    ("diagnose-npz-text", cmd(*D, "--dataset", "npz:{text}", *E_MODEL, "--out", "{t}/d"), "not a valid"),
    ("diagnose-eps", cmd(*D, "--dataset", "npz:{good}", *E_MODEL, "--epsilons", "abc"), "not a number"),
    ("diagnose-eps-zero", cmd(*D, "--dataset", "npz:{good}", *E_MODEL, "--epsilons", "0"), "positive"),
    ("diagnose-n-samples", cmd(*D, "--n-samples", "1"), "n-samples"),
    ("diagnose-loss", cmd(*D, "--loss", "nope"), "loss"),
    ("diagnose-unknown-model", cmd(*D, "--dataset", "npz:{good}", "--model", "no-such-model",
                                   "--out", "{t}/d"), "no-such-model"),
    ("diagnose-label-out-of-range", cmd(*D, "--dataset", "npz:{high_label}", *E_MODEL,
                                        "--out", "{t}/d"), "label 11 is out of range for a 3-class"),
    ("diagnose-model-raises", cmd(*D, "--dataset", "npz:{good}", "--model",
                                  "{raises_mid_attack}:build", "--out", "{t}/d"), "boom in forward"),
    # ---- train
    ("train-no-out", cmd(*T), "--out"),
    ("train-out-proc", cmd(*T, "--dataset", "npz:{good}", "--out", "/proc/robustcaps-x"),
     "/proc/robustcaps-x"),
    ("train-out-under-file", cmd(*T, "--dataset", "npz:{good}", "--out", "{file}/sub"),
     "regular_file/sub"),
    ("train-unknown-arch", cmd("train", "-q", "--model", "nope", "--dataset", "npz:{good}",
                               "--out", "{t}/m"), "nope"),
    ("train-npz-empty", cmd(*T, "--dataset", "npz:{empty}", "--out", "{t}/m"), "no data"),
    ("train-epochs", cmd(*T, "--epochs", "0", "--out", "{t}/m"), "epochs"),
    ("train-arch-kw", cmd(*T, "--arch-kw", "nokey", "--dataset", "npz:{good}", "--out", "{t}/m"),
     "KEY=VALUE"),
    ("train-val-instances", cmd(*T, "--val-instances", "a,b", "--out", "{t}/m"), "integers"),
    ("train-resume-nothing", cmd(*T, "--dataset", "npz:{good}", "--resume", "--out", "{t}/m"),
     "nothing to resume"),
    # ---- data
    ("data-fetch-unknown", cmd("data", "fetch", "nope"), "nope"),
    ("data-fetch-dir-proc", cmd("data", "fetch", "mnist", "-q", "--dir", "/proc/robustcaps-x"),
     "/proc/robustcaps-x"),
    ("data-fetch-dir-under-file", cmd("data", "fetch", "mnist", "-q", "--dir", "{file}/sub"),
     "regular_file/sub"),
    ("data-info-npz-empty", cmd("data", "info", "-q", "--dataset", "npz:{empty}"), "no data"),
    ("data-info-npz-empty-y", cmd("data", "info", "-q", "--dataset", "npz:{empty_y}"), "'y'"),
    ("data-info-npz-text", cmd("data", "info", "-q", "--dataset", "npz:{text}"), "not a valid .npz"),
    ("data-info-unknown", cmd("data", "info", "-q", "--dataset", "bogus"), "unknown dataset"),
    ("data-info-out-proc", cmd("data", "info", "-q", "--dataset", "npz:{good}",
                               "--out", "/proc/robustcaps-x"), "/proc/robustcaps-x"),
    ("data-info-split", cmd("data", "info", "-q", "--dataset", "npz:{good}", "--split", "nope"),
     "no split"),
    ("data-info-device", cmd("data", "info", "--dataset", "npz:{good}", "--device", "cpu"),
     "No such option"),
    ("data-verify-missing", cmd("data", "verify", "-q", "--dataset", "mnist", "--dir", "{t}"),
     "failed verification"),
    ("data-verify-unknown", cmd("data", "verify", "--dataset", "nope"), "nope"),
    ("data-synthnorb-out-proc", cmd("data", "synthnorb", "-q", "--out", "/proc/robustcaps-x"),
     "/proc/robustcaps-x"),
    # ---- models
    ("models-card-unknown", cmd("models", "--card", "nope"), "no zoo model named 'nope'"),
    ("models-seed", cmd("models", "--seed", "1"), "No such option"),
    ("models-unknown-option", cmd("models", "--bogus"), "No such option"),
    # ---- bench
    ("bench-unknown", cmd("bench", "nope"), "No such command"),
    ("bench-attacks-n-samples", cmd("bench", "attacks", "--n-samples", "0"), "n-samples"),
    ("bench-attacks-npz-empty", cmd("bench", "attacks", "-q", "--dataset", "npz:{empty}"), "no data"),
    ("bench-data-out-proc", cmd("bench", "data", "-q", "--fraction", "0.01", "--out",
                                "/proc/robustcaps-x"), "/proc/robustcaps-x"),
    ("bench-routing-model", cmd("bench", "routing", "--model", "nope"), "nope"),
    # ---- report
    ("report-missing", cmd("report", "{t}/none"), "does not exist"),
    ("report-not-a-run", cmd("report", "{t}"), "not a robustcaps run directory"),
    ("report-unfinished", cmd("report", "{unfinished}"), "--resume"),
    ("report-corrupt-records", cmd("report", "{corrupt}", "--out", "{t}/r"), "cannot read"),
    ("report-out-proc", cmd("report", "{complete}", "--no-figures", "--out", "/proc/robustcaps-x"),
     "/proc/robustcaps-x"),
    ("report-out-under-file", cmd("report", "{complete}", "--no-figures", "--out", "{file}/sub"),
     "regular_file/sub"),
    ("report-device", cmd("report", "{complete}", "--device", "cpu"), "No such option"),
    ("report-seed", cmd("report", "{complete}", "--seed", "1"), "No such option"),
    # ---- inspect
    ("inspect-no-index", cmd("inspect", "routing"), "--index"),
    ("inspect-unknown", cmd("inspect", "nope"), "No such command"),
    ("inspect-npz-empty", cmd("inspect", "routing", "--index", "0", "--dataset", "npz:{empty}"),
     "no data"),
    ("inspect-index-out-of-range", cmd("inspect", "routing", "-q", "--index", "99",
                                       "--dataset", "npz:{good}", "--out", "{t}/i"), "outside the data"),
    ("inspect-seed", cmd("inspect", "routing", "--index", "0", "--seed", "1"), "No such option"),
    ("inspect-out-proc", cmd("inspect", "routing", "-q", "--index", "0", "--dataset", "npz:{good}",
                             "--out", "/proc/robustcaps-x"), "/proc/robustcaps-x"),
]


def test_census_is_large_and_covers_every_subcommand():
    from robustcaps.cli import SUBCOMMANDS

    assert len(CASES) >= 60
    assert len({name for name, _, _ in CASES}) == len(CASES)
    assert {name.split("-")[0] for name, _, _ in CASES} == set(SUBCOMMANDS)


@pytest.mark.parametrize("name, build, fragment", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_line_exit_2(name, build, fragment, w, tmp_path):
    args = build(w, tmp_path)
    res = CliRunner().invoke(cli, args)
    stderr = res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in stderr + res.stdout
    assert res.exit_code == 2, (args, res.exit_code, stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    assert fragment.lower() in errors[0].lower(), errors[0]
    for folder in (tmp_path, Path("/proc/robustcaps-x")):
        assert not any(folder.rglob("COMPLETE")) and not any(folder.rglob("summary.csv")), name
