"""Model specs through the Python API: every spec kind loads, agrees with the module it
names (oracle: calling that module directly), and every failure says what is wrong."""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import robustcaps
from robustcaps.errors import ModelLoadError, RobustcapsError
from robustcaps.models import plugins
from robustcaps.models.loading import load_model, parse_adapter_options
from robustcaps.models.resolve import resolve_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "models" / "examples" / "third_party_net.py"
PLUGIN_DIR = Path(__file__).resolve().parent / "plugin_pkg"


def _load_example_module():
    spec = importlib.util.spec_from_file_location("example_third_party_net", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def plugin_path(monkeypatch):
    """Put tests/plugin_pkg on sys.path: importlib.metadata then finds its *.dist-info and
    the entry points it declares, exactly as for an installed package."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    for name in [m for m in sys.modules if m.startswith("robustcaps_toyplugin")]:
        monkeypatch.delitem(sys.modules, name)
    return PLUGIN_DIR


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, kind, fields", [
    ("capsnet-small", "name", {"name": "capsnet-small"}),
    ("toy-tiny", "name", {"name": "toy-tiny"}),
    ("pkg.sub:make", "module", {"module": "pkg.sub", "attr": "make"}),
    ("pkg:Factory.build", "module", {"module": "pkg", "attr": "Factory.build"}),
    ("dir/net.py:build", "file", {"path": Path("dir/net.py"), "attr": "build"}),
    ("C:\\models\\net.py:build", "file", {"path": Path("C:\\models\\net.py"), "attr": "build"}),
    ("models/scripted.pt", "torchscript", {"path": Path("models/scripted.pt")}),
    ("scripted.pth", "torchscript", {"path": Path("scripted.pth")}),
    ("C:\\m\\scripted.pt", "torchscript", {"path": Path("C:\\m\\scripted.pt")}),
])
def test_parse_spec_kinds(text, kind, fields):
    spec = plugins.parse_spec(text)
    assert spec.kind == kind
    for key, value in fields.items():
        assert getattr(spec, key) == value


def test_parse_weights_spec_and_user_code_flag():
    s = plugins.parse_spec("cnn@runs/a@b/w.pt")  # names hold no '@'; weight paths may
    assert (s.kind, s.base.kind, s.base.name, s.path) == ("weights", "name", "cnn", Path("runs/a@b/w.pt"))
    assert not s.runs_user_code
    s = plugins.parse_spec("net.py:build@w.pt")
    assert (s.kind, s.base.kind, s.base.attr) == ("weights", "file", "build")
    assert s.runs_user_code
    s = plugins.parse_spec("my@dir/net.py:build@w@1.pt")
    assert (s.base.path, s.base.attr, s.path) == (Path("my@dir/net.py"), "build", Path("w@1.pt"))
    s = plugins.parse_spec("pkg.mod:make@w.pt")
    assert (s.base.kind, s.base.module, s.path) == ("module", "pkg.mod", Path("w.pt"))
    assert not plugins.parse_spec("scripted.pt").runs_user_code


@pytest.mark.parametrize("text, message", [
    ("", "empty model spec"),
    ("net.py", "names a Python file but no factory: use net.py:FACTORY"),
    ("net.py:1bad", "is not a Python name"),
    ("@w.pt", "expected BASE@path/to/weights.pt"),
    ("has space", "cannot parse model spec"),
])
def test_parse_spec_errors(text, message):
    with pytest.raises(ModelLoadError, match=message):
        plugins.parse_spec(text)


# --------------------------------------------------------------------------- file.py:factory
def test_example_file_factory_matches_module_and_gradients():
    a = robustcaps.load_model(f"{EXAMPLE}:build", output_key="class_scores",
                              input_shape=(1, 28, 28), bounds=(0, 1), device="cpu")
    ref = _load_example_module().build()
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    assert a.num_classes == 10 and a.bounds == (0.0, 1.0) and not a.model.training
    torch.testing.assert_close(a.scores(x), ref(x)["class_scores"])
    # Gradient of the CE loss w.r.t. the input, against autograd on the raw module.
    y = torch.arange(5) % 10
    _, grad, _ = a.input_gradient(x, y)
    xr = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(ref(xr)["class_scores"], y, reduction="sum").backward()
    torch.testing.assert_close(grad, xr.grad)
    assert grad.abs().sum() > 0


def test_file_factory_gets_num_classes_and_input_shape_when_it_accepts_them(tmp_path):
    f = write(tmp_path / "net.py", """
        import torch
        from torch import nn
        SEEN = []
        def build(num_classes=3, input_shape=(1, 4, 4)):
            SEEN.append((num_classes, tuple(input_shape)))
            c, h, w = input_shape
            return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes), nn.Dropout(0.5))
        def bare():
            return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    """)
    a = load_model(f"{f}:build", num_classes=7, input_shape=(2, 3, 3), device="cpu")
    assert a.num_classes == 7 and a.input_shape == (2, 3, 3)
    assert not a.model.training  # eval mode: the dropout is off, scores are deterministic
    x = torch.randn(4, 2, 3, 3)
    torch.testing.assert_close(a.scores(x), a.scores(x))
    b = load_model(f"{f}:bare", input_shape=(1, 4, 4), device="cpu")  # bare() gets nothing
    assert b.num_classes == 3


def test_file_sibling_imports_work_and_path_is_restored(tmp_path):
    write(tmp_path / "helpers_rc_test.py", "K = 4\n")
    f = write(tmp_path / "net.py", """
        from torch import nn
        from helpers_rc_test import K
        def build():
            return nn.Sequential(nn.Flatten(), nn.Linear(4, K))
    """)
    before = list(sys.path)
    a = load_model(f"{f}:build", input_shape=(1, 2, 2), device="cpu")
    assert a.num_classes == 4 and sys.path == before


def test_mean_std_are_applied_inside_the_adapter(tmp_path):
    f = write(tmp_path / "net.py", """
        import torch
        from torch import nn
        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4))
    """)
    a = load_model(f"{f}:build", input_shape=(2, 3, 3), mean=(0.5, -1.0), std=(2.0, 0.25), device="cpu")
    x = torch.randn(3, 2, 3, 3)
    mean = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1)
    std = torch.tensor([2.0, 0.25]).view(1, 2, 1, 1)
    torch.testing.assert_close(a.scores(x), a.model((x - mean) / std))


# --------------------------------------------------------------------------- module:factory
def test_module_factory(tmp_path, monkeypatch):
    write(tmp_path / "rc_test_models.py", """
        import torch
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(3)
                self.fc = nn.Linear(8, 5)
            def forward(self, x):
                return self.fc(x.flatten(1)).softmax(1), x   # probabilities first, in a tuple
            @classmethod
            def build(cls):
                return cls()
        NOT_CALLABLE = 3
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="probabilities"):
        a = load_model("rc_test_models:Net.build", input_shape=(2, 2, 2), outputs="probabilities",
                       output_key=0, device="cpu")
    x = torch.randn(6, 2, 2, 2)
    torch.testing.assert_close(a.scores(x), torch.log(a.model(x)[0]))
    with pytest.raises(ModelLoadError, match=r"'rc_test_models:NOT_CALLABLE' is not callable \(it is a int\)"):
        load_model("rc_test_models:NOT_CALLABLE", input_shape=(2, 2, 2))
    with pytest.raises(ModelLoadError, match="module 'rc_test_models' has no attribute 'nope'"):
        load_model("rc_test_models:nope")
    with pytest.raises(ModelLoadError, match="cannot import module 'rc_missing_pkg.sub'.*no module named 'rc_missing_pkg'"):
        load_model("rc_missing_pkg.sub:build")


