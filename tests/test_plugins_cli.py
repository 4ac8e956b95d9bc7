"""Model specs through the real CLI: each spec kind evaluates end to end (its clean
predictions in records.csv agree with calling the module directly), adapter options are
positional per --model, and every loading error is one ``Error:`` line with exit code 2."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from robustcaps.cli import cli

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "models" / "examples" / "third_party_net.py"
PLUGIN_DIR = Path(__file__).resolve().parent / "plugin_pkg"
N = 8


@pytest.fixture
def plugin_path(monkeypatch):
    """tests/plugin_pkg on sys.path: importlib.metadata finds its *.dist-info entry points."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    for name in [m for m in sys.modules if m.startswith("robustcaps_toyplugin")]:
        monkeypatch.delitem(sys.modules, name)
    return PLUGIN_DIR


def _example():
    spec = importlib.util.spec_from_file_location("example_third_party_net_cli", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build()


def _npz(path: Path, shape: tuple[int, int, int], num_classes: int, seed: int = 0) -> Path:
    """N uint8 images (scaled to [0, 1] by the loader) with labels 0..K-1 (K class names)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(N, *shape), dtype=np.uint8)
    y = np.arange(N) % num_classes
    np.savez(path, x=x, y=y, class_names=np.array([f"c{i}" for i in range(num_classes)]))
    return path


@pytest.fixture
def mnist_like(tmp_path) -> Path:
    return _npz(tmp_path / "mnist_like.npz", (1, 28, 28), 10)


def run(*args: str):
    """Invoke ``robustcaps`` in-process; returns click's Result (stdout/stderr separate)."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def evaluate(spec_args: list[str], data: Path, out: Path):
    return run("evaluate", "--attack", "fgsm", *spec_args, "--dataset", f"npz:{data}",
               "--n-samples", N, "--epsilons", "0,0.1", "--out", out, "--device", "cpu", "-q",
               "--no-figures")


def _check_run(result, out: Path, module_scores, data: Path, model_name: str) -> pd.DataFrame:
    """The run succeeded and its clean predictions equal the module's own argmax."""
    assert result.exit_code == 0, result.stderr
    records = pd.read_csv(out / "records.csv.gz")
    records = records[records["model"] == model_name]
    assert sorted(records["epsilon"].unique()) == [0.0, 0.1]
    x = torch.from_numpy(np.load(data)["x"]).float() / 255.0
    with torch.no_grad():
        expected = module_scores(x).argmax(1).numpy()
    clean = records[records["epsilon"] == 0.0].sort_values("sample")
    assert len(clean) == N
    np.testing.assert_array_equal(clean["clean_pred"].to_numpy(), expected[clean["sample"].to_numpy()])
    summary = pd.read_csv(out / "summary.csv")
    row = summary[(summary["model"] == model_name) & (summary["epsilon"] == 0.0)]
    labels = np.load(data)["y"]
    assert row["accuracy"].iloc[0] == pytest.approx(float((expected == labels).mean()))
    return records


# --------------------------------------------------------------------------- each spec kind
def test_file_factory_end_to_end(mnist_like, tmp_path):
    spec = f"{EXAMPLE}:build"
    r = evaluate(["--model", spec, "--output-key", "class_scores"], mnist_like, tmp_path / "run")
    model = _example()
    _check_run(r, tmp_path / "run", lambda x: model(x)["class_scores"], mnist_like, spec)


def test_module_factory_end_to_end(mnist_like, tmp_path, monkeypatch):
    (tmp_path / "rc_cli_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        def build(num_classes=10):
            torch.manual_seed(1)
            return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    r = evaluate(["--model", "rc_cli_models:build", "--mean", "0.5", "--std", "0.25"], mnist_like,
                 tmp_path / "run")
    import rc_cli_models

    module = rc_cli_models.build()
    _check_run(r, tmp_path / "run", lambda x: module((x - 0.5) / 0.25), mnist_like, "rc_cli_models:build")


def test_torchscript_end_to_end(mnist_like, tmp_path):
    model = _example()
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    r = evaluate(["--model", str(path), "--output-key", "class_scores"], mnist_like, tmp_path / "run")
    _check_run(r, tmp_path / "run", lambda x: model(x)["class_scores"], mnist_like, str(path))


def test_arch_with_weights_end_to_end(mnist_like, tmp_path):
    from robustcaps.models.registry import create_model

    torch.manual_seed(0)
    module = create_model("cnn", num_classes=10, input_shape=(1, 28, 28)).eval()
    path = tmp_path / "cnn.pt"
    torch.save(module.state_dict(), path)
    spec = f"cnn@{path}"  # built for the data's 1x28x28 and 10 classes
    r = evaluate(["--model", spec], mnist_like, tmp_path / "run")
    _check_run(r, tmp_path / "run", module, mnist_like, spec)


def test_builtin_name_end_to_end(mnist_like, tmp_path, caplog):
    r = evaluate(["--model", "cnn"], mnist_like, tmp_path / "run")
    assert r.exit_code == 0, r.stderr
    # The warning is one logged line (robustcaps.models), not a Python warning block.
    assert [rec.getMessage() for rec in caplog.records if "untrained" in rec.getMessage()] == [
        "cnn: 'cnn' is an untrained architecture (no zoo checkpoint); load weights with "
        "cnn@path/to/state_dict.pt"]
    records = pd.read_csv(tmp_path / "run" / "records.csv.gz")
    assert set(records["model"]) == {"cnn"} and len(records) == 2 * N


def test_entry_point_end_to_end(plugin_path, tmp_path):
    data = _npz(tmp_path / "tiny.npz", (1, 8, 8), 4)
    r = evaluate(["--model", "toy-tiny"], data, tmp_path / "run")
    import robustcaps_toyplugin as plugin

    module = plugin.tiny_net()
    _check_run(r, tmp_path / "run", module, data, "toy-tiny")


def test_entry_point_found_by_a_real_process(tmp_path):
    """Outside pytest: PYTHONPATH alone makes the test package's entry points visible."""
    data = _npz(tmp_path / "tiny.npz", (1, 8, 8), 4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGIN_DIR),
                                                                     os.environ.get("PYTHONPATH")]))}
    base = [sys.executable, "-m", "robustcaps.cli", "evaluate", "--attack", "fgsm", "--dataset",
            f"npz:{data}", "--n-samples", str(N), "--epsilons", "0", "--device", "cpu", "-q",
            "--no-figures"]
    ok = subprocess.run(base + ["--model", "toy-tiny", "--out", str(tmp_path / "run")], env=env,
                        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "run" / "summary.csv").is_file()
    records = pd.read_csv(tmp_path / "run" / "records.csv.gz")
    assert set(records["model"]) == {"toy-tiny"} and len(records) == N


