"""What an evaluation run is: frozen, validated settings.

Every setting is declared once, as a dataclass field with :func:`setting` metadata: its
default, how a value is checked and normalised, the words of its help and of its suite
error, and its suite key. From that one declaration come the keyword API
(``robustcaps.evaluate(steps=...)``), the suite schema (:mod:`.suite`), the manifest's
``invocation`` (what ``--resume`` reads back) and the CLI options
(:mod:`robustcaps.commands.evaluate`).

Epsilons are L-infinity sizes in the model's input space: per-image standardised units for
the paper's NORB inputs (no box), [0, 1] units for MNIST/npz images. Defaults:

- epsilon grid ``0:0.5:0.05`` (11 values). The paper's Fig. 3 spans epsilon up to 0.5 on
  per-image standardised images (its text quotes 0.2, Fig. B.3 shows 0.1 and 0.4); a
  standardised image has unit per-image standard deviation, so 0.5 is half of it.
- BIM: 10 steps of ``1.25 * eps / steps`` (see :mod:`robustcaps.attacks.native`), early
  stopping per sample on.
- loss: the adapter's (``ce``: softmax cross-entropy on the scores, for capsule networks
  on the logits of the class activations; ``spread`` is available, but saturates to a zero
  gradient once all margins hold, which masks gradients rather than measures robustness).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..attacks import list_attacks, list_backends
from ..attacks.native import BIM_DEFAULT_STEPS, check_epsilons
from ..errors import RobustcapsError
from ..models.adapter import LOSSES
from ..models.resolve import ModelRequest, model_spec

DEFAULT_EPSILONS: tuple[float, ...] = tuple(round(0.05 * i, 10) for i in range(11))
#: samples per run when n_samples is not given, sized so that the default run (zoo
#: capsnet-small + cnn, 11 epsilons) stays within ~3 minutes on 2 CPU cores: capsnet-small
#: dominates at roughly 0.025 s per sample for a forward+backward pass there (measured: the
#: default BIM run 17 s, targeted BIM 58 s, with the zoo models). FGSM costs
#: 1 fwd+bwd + 10 fwd per sample, BIM up to 10 x 10 fwd+bwd (fewer with early stopping),
#: targeted runs attack K-1 = 4 (sample, target) pairs per sample. Attacks without an
#: entry cost like BIM.
DEFAULT_N_SAMPLES = {"fgsm": 500, "bim": 200, "transfer": 500}
DEFAULT_TARGETED_N_SAMPLES = {"fgsm": 100, "bim": 40, "transfer": 100}
DEFAULT_BATCH_SIZE = 100
DEFAULT_MODELS = ("capsnet-small", "cnn")
DEFAULT_TRANSFER_SOURCE = "cnn"
DEFAULT_TRANSFER_TARGETS = ("capsnet-small", "cnn-b")
#: the threat model that is not a registered attack: craft on a source, test on targets
TRANSFER = "transfer"


class Targeting(str, enum.Enum):
    """Untargeted (change the label), targeted (every sample towards each wrong class) or both."""

    UNTARGETED = "untargeted"
    TARGETED = "targeted"
    BOTH = "both"

    @property
    def flags(self) -> tuple[bool, ...]:
        """The ``targeted`` flag of each pass, untargeted first."""
        return {"untargeted": (False,), "targeted": (True,), "both": (False, True)}[self.value]

    @classmethod
    def parse(cls, value: bool | str) -> Targeting:
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            return cls.TARGETED if value else cls.UNTARGETED
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise RobustcapsError(f"unknown mode {value!r}; use one of "
                                  f"{', '.join(t.value for t in cls)}") from None


# --------------------------------------------------------------------------- checks
def parse_epsilons(text: str) -> list[float]:
    """``"0,0.05,0.1"`` -> [0.0, 0.05, 0.1]; raises RobustcapsError naming the bad item."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise RobustcapsError("--epsilons: give a comma-separated list such as 0,0.05,0.1")
    values = []
    for t in items:
        try:
            values.append(float(t))
        except ValueError:
            raise RobustcapsError(f"--epsilons: {t!r} is not a number") from None
    return check_epsilons(values).tolist()