# --------------------------------------------------------------------------- TorchScript
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_matches_eager_model(tmp_path):
    ref = _load_example_module().build()
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(ref), str(path))
    a = load_model(str(path), output_key="class_scores", input_shape=(1, 28, 28), bounds=(0, 1),
                   device="cpu")
    assert isinstance(a.model, torch.jit.ScriptModule) and not a.model.training
    x = torch.rand(4, 1, 28, 28)
    y = torch.tensor([1, 2, 3, 4])
    torch.testing.assert_close(a.scores(x), ref(x)["class_scores"])
    b = load_model(f"{EXAMPLE}:build", output_key="class_scores", input_shape=(1, 28, 28), device="cpu")
    torch.testing.assert_close(a.input_gradient(x, y)[1], b.input_gradient(x, y)[1])


def test_not_torchscript_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match="not a TorchScript file: .*garbage.pt"):
        load_model(str(garbage))
    sd = tmp_path / "sd.pt"
    torch.save(nn.Linear(2, 2).state_dict(), sd)
    with pytest.raises(ModelLoadError, match=r"holds a state dict; .*ARCH@"):
        load_model(str(sd))
    with pytest.raises(ModelLoadError, match="model file not found"):
        load_model(str(tmp_path / "missing.pt"))


def test_full_module_pickle_needs_trust(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    path = tmp_path / "full.pt"
    torch.save(module, path)
    with pytest.raises(ModelLoadError, match="loaded only with --trust-pickle"):
        load_model(str(path), input_shape=(1, 2, 2))
    a = load_model(str(path), input_shape=(1, 2, 2), trust_pickle=True, device="cpu")
    x = torch.randn(3, 1, 2, 2)
    torch.testing.assert_close(a.scores(x), module(x))


# --------------------------------------------------------------------------- NAME@weights
@pytest.fixture
def cnn_weights(tmp_path):
    """A state dict of `cnn` built for 1x28x28, 10 classes, and the module it came from."""
    torch.manual_seed(0)
    from robustcaps.models.registry import create_model

    module = create_model("cnn", num_classes=10, input_shape=(1, 28, 28)).eval()
    path = tmp_path / "cnn.pt"
    torch.save(module.state_dict(), path)
    return module, path


def test_arch_with_weights_equals_source(cnn_weights, tmp_path):
    module, path = cnn_weights
    x = torch.randn(3, 1, 28, 28)
    a = load_model(f"cnn@{path}", num_classes=10, input_shape=(1, 28, 28), device="cpu")
    torch.testing.assert_close(a.scores(x), module(x))
    # Wrapped checkpoints and DataParallel "module." prefixes load the same weights.
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in module.state_dict().items()}},
               wrapped)
    b = load_model(f"cnn@{wrapped}", device="cpu",
                   defaults={"num_classes": 10, "input_shape": (1, 28, 28), "bounds": (0, 1)})
    torch.testing.assert_close(b.scores(x), module(x))
    assert b.bounds == (0.0, 1.0)  # a built-in architecture takes the data's box