def test_broken_entry_points_are_one_line_errors(plugin_path, tmp_path):
    data = _npz(tmp_path / "tiny.npz", (1, 8, 8), 4)
    for name, message in [("toy-missing-module", "cannot import module 'robustcaps_toyplugin_absent'"),
                          ("toy-missing-factory", "factory missing")]:
        r = evaluate(["--model", name], data, tmp_path / "run")
        assert r.exit_code == 2
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith(f"Error: entry point {name!r} (from robustcaps-toyplugin)")
        assert message in line and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- positional options
def test_adapter_options_follow_their_model(mnist_like, tmp_path):
    """Options before the first --model apply to all; after a --model, to that one only."""
    model = _example()
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(scripted))
    r = evaluate(["--output-key", "class_scores",
                  "--model", f"{EXAMPLE}:build", "--model-name", "plain",
                  "--model", str(scripted), "--model-name", "shifted", "--mean", "0.5"],
                 mnist_like, tmp_path / "run")
    _check_run(r, tmp_path / "run", lambda x: model(x)["class_scores"], mnist_like, "plain")
    _check_run(r, tmp_path / "run", lambda x: model(x - 0.5)["class_scores"], mnist_like, "shifted")


def test_repeated_option_for_one_model_is_an_error(mnist_like, tmp_path):
    r = evaluate(["--model", "cnn", "--num-classes", "10", "--num-classes", "5"], mnist_like,
                 tmp_path / "run")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines()[-1] == "Error: --num-classes given twice for --model cnn"


