"""``--model SPEC`` and the adapter options that go with it, shared by evaluate/diagnose.

Interface used by commands: decorate with :func:`model_options`; the command receives
``models: list[ModelRequest]`` (in command-line order). Each request's ``options`` are
keyword arguments for :func:`robustcaps.models.loading.load_model`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click


@dataclass
class ModelRequest:
    spec: str
    options: dict[str, Any] = field(default_factory=dict)

    def load(self, **extra: Any):
        from ..models.loading import load_model

        return load_model(self.spec, **{**self.options, **extra})


def model_options(default: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add ``--model`` (repeatable); ``default`` is used when none is given."""

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, model: tuple[str, ...], **kwargs: Any) -> Any:
            specs = model or default
            return f(*args, models=[ModelRequest(s) for s in specs], **kwargs)

        return click.option(
            "--model", "model", multiple=True, metavar="SPEC",
            help="Model spec (zoo or architecture name); repeat for several. "
            f"Default: {', '.join(default) or 'none'}.",
        )(wrapper)

    return deco