def parse_eps_range(text: str) -> list[float]:
    """``"START:STOP:STEP"`` -> list, e.g. ``0:0.5:0.05`` gives 11 values. STOP is always
    included, also off the grid: ``0:0.5:0.3`` gives 0, 0.3, 0.5."""
    parts = str(text).split(":")
    if len(parts) != 3:
        raise RobustcapsError(f"--eps-range: expected START:STOP:STEP, got {text!r}")
    try:
        start, stop, step = (float(p) for p in parts)
    except ValueError:
        raise RobustcapsError(f"--eps-range: expected numbers in START:STOP:STEP, got {text!r}") from None
    if not all(map(math.isfinite, (start, stop, step))):
        raise RobustcapsError(f"--eps-range: START, STOP and STEP must be finite, got {text!r}")
    if not step > 0 or not stop >= start:
        raise RobustcapsError(f"--eps-range: need STEP > 0 and STOP >= START, got {text!r}")
    n = (stop - start) / step
    if n >= 1000:
        raise RobustcapsError(f"--eps-range: {text!r} gives more than 1000 epsilons")
    grid = [round(start + i * step, 10) for i in range(int(np.floor(n + 1e-9)) + 1)]
    if stop - grid[-1] > 1e-9 * max(1.0, abs(stop)):  # STOP off the grid: still included
        grid.append(round(stop, 10))
    return check_epsilons(grid).tolist()