def test_state_dict_mismatches_name_the_first_key(cnn_weights, tmp_path):
    module, path = cnn_weights
    # Wrong architecture input channels: shape mismatch, named.
    with pytest.raises(ModelLoadError, match=r"key 'features.0.weight' has shape \(32, 1, 5, 5\), "
                                             r"the architecture expects \(32, 2, 5, 5\)"):
        load_model(f"cnn@{path}", num_classes=10)
    state = module.state_dict()
    missing = tmp_path / "missing.pt"
    torch.save({k: v for k, v in state.items() if k != "classifier.4.bias"}, missing)
    with pytest.raises(ModelLoadError, match=r"does not match architecture 'cnn': missing key "
                                             r"'classifier.4.bias' \(1 missing, 0 unexpected"):
        load_model(f"cnn@{missing}", num_classes=10, input_shape=(1, 28, 28))
    extra = tmp_path / "extra.pt"
    torch.save({**state, "head.weight": torch.zeros(2)}, extra)
    with pytest.raises(ModelLoadError, match="unexpected key 'head.weight'"):
        load_model(f"cnn@{extra}", num_classes=10, input_shape=(1, 28, 28))
    notsd = tmp_path / "notsd.pt"
    torch.save({"epoch": 1, "lr": 0.1}, notsd)
    with pytest.raises(ModelLoadError, match="does not hold a state dict"):
        load_model(f"cnn@{notsd}")
    with pytest.raises(ModelLoadError, match="weights file not found"):
        load_model(f"cnn@{tmp_path / 'nope.pt'}")
    with pytest.raises(ModelLoadError, match="unknown model 'nonet'"):
        load_model(f"nonet@{path}")


