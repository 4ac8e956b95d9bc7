"""Options shared by every subcommand, so they read the same everywhere."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..errors import Interrupted


@dataclass
class Common:
    """The common options after validation."""

    device: str
    seed: int
    out: Path | None
    batch_size: int | None
    verbosity: int  # -1 quiet, 0 normal, >=1 verbose

    @property
    def quiet(self) -> bool:
        return self.verbosity < 0

    def torch_device(self):
        from ..utils import resolve_device

        return resolve_device(self.device)

    def echo(self, message: str = "", **kwargs: Any) -> None:
        """Print unless --quiet."""
        if not self.quiet:
            click.echo(message, **kwargs)


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from ..errors import RobustcapsError
    from ..utils import resolve_device

    try:
        resolve_device(value)
    except RobustcapsError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (click's test runner swaps it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


_handler = _StderrHandler()
_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))


def set_verbosity(verbosity: int) -> None:
    """-v: INFO (units, files, data and models as loaded), -vv: DEBUG (also the traceback
    behind a one-line error); default and -q: warnings only."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logger = logging.getLogger("robustcaps")
    # Our own handler, not the root's: a host application's or pytest's root handlers stay
    # as they are.
    if _handler not in logger.handlers:
        logger.addHandler(_handler)
    logger.setLevel(level)


def common_options(func: Callable[..., Any] | None = None, *, out_help: str = "Output directory.",
                   batch_default: int | None = None, skip: tuple[str, ...] = ()) -> Any:
    """Add --device, --seed, --out, --batch-size, -v/--verbose, -q/--quiet, less ``skip``
    (options that would mean nothing to the command: it must not advertise them).

    The wrapped function receives them as one ``common: Common`` keyword argument.
    """
    defaults = {"device": "auto", "seed": 0, "out": None, "batch_size": batch_default,
                "verbose": 0, "quiet": False}

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            given = {k: kwargs.pop(k) if k in kwargs else v for k, v in defaults.items()}
            verbosity = -1 if given["quiet"] else given["verbose"]
            set_verbosity(verbosity)
            common = Common(device=given["device"], seed=given["seed"], out=given["out"],
                            batch_size=given["batch_size"], verbosity=verbosity)
            return f(*args, common=common, **kwargs)

        options = {
            "device": click.option("--device", default="auto", show_default=True,
                                   callback=_check_device, metavar="auto|cpu|cuda[:N]",
                                   help="Where to run."),
            "seed": click.option("--seed", type=int, default=0, show_default=True, help="Random seed."),
            "out": click.option("--out", type=click.Path(path_type=Path, file_okay=False),
                                default=None, help=out_help),
            "batch_size": click.option("--batch-size", type=click.IntRange(min=1),
                                       default=batch_default,
                                       show_default=batch_default is not None, help="Batch size."),
            "verbose": click.option("-v", "--verbose", count=True,
                                    help="More logging: -v info, -vv debug (with tracebacks)."),
            "quiet": click.option("-q", "--quiet", is_flag=True, help="Only errors and final paths."),
        }
        for name, option in reversed(options.items()):
            if name not in skip:
                wrapper = option(wrapper)
        return wrapper

    return deco(func) if func is not None else deco


def out_dir(common: Common) -> Path | None:
    """--out created now (a one-line error if it cannot be, e.g. ``/proc/x`` or a path
    under a regular file), before any work whose results it would hold."""
    from ..utils import ensure_dir

    return None if common.out is None else ensure_dir(common.out, "--out")


@contextlib.contextmanager
def on_interrupt(command: str, out: Path | None, marker: str) -> Iterator[None]:
    """Ctrl-C: exit 130 with how to continue, when ``out`` holds a resumable run (``marker``
    is the file that says so)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(resume_hint(command, out, marker)) from None


def resume_hint(command: str, out: Path | None, marker: str) -> str:
    if out is None or not (out / marker).exists():
        return "stopped before anything resumable was written"
    if command == "train":  # the trainer checks that every setting is the same
        return f"checkpoint written; continue with the same command plus --resume --out {out}"
    return f"continue with: robustcaps {command} --resume --out {out}"
