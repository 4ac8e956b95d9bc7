"""Options shared by every subcommand, so they read the same everywhere."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click


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


def common_options(func: Callable[..., Any] | None = None, *, out_help: str = "Output directory.",
                   batch_default: int | None = None) -> Any:
    """Add --device, --seed, --out, --batch-size, -v/--verbose, -q/--quiet.

    The wrapped function receives them as one ``common: Common`` keyword argument.
    """

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, device: str, seed: int, out: Path | None, batch_size: int | None,
                    verbose: int, quiet: bool, **kwargs: Any) -> Any:
            verbosity = -1 if quiet else verbose
            level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
            logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
            common = Common(device=device, seed=seed, out=out, batch_size=batch_size, verbosity=verbosity)
            return f(*args, common=common, **kwargs)

        options = [
            click.option("--device", default="auto", show_default=True, callback=_check_device,
                         metavar="auto|cpu|cuda[:N]", help="Where to run."),
            click.option("--seed", type=int, default=0, show_default=True, help="Random seed."),
            click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
                         help=out_help),
            click.option("--batch-size", type=click.IntRange(min=1), default=batch_default,
                         show_default=batch_default is not None, help="Batch size."),
            click.option("-v", "--verbose", count=True, help="More logging (repeat for debug)."),
            click.option("-q", "--quiet", is_flag=True, help="Only errors and final paths."),
        ]
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return deco(func) if func is not None else deco