@pytest.mark.parametrize("args, message", [
    (["--input-shape", "1,28"], "Error: Invalid value for '--input-shape': expected three positive integers"),
    (["--bounds", "1,0"], "Error: Invalid value for '--bounds': expected LO,HI with LO < HI"),
    (["--std", "0"], "Error: Invalid value for '--std': must be positive"),
    (["--outputs", "scores"], "Error: Invalid value for '--outputs': expected one of logits"),
])
def test_bad_option_values(mnist_like, tmp_path, args, message):
    r = evaluate(["--model", "cnn", *args], mnist_like, tmp_path / "run")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines()[-1].startswith(message)


# --------------------------------------------------------------------------- loading errors
@pytest.fixture
def bad_models(tmp_path) -> Path:
    """A model file whose factories fail the adapter's checks in every documented way."""
    path = tmp_path / "bad_models.py"
    path.write_text(textwrap.dedent("""
        from torch import nn
        class Out(nn.Module):
            def __init__(self, kind):
                super().__init__()
                self.kind = kind
                self.fc = nn.Linear(28 * 28, 10)
            def forward(self, x):
                z = self.fc(x.flatten(1))
                if self.kind == "nan":
                    return z * float("nan")
                if self.kind == "shape":
                    return z[:, :, None]
                return {"scores": z, "features": x}
        def nan_model(): return Out("nan")
        def shape_model(): return Out("shape")
        def dict_model(): return Out("dict")
        NOT_A_FACTORY = 42
    """))
    return path