def _names(what: str, known: Callable[[], Sequence[str]]) -> Callable[[Any], tuple[str, ...]]:
    """A name or a list of names (``all``: every known one) -> a tuple without repeats."""

    def parse(value: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else list(value)
        out: list[str] = []
        for item in items:
            item = str(item).strip().lower()
            for v in (list(known()) if item == "all" else [item]):
                if v not in known():
                    raise RobustcapsError(f"unknown {what} {item!r}; known: {', '.join(known())}, all")
                out += [] if v in out else [v]
        if not out:
            raise RobustcapsError(f"no {what} given")
        return tuple(out)

    return parse


def threats() -> tuple[str, ...]:
    """What ``attack`` may name: every registered attack, and ``transfer``."""
    return (*list_attacks(), TRANSFER)


def _epsilons(value: Any) -> tuple[float, ...]:
    eps = check_epsilons(value).tolist()
    if len(set(eps)) != len(eps):
        raise RobustcapsError("epsilons: the list contains duplicates")
    return tuple(eps)


def _int_at_least(name: str, low: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise RobustcapsError(f"{name} must be an integer >= {low}, got {value!r}")
        return int(value)

    return parse


def _positive(value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and value > 0):
        raise RobustcapsError(f"step size must be a positive number, got {value!r}")
    return float(value)


def _one_of(what: str, known: Callable[[], Sequence[str]]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in known():
            raise RobustcapsError(f"unknown {what} {value!r}; known: {', '.join(known())}")
        return str(value)

    return parse


def _flag(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise RobustcapsError(f"expected true or false, got {value!r}")
    return bool(value)


def _text(value: Any) -> str:
    if not isinstance(value, (str, Path)) or not str(value):
        raise RobustcapsError(f"expected a non-empty string, got {value!r}")
    return str(value)


def _named(value: Any) -> Any:
    """A non-empty name or spec; Python objects (datasets, models) pass as they are."""
    if isinstance(value, str) and not value.strip():
        raise RobustcapsError("expected a non-empty name, got ''")
    return value


def _models(value: Any) -> tuple[Any, ...]:
    items = tuple(value)
    if not items:
        raise RobustcapsError("models: give at least one model")
    for m in items:
        if isinstance(m, dict):
            ModelRequest.from_mapping(m)  # raises naming a bad adapter option
    return items


def setting(default: Any, help: str, *, parse: Callable[[Any], Any] | None = None,
            expected: str | Callable[[], str] = "", toml: type | tuple[type, ...] | None = None,
            suite: str | None = None, cli: dict[str, Any] | None = None) -> Any:
    """A setting: ``parse`` checks and normalises a value (None is always allowed where
    the default is None); ``toml``/``expected``: the value type a suite must use and how an
    error describes it; ``suite``: its suite key when that differs; ``cli``: click option
    settings (absent for options the command declares itself)."""
    meta = {"help": help, "parse": parse, "expected": expected, "toml": toml, "suite": suite,
            "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DataSelection:
    """Which samples are attacked."""

    dataset: Any = setting("synthnorb", "Evaluation data: synthnorb, smallnorb, mnist, npz:PATH, "
                           "a Dataset or an (x, y) pair.", parse=_named, toml=str, expected="a dataset name",
                           cli={"metavar": "synthnorb|smallnorb|mnist|npz:PATH", "show_default": True})
    split: str = setting("test", "Dataset split.", parse=_text, toml=str, expected="a split name",
                         cli={"show_default": True})
    data_dir: str | None = setting(None, "Folder holding the dataset files.", parse=_text,
                                   toml=str, expected="a folder path", cli={"path": True})
    n_samples: int | None = setting(
        None, "Samples to attack (class-stratified). Default depends on the attack; printed.",
        parse=_int_at_least("n_samples", 1), toml=int, expected="an integer >= 1",
        cli={"type": "count"})


@dataclass(frozen=True)
class ThreatSettings:
    """What the attacker may do."""

    attack: tuple[str, ...] = setting(
        ("bim",), "Attack(s) to run: a registered attack, transfer, all or a list.",
        parse=_names("attack", threats), toml=(str, list),
        expected=lambda: f"{', '.join(threats())}, all or a list of them")
    targeted: Targeting = setting(
        Targeting.UNTARGETED, "untargeted, targeted (every sample towards each wrong class) "
        "or both.", parse=Targeting.parse, toml=str, suite="mode",
        expected="untargeted, targeted or both")
    epsilons: tuple[float, ...] = setting(
        DEFAULT_EPSILONS, "L-inf epsilons in input units.", parse=_epsilons, toml=list,
        expected="a non-empty list of distinct numbers >= 0")
    steps: int = setting(BIM_DEFAULT_STEPS, "Iterations of iterative attacks (BIM).",
                         parse=_int_at_least("steps", 1), toml=int, expected="an integer >= 1",
                         cli={"type": "count", "show_default": True})
    step_size: float | None = setting(
        None, "Step of iterative attacks in input units. Default 1.25*eps/steps.",
        parse=_positive, toml=(int, float), expected="a number > 0", cli={"type": float})
    early_stop: bool = setting(
        True, "Iterative attacks: keep each sample's first success and stop computing for it "
        "(--no-early-stop runs every step, like torchattacks/foolbox).", parse=_flag,
        toml=bool, expected="true or false", cli={"flag": True, "show_default": True})
    loss: str | None = setting(
        None, "Loss the attacks differentiate. Default ce: cross-entropy on the scores "
        "(for capsule nets the logits of the class activations; spread saturates).",
        parse=_one_of("loss", lambda: LOSSES), toml=str, expected=" or ".join(LOSSES),
        cli={"choices": lambda: LOSSES})
    backend: tuple[str, ...] = setting(
        ("native",), "Attack implementation (native: the built-in sweep engine); 'all' runs "
        "every backend on identical inputs and reports their largest disagreement.",
        parse=_names("backend", list_backends), toml=(str, list),
        expected=lambda: f"{', '.join(list_backends())}, all or a list of them",
        cli={"choices": lambda: (*list_backends(), "all"), "show_default": True})


@dataclass(frozen=True)
class TransferSettings:
    """Transfer: craft on a source model, evaluate every target on the same inputs."""

    source: Any = setting(None, "Transfer: source model (default cnn).", parse=_named, toml=str,
                          expected="a model spec", cli={"metavar": "SPEC"})
    transfer_targets: tuple[Any, ...] | None = setting(
        None, "Transfer: target model; repeat. Default capsnet-small and cnn-b (zoo).",
        parse=_models, toml=list, suite="targets", expected="a non-empty list of model specs",
        cli={"flag_name": "--target", "dest": "targets", "multiple": True, "metavar": "SPEC"})
    transfer_attack: str = setting(
        "fgsm", "Transfer: attack crafting the examples on the source.",
        parse=_one_of("transfer attack", list_attacks), toml=str,
        expected=lambda: " or ".join(list_attacks()),
        cli={"choices": list_attacks, "show_default": True})


@dataclass(frozen=True)
class RunSettings:
    """Models, batching, seed and device."""

    models: tuple[Any, ...] | None = setting(
        None, "Models: specs, nn.Modules, ModelAdapters or suite tables; default "
        "capsnet-small and cnn.", parse=_models, toml=list,
        expected="a non-empty list of model specs or tables {spec = ..., <adapter options>}")
    batch_size: int | None = setting(None, "Samples per unit of work (default 100).",
                                     parse=_int_at_least("batch size", 1), toml=int,
                                     expected="an integer >= 1")
    seed: int = setting(0, "Random seed.", parse=_int_at_least("seed", 0), toml=int,
                        expected="an integer >= 0")
    device: Any = setting("auto", "Where to run.", toml=str, expected="auto, cpu or cuda[:N]")


@dataclass(frozen=True)
class OutputSettings:
    """Where results go; not part of what the run computes."""

    out: Path | None = None
    resume: bool = False
    n_examples: int = 3
    figures: bool = True
    progress: bool = True


SECTIONS = {"data": DataSelection, "threat": ThreatSettings, "transfer": TransferSettings,
            "run": RunSettings}


def iter_settings() -> Iterator[tuple[str, dataclasses.Field]]:
    """(section name, field) of every setting, in declaration order."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield section, f


SETTING_KEYS = tuple(f.name for _, f in iter_settings())


def parse_setting(key: str, value: Any) -> Any:
    """Check and normalise one setting's value (None: its default)."""
    f = _FIELDS.get(key)
    if f is None:
        raise RobustcapsError(f"unknown setting {key!r}; known: {', '.join(SETTING_KEYS)}")
    if value is None:
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    parse = f.metadata["parse"]
    return parse(value) if parse is not None else value


_FIELDS = {f.name: f for _, f in iter_settings()}


@dataclass(frozen=True)
class EvaluationConfig:
    """One evaluation run: validated settings by section, plus where the output goes."""

    data: DataSelection = field(default_factory=DataSelection)
    threat: ThreatSettings = field(default_factory=ThreatSettings)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    run: RunSettings = field(default_factory=RunSettings)
    output: OutputSettings = field(default_factory=OutputSettings)

    @classmethod
    def from_kwargs(cls, *, output: OutputSettings | None = None, **settings: Any) -> EvaluationConfig:
        """Build from flat keyword settings (the keyword API, a suite, a manifest)."""
        unknown = sorted(set(settings) - set(SETTING_KEYS))
        if unknown:
            raise RobustcapsError(f"unknown setting(s) {', '.join(unknown)}; "
                                  f"known: {', '.join(SETTING_KEYS)}")
        parts = {name: section(**{f.name: parse_setting(f.name, settings.get(f.name))
                                  for f in dataclasses.fields(section)})
                 for name, section in SECTIONS.items()}
        return cls(**parts, output=output or OutputSettings())

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, *, output: OutputSettings | None = None,
                     **overrides: Any) -> EvaluationConfig:
        """The settings a run directory was started with (its manifest's ``invocation``),
        with ``overrides`` on top, to resume it: ``output`` (default settings) is pointed at
        that directory."""
        output = dataclasses.replace(output or OutputSettings(), out=Path(run_dir), resume=True)
        return cls.from_kwargs(**{**read_invocation(run_dir), **_given(overrides)}, output=output)

    def settings(self) -> dict[str, Any]:
        """Flat ``{key: value}`` of every setting (Python objects kept)."""
        return {f.name: getattr(getattr(self, section), f.name) for section, f in iter_settings()}

    def replace(self, **overrides: Any) -> EvaluationConfig:
        """A copy with the given settings changed (None values are ignored)."""
        return self.from_kwargs(**{**self.settings(), **_given(overrides)}, output=self.output)

    @property
    def white_box(self) -> tuple[str, ...]:
        """The registered attacks run white-box (everything but ``transfer``)."""
        return tuple(a for a in self.threat.attack if a != TRANSFER)

    @property
    def models(self) -> tuple[Any, ...]:
        """The white-box models (default ones when none given; none without white-box attacks)."""
        if not self.white_box:
            return ()
        return tuple(self.run.models) if self.run.models else DEFAULT_MODELS

    @property
    def batch_size(self) -> int:
        return self.run.batch_size or DEFAULT_BATCH_SIZE

    def default_n_samples(self) -> int:
        """The smallest default sample count among this run's attacks and modes."""
        return min((DEFAULT_TARGETED_N_SAMPLES if t else DEFAULT_N_SAMPLES)
                   .get(a, DEFAULT_N_SAMPLES["bim"] if not t else DEFAULT_TARGETED_N_SAMPLES["bim"])
                   for a in self.threat.attack for t in self.threat.targeted.flags)

    def to_manifest(self) -> dict[str, Any]:
        """The JSON form of the settings (``invocation`` in manifest.json): what can be
        written as JSON; models given as Python objects are left out (pass them again)."""
        out: dict[str, Any] = {}
        for key, value in self.settings().items():
            if key == "models" and not self.white_box:
                value = None
            json_value = _to_json(value)
            if json_value is not _UNWRITABLE:
                out[key] = json_value
        return out


_UNWRITABLE = object()


def _to_json(value: Any) -> Any:
    """Settings value -> JSON value, or _UNWRITABLE for Python objects (modules, tensors)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value.value if isinstance(value, Targeting) else value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        items = [_to_json(v) if isinstance(v, (int, float, str)) else model_spec(v) for v in value]
        return _UNWRITABLE if any(i is None for i in items) else items
    spec = model_spec(value)
    return _UNWRITABLE if spec is None else spec


def _given(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if v is not None}


def read_invocation(run_dir: str | Path) -> dict[str, Any]:
    """The settings stored in ``run_dir/manifest.json`` (written by this or an older version)."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise RobustcapsError(f"nothing to resume: {run_dir} holds no manifest.json")
    try:
        invocation = json.loads(path.read_text()).get("invocation")
    except (json.JSONDecodeError, AttributeError):
        raise RobustcapsError(f"cannot resume {run_dir}: manifest.json is not valid JSON") from None
    if not isinstance(invocation, dict):
        raise RobustcapsError(f"cannot resume {run_dir}: its manifest records no settings")
    unknown = sorted(set(invocation) - set(SETTING_KEYS))
    if unknown:
        raise RobustcapsError(f"cannot resume {run_dir}: its manifest has settings this version "
                              f"does not know ({', '.join(unknown)})")
    return invocation