def test_weights_with_pickled_objects_need_trust(cnn_weights, tmp_path):
    module, _ = cnn_weights
    path = tmp_path / "ckpt.pt"
    torch.save({"model": module.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ModelLoadError, match="holds pickled Python objects.*--trust-pickle"):
        load_model(f"cnn@{path}", num_classes=10, input_shape=(1, 28, 28))
    a = load_model(f"cnn@{path}", num_classes=10, input_shape=(1, 28, 28), trust_pickle=True,
                   device="cpu")
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(a.scores(x), module(x))


# --------------------------------------------------------------------------- probe checks
@pytest.mark.parametrize("body, message", [
    ("return x.flatten(1)[:, :3] * float('nan')", "NaN or Inf scores"),
    ("return x.flatten(1)[:, :3, None]", r"scores of shape \(2, 3, 1\)"),
    ("return x.flatten(1)[:, 0]", r"scores of shape \(2,\)"),
    ("return {'a': x.flatten(1)[:, :3]}", "returns a dict with keys \\['a'\\]: choose one with output_key"),
    ("raise RuntimeError('boom')", "failed on a probe batch of shape \\(2, 1, 2, 2\\): RuntimeError: boom"),
])
def test_probe_failures(tmp_path, body, message):
    f = write(tmp_path / "bad.py", f"""
        from torch import nn
        class Bad(nn.Module):
            def forward(self, x):
                {body}
        def build():
            return Bad()
    """)
    with pytest.raises(ModelLoadError, match=message):
        load_model(f"{f}:build", input_shape=(1, 2, 2), device="cpu")


def test_wrong_num_classes_and_unknown_output_key(tmp_path):
    f = write(tmp_path / "ten.py", """
        from torch import nn
        def build():  # takes no num_classes, so --num-classes is only checked
            return nn.Sequential(nn.Flatten(), nn.Linear(4, 10))
    """)
    with pytest.raises(ModelLoadError, match="returned 10 scores per sample, expected num_classes=5"):
        load_model(f"{f}:build", input_shape=(1, 2, 2), num_classes=5)
    with pytest.raises(ModelLoadError, match=r"unknown output key 'logits'.*available: \['class_scores', 'embedding'\]"):
        load_model(f"{EXAMPLE}:build", output_key="logits", input_shape=(1, 28, 28))
    with pytest.raises(ModelLoadError, match="input shape of model .* is unknown: pass --input-shape"):
        load_model(f"{EXAMPLE}:build", output_key="class_scores")


def test_factory_errors(tmp_path):
    f = write(tmp_path / "facs.py", """
        def needs(depth): ...
        def raises(): raise ValueError("bad config")
        def returns_int(): return 3
        VALUE = 1
    """)
    with pytest.raises(ModelLoadError, match="requires argument\\(s\\) depth"):
        load_model(f"{f}:needs")
    with pytest.raises(ModelLoadError, match="raised ValueError: bad config"):
        load_model(f"{f}:raises")
    with pytest.raises(ModelLoadError, match="produced a int, expected a torch.nn.Module"):
        load_model(f"{f}:returns_int")
    with pytest.raises(ModelLoadError, match=r"has no attribute 'nope'; callables defined there: needs, raises, returns_int"):
        load_model(f"{f}:nope")
    with pytest.raises(ModelLoadError, match="model file not found"):
        load_model(f"{tmp_path / 'missing.py'}:build")
    broken = write(tmp_path / "broken.py", "def f(:\n")
    with pytest.raises(ModelLoadError, match="error while importing model file .*broken.py: SyntaxError"):
        load_model(f"{broken}:f")


# --------------------------------------------------------------------------- names, entry points
def test_builtin_name_is_built_for_the_data():
    with pytest.warns(UserWarning, match="untrained architecture"):
        a = load_model("cnn", device="cpu", defaults={"num_classes": 10, "input_shape": (1, 28, 28),
                                                      "bounds": (0, 1)})
    assert (a.num_classes, a.input_shape, a.bounds) == (10, (1, 28, 28), (0.0, 1.0))
    assert a.scores(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'; known names: .*cnn"):
        load_model("no-such-model")


def test_entry_points_are_found_and_imported_lazily(plugin_path):
    assert {"toy-tiny", "toy-adapter"} <= set(plugins.entry_points())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_model("cnn", device="cpu")
    assert "robustcaps_toyplugin" not in sys.modules  # listing/other specs import nothing
    a = load_model("toy-tiny", device="cpu")
    import robustcaps_toyplugin as plugin

    assert (a.num_classes, a.input_shape, a.bounds) == (4, (1, 8, 8), (0.0, 1.0))
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(a.scores(x), plugin.TinyNet(4)(x))
    b = load_model("toy-tiny", num_classes=6, device="cpu")  # forwarded to the factory
    assert b.scores(x).shape == (5, 6)


def test_entry_point_returning_an_adapter_keeps_its_settings(plugin_path):
    a = load_model("toy-adapter", bounds=(-1, 1), device="cpu")
    assert (a.name, a.num_classes, a.output_key, a.bounds) == ("toy-adapter", 3, 0, (-1.0, 1.0))
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(a.scores(x), a.model(x)[0])


def test_broken_entry_points(plugin_path):
    with pytest.raises(ModelLoadError, match="entry point 'toy-missing-factory' .*factory missing"):
        load_model("toy-missing-factory")
    with pytest.raises(ModelLoadError, match="cannot import module 'robustcaps_toyplugin_absent'"):
        load_model("toy-missing-module")


# --------------------------------------------------------------------------- options, API
def test_parse_adapter_options():
    got = parse_adapter_options({"num-classes": "10", "input_shape": "1x28x28", "bounds": [0, 1],
                                 "mean": "0.5,0.25", "std": 0.5, "output_key": "-1",
                                 "outputs": "probabilities", "trust_pickle": True})
    assert got == {"num_classes": 10, "input_shape": (1, 28, 28), "bounds": (0.0, 1.0),
                   "mean": (0.5, 0.25), "std": (0.5,), "output_key": -1,
                   "outputs": "probabilities", "trust_pickle": True}
    assert parse_adapter_options({"output_key": "logits"}) == {"output_key": "logits"}
    for bad, message in [({"input_shape": "1,28"}, "three positive"), ({"bounds": "1,0"}, "LO < HI"),
                         ({"std": "0"}, "positive"), ({"outputs": "scores"}, "one of"),
                         ({"num_classes": "x"}, "integer"), ({"colour": 1}, "unknown model option"),
                         ({"mean": "nan"}, "finite")]:
        with pytest.raises(RobustcapsError, match=message):
            parse_adapter_options(bad)


def test_resolve_model_and_adapt():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    a = resolve_model(module, defaults={"input_shape": (1, 2, 2), "bounds": (0, 1)}, device="cpu")
    assert (a.num_classes, a.bounds) == (3, (0.0, 1.0))
    assert resolve_model(a, device="cpu") is a
    with pytest.raises(RobustcapsError, match="cannot be applied to a ready ModelAdapter"):
        resolve_model(a, bounds=(0, 2))
    t = resolve_model({"spec": f"{EXAMPLE}:build", "output_key": "class_scores",
                       "input_shape": "1,28,28"}, device="cpu")
    assert t.num_classes == 10
    b = robustcaps.adapt(module, input_shape=(1, 2, 2), device="cpu")
    x = torch.randn(2, 1, 2, 2)
    torch.testing.assert_close(b.scores(x), module(x))


def test_api_evaluate_and_diagnose_return_dataframes(tmp_path):
    ex = _load_example_module()
    model = ex.build()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 28, 28, generator=g)
    y = model(x)["class_scores"].argmax(1)  # labels the model gets right at eps 0
    y[:3] = (y[:3] + 1) % 10  # ... except three
    spec = {"spec": f"{EXAMPLE}:build", "output_key": "class_scores", "name": "example"}
    res = robustcaps.evaluate(spec, (x, y), "fgsm", epsilons=[0.0, 0.3],
                              n_samples=12, device="cpu", progress=False, figures=False,
                              out=tmp_path / "run")
    acc = res.summary.set_index("epsilon")["accuracy"] if "accuracy" in res.summary else None
    assert acc is not None, res.summary.columns
    assert acc.loc[0.0] == pytest.approx(9 / 12)
    assert acc.loc[0.3] <= acc.loc[0.0]
    assert res.paths and all(Path(p).is_file() for p in res.paths.values())
    assert len(res.records) == 12 * 2
    d = robustcaps.diagnose([spec], (x, y), attacks=False, float64=False,
                            finite_differences=False, figures=False, progress=False, device="cpu",
                            out=None)
    assert list(d.stats["model"]) == ["example"]
    assert not d.verdicts.empty and d.paths == {}
    assert np.isfinite(d.stats["zero_fraction"]).all()


def test_zoo_name_and_zoo_name_with_user_weights(tmp_path, monkeypatch):
    """A zoo entry loads its own weights; ZOO@file keeps the card's architecture and bounds
    but takes the user's weights."""
    import json

    from robustcaps.models.registry import create_model
    from robustcaps.utils import sha256_file

    torch.manual_seed(0)
    zoo_module = create_model("cnn", num_classes=10, input_shape=(1, 28, 28)).eval()
    user_module = create_model("cnn", num_classes=10, input_shape=(1, 28, 28)).eval()
    entry = tmp_path / "zoo" / "cnn-test"
    entry.mkdir(parents=True)
    torch.save(zoo_module.state_dict(), entry / "weights.pt")
    card = {"name": "cnn-test", "arch": "cnn", "arch_kwargs": {}, "num_classes": 10,
            "input_shape": [1, 28, 28], "bounds": [0, 1], "weights": "weights.pt",
            "sha256": sha256_file(entry / "weights.pt")}
    (entry / "card.json").write_text(json.dumps(card))
    user = tmp_path / "user.pt"
    torch.save(user_module.state_dict(), user)
    monkeypatch.setenv("ROBUSTCAPS_ZOO", str(tmp_path / "zoo"))
    x = torch.rand(3, 1, 28, 28)
    a = load_model("cnn-test", device="cpu")
    assert (a.name, a.bounds, a.input_shape) == ("cnn-test", (0.0, 1.0), (1, 28, 28))
    torch.testing.assert_close(a.scores(x), zoo_module(x))
    b = load_model(f"cnn-test@{user}", device="cpu")
    assert b.bounds == (0.0, 1.0)
    torch.testing.assert_close(b.scores(x), user_module(x))
    assert not torch.allclose(a.scores(x), b.scores(x))


def test_resolve_model_keeps_a_tables_own_loss_when_none_is_given():
    from torch import nn as _nn

    from robustcaps.models.adapter import ModelAdapter as _Adapter

    a = resolve_model({"spec": "cnn", "loss": "cw", "input_shape": "1,8,8", "num_classes": 3},
                      device="cpu", loss=None)
    assert a.loss_name == "cw"
    b = resolve_model({"spec": "cnn", "input_shape": "1,8,8", "num_classes": 3}, loss="margin")
    assert b.loss_name == "margin"
    ready = _Adapter(_nn.Linear(4, 2), input_shape=(4,), num_classes=2, device="cpu")
    assert resolve_model(ready, loss="cw").loss_name == "cw" and ready.loss_name == "ce"
    assert resolve_model(ready, device="auto", loss=None) is ready