def _error_cases(bad: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    from robustcaps.models.registry import create_model

    state = create_model("cnn", num_classes=10, input_shape=(1, 28, 28)).state_dict()
    state.pop("classifier.1.weight")
    mismatch = tmp / "mismatch.pt"
    torch.save(state, mismatch)
    not_ts = tmp / "state.pt"
    torch.save(nn.Linear(2, 2).state_dict(), not_ts)
    pickled = tmp / "pickled.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)), pickled)
    return {
        "module not importable": (["--model", "rc_no_such_pkg.models:build"],
                                  "Error: cannot import module 'rc_no_such_pkg.models' (model spec "
                                  "'rc_no_such_pkg.models:build'): no module named 'rc_no_such_pkg'"),
        "factory missing": (["--model", f"{bad}:no_factory"],
                            f"Error: model file {bad} has no attribute 'no_factory'; callables "
                            "defined there: Out, dict_model, nan_model, shape_model"),
        "factory not callable": (["--model", f"{bad}:NOT_A_FACTORY"],
                                 f"Error: '{bad}:NOT_A_FACTORY' is not callable (it is a int)"),
        "file missing": (["--model", f"{tmp / 'nope.py'}:build"],
                         f"Error: model file not found: {tmp / 'nope.py'}"),
        "weights file missing": (["--model", f"cnn@{tmp / 'nope.pt'}"],
                                 f"Error: weights file not found: {tmp / 'nope.pt'}"),
        "not TorchScript": (["--model", str(not_ts)],
                            f"Error: not a TorchScript file: {not_ts} holds a state dict"),
        "pickle without trust": (["--model", str(pickled)],
                                 f"Error: not a TorchScript file: {pickled} is a torch.save pickle; "
                                 "a full pickled module is loaded only with --trust-pickle"),
        "state dict mismatch": (["--model", f"cnn@{mismatch}"],
                                f"Error: state dict {mismatch} does not match architecture 'cnn': "
                                "missing key 'classifier.1.weight' (1 missing"),
        "wrong output shape": (["--model", f"{bad}:shape_model"],
                               f"Error: model '{bad}:shape_model' returned scores of shape (2, 10, 1)"),
        "NaN output": (["--model", f"{bad}:nan_model"],
                       f"Error: model '{bad}:nan_model' returned NaN or Inf scores on a probe batch"),
        "unknown output key": (["--model", f"{bad}:dict_model", "--output-key", "logits"],
                               f"Error: unknown output key 'logits' for model '{bad}:dict_model'; "
                               "available: ['features', 'scores']"),
        "dict without key": (["--model", f"{bad}:dict_model"],
                             "choose one with output_key (CLI: --output-key)"),
        "wrong num classes": (["--model", f"{bad}:dict_model", "--output-key", "scores",
                               "--num-classes", "5"], "returned 10 scores per sample, expected num_classes=5"),
        "unknown name": (["--model", "no-such-model"], "Error: unknown model 'no-such-model'; known names:"),
        "bad spec": (["--model", "net.py"], "Error: model spec 'net.py' names a Python file but no factory"),
    }


CASES = ["module not importable", "factory missing", "factory not callable", "file missing",
         "weights file missing", "not TorchScript", "pickle without trust", "state dict mismatch",
         "wrong output shape", "NaN output", "unknown output key", "dict without key",
         "wrong num classes", "unknown name", "bad spec"]


@pytest.mark.parametrize("case", CASES)
def test_loading_errors_are_one_line_exit_2(case, bad_models, mnist_like, tmp_path):
    args, message = _error_cases(bad_models, tmp_path)[case]
    r = evaluate(args, mnist_like, tmp_path / "run")
    assert r.exit_code == 2, (r.stdout, r.stderr)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, r.stderr
    assert message in errors[0], errors[0]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout


def test_trust_pickle_flag_loads_the_full_module(mnist_like, tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    path = tmp_path / "pickled.pt"
    torch.save(module, path)
    r = evaluate(["--trust-pickle", "--model", str(path)], mnist_like, tmp_path / "run")
    _check_run(r, tmp_path / "run", module, mnist_like, str(path))


def test_diagnose_takes_the_same_model_options(mnist_like, tmp_path):
    r = run("diagnose", "--model", f"{EXAMPLE}:build", "--output-key", "nope", "--dataset",
            f"npz:{mnist_like}", "--n-samples", N, "--device", "cpu", "-q", "--out", tmp_path / "d")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"Error: unknown output key 'nope' for model '{EXAMPLE}:build'")


def _options_command():
    import click

    from robustcaps.commands._model_options import model_options

    @click.command()
    @model_options(default=("cnn",))
    def cmd(models):
        for m in models:
            click.echo(f"{m.spec} {sorted(m.options.items())}")

    return cmd


def test_option_grouping_walks_the_command_line():
    r = CliRunner().invoke(_options_command(), [
        "--bounds", "0,1", "--model", "a", "--output-key=-1", "--model", "b.py:f",
        "--input-shape", "1x8x8", "--bounds", "-1,1", "--trust-pickle"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        "a [('bounds', (0.0, 1.0)), ('output_key', -1), ('trust_pickle', True)]",
        "b.py:f [('bounds', (-1.0, 1.0)), ('input_shape', (1, 8, 8)), ('trust_pickle', True)]",
    ]
    r = CliRunner().invoke(_options_command(), ["--num-classes", "7"])  # applies to the default
    assert r.output.splitlines() == ["cnn [('num_classes', 7)]"]


def test_option_grouping_without_the_parser_hook(monkeypatch):
    """If a future click hides its parser options, one model still works and several
    models with adapter options are refused rather than guessed."""
    import click

    from robustcaps.commands import _model_options as mo

    monkeypatch.setattr(mo._PositionalOption, "add_to_parser", click.Option.add_to_parser)
    r = CliRunner().invoke(_options_command(), ["--model", "a", "--num-classes", "3"])
    assert r.output.splitlines() == ["a [('num_classes', 3)]"]
    r = CliRunner().invoke(_options_command(), ["--model", "a", "--model", "b", "--num-classes", "3"])
    assert r.exit_code == 2 and "use a suite file" in r.output


def test_probability_outputs_warn_once_and_use_log(mnist_like, tmp_path, caplog):
    (tmp_path / "prob_net.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        def build():
            torch.manual_seed(2)
            return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10), nn.Softmax(dim=1))
    """))
    spec = f"{tmp_path / 'prob_net.py'}:build"
    r = evaluate(["--model", spec, "--outputs", "probabilities"], mnist_like, tmp_path / "run")
    import importlib.util as iu

    s = iu.spec_from_file_location("prob_net_ref", tmp_path / "prob_net.py")
    m = iu.module_from_spec(s)
    s.loader.exec_module(m)
    module = m.build()
    _check_run(r, tmp_path / "run", lambda x: torch.log(module(x)), mnist_like, spec)
    assert sum("outputs probabilities" in rec.getMessage() for rec in caplog.records) == 1
