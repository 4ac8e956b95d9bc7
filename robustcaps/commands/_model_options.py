"""``--model SPEC`` and the adapter options that go with it, shared by evaluate/diagnose.

Interface used by commands: decorate with :func:`model_options`; the command receives
``models: list[ModelRequest]`` (in command-line order). Each request's ``options`` are
keyword arguments for :func:`robustcaps.models.loading.load_model`; load it with
``request.load(device=..., defaults={"num_classes": ..., "input_shape": ..., "bounds": ...})``.

Adapter options are positional: each one applies to the ``--model`` it follows. Options
given before the first ``--model`` are defaults for every model (and for the command's
default models when no ``--model`` is given); an option after a ``--model`` overrides
them for that model only. Example::

    robustcaps evaluate --input-shape 1,28,28 --bounds 0,1 \\
        --model net.py:build --output-key class_scores \\
        --model scripted.pt --mean 0.1307 --std 0.3081

Click does not record the order *between* different options, so each adapter option is a
:class:`_PositionalOption` that logs every occurrence, in command-line order, while click's
parser processes it. The same options are suite keys (see :meth:`ModelRequest.from_mapping`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from ..models.resolve import ModelRequest

_ORDER_KEY = "robustcaps.model_options.order"
_HOOKED_KEY = "robustcaps.model_options.hooked"


@dataclass(frozen=True)
class _Flag:
    opt: str  # command-line flag
    key: str  # load_model keyword
    metavar: str
    help: str


ADAPTER_FLAGS: tuple[_Flag, ...] = (
    _Flag("--num-classes", "num_classes", "K", "Number of classes (checked on a probe batch)."),
    _Flag("--input-shape", "input_shape", "C,H,W", "Shape of one input, e.g. 1,28,28."),
    _Flag("--bounds", "bounds", "LO,HI", "Valid input range, e.g. 0,1 (adversarial inputs are clipped to it)."),
    _Flag("--mean", "mean", "M[,M...]", "Per-channel mean, subtracted inside the adapter."),
    _Flag("--std", "std", "S[,S...]", "Per-channel std, divided inside the adapter."),
    _Flag("--output-key", "output_key", "KEY|INDEX", "Dict key or tuple index of the scores in the model's output."),
    _Flag("--outputs", "outputs", "logits|probabilities|capsule_logits",
          "What the scores are; probabilities get a warning and log(p) for the losses."),
    _Flag("--model-name", "name", "NAME", "Display name in tables and plots (default: the spec)."),
)
_BY_DEST = {f"model_opt_{f.key}": f for f in ADAPTER_FLAGS}


class _PositionalOption(click.Option):
    """A repeatable option whose every occurrence is logged in command-line order."""

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        order = ctx.meta.setdefault(_ORDER_KEY, [])
        ok = ctx.meta.get(_HOOKED_KEY, True)
        for opt in self.opts:
            # click's parser option objects (private, stable since click 7) run process()
            # once per occurrence; wrap it to log (dest, raw value).
            popt = getattr(parser, "_long_opt", {}).get(opt) or getattr(parser, "_short_opt", {}).get(opt)
            if popt is None or not callable(getattr(popt, "process", None)):
                ok = False
                continue
            original = popt.process

            def process(value: Any, state: Any, _orig: Any = original, _name: str = self.name) -> None:
                order.append((_name, value))
                _orig(value, state)

            popt.process = process
        ctx.meta[_HOOKED_KEY] = ok


def _validate(flag: _Flag, raw: str) -> Any:
    from ..errors import RobustcapsError
    from ..models.loading import parse_adapter_options

    try:
        return parse_adapter_options({flag.key: raw})[flag.key]
    except RobustcapsError as exc:
        message = str(exc).split(": ", 1)[-1]
        raise click.BadParameter(message, param_hint=f"'{flag.opt}'") from None


def _group(order: list[tuple[str, Any]], default: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """Walk (dest, value) occurrences: options before the first --model are shared defaults."""
    shared: dict[str, Any] = {}
    models: list[tuple[str, dict[str, Any]]] = []
    for dest, value in order:
        if dest == "model":
            models.append((value, {}))
            continue
        flag = _BY_DEST[dest]
        target, owner = (models[-1][1], f"--model {models[-1][0]}") if models else (shared, "all models")
        if flag.key in target:
            raise click.UsageError(f"{flag.opt} given twice for {owner}")
        target[flag.key] = _validate(flag, value)
    if not models:
        models = [(spec, {}) for spec in default]
    return [(spec, {**shared, **opts}) for spec, opts in models]


def model_options(default: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add ``--model`` (repeatable), the positional adapter options and ``--trust-pickle``.

    ``default`` is used when no ``--model`` is given. The command receives
    ``models: list[ModelRequest]``.
    """

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, model: tuple[str, ...], trust_pickle: bool, **kwargs: Any) -> Any:
            given = {dest: kwargs.pop(dest) for dest in _BY_DEST}
            ctx = click.get_current_context()
            order = ctx.meta.get(_ORDER_KEY)
            if not ctx.meta.get(_HOOKED_KEY) or order is None:
                # Fallback without occurrence order: only unambiguous with one model.
                if len(model) > 1 and any(given.values()):
                    raise click.UsageError(
                        "cannot tell which --model each adapter option belongs to with this "
                        "click version; use a suite file"
                    )
                order = [(d, v) for d, vals in given.items() for v in vals]
                order = [("model", m) for m in model] + order
            requests = []
            for spec, opts in _group(list(order), default):
                if trust_pickle:
                    opts["trust_pickle"] = True
                requests.append(ModelRequest(spec, opts))
            return f(*args, models=requests, **kwargs)

        defaults = ", ".join(default) or "none"
        decorators = [
            click.option(
                "--model", "model", cls=_PositionalOption, multiple=True, metavar="SPEC",
                help="Model: a zoo or built-in NAME, package.module:FACTORY, path/to/file.py:FACTORY, "
                "a TorchScript file.pt, NAME@state_dict.pt, or an entry-point name (group "
                "robustcaps.models). Repeat for several; the adapter options after a --model "
                f"apply to it, those before the first --model to all. Default: {defaults}.",
            ),
            *[
                click.option(fl.opt, f"model_opt_{fl.key}", cls=_PositionalOption, multiple=True,
                             metavar=fl.metavar, help=fl.help)
                for fl in ADAPTER_FLAGS
            ],
            click.option(
                "--trust-pickle", is_flag=True,
                help="Allow unpickling full-module files (torch.load weights_only=False): "
                "runs code from the file; only for files you trust.",
            ),
        ]
        for option in reversed(decorators):
            wrapper = option(wrapper)
        return wrapper

    return deco
