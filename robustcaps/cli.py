"""The ``robustcaps`` command line: a thin click layer over the Python API.

Subcommands live in :mod:`robustcaps.commands` (one module each) and are imported lazily,
so ``robustcaps --help`` stays fast. Every user error (bad option, unknown model, missing
file, malformed data) ends as one ``Error: ...`` line on stderr with exit code 2.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, NoReturn

import click

from . import __version__
from .errors import Interrupted, RobustcapsError

log = logging.getLogger("robustcaps.cli")

SUBCOMMANDS = ("evaluate", "attacks", "diagnose", "train", "data", "models", "bench", "report",
               "inspect")


def run_click_main(group: click.Command, args: Any, prog_name: str | None, **extra: Any) -> None:
    """Run a click command with robustcaps' error contract (one line, exit 2)."""
    try:
        rv = click.Command.main(group, args=args, prog_name=prog_name, standalone_mode=False, **extra)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort as exc:  # click turns Ctrl-C into Abort
        interrupted = isinstance(exc.__context__, KeyboardInterrupt)
        click.echo("Interrupted." if interrupted else "Aborted.", err=True)
        sys.exit(130 if interrupted else 1)
    except Interrupted as exc:  # a resumable command says how to continue
        click.echo(f"Interrupted: {exc}", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}".splitlines()[0], err=True)
        sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
    except (RobustcapsError, OSError) as exc:
        _one_line_error(exc)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


def _one_line_error(exc: Exception) -> NoReturn:
    """``Error: <message>`` and exit 2; the traceback only at -vv (DEBUG logging)."""
    log.debug("traceback of the error below", exc_info=exc)
    if isinstance(exc, OSError):  # a file that cannot be written or read: say which and why
        where = f" {exc.filename}" if exc.filename else ""
        message = f"cannot access{where}: {exc.strerror or exc}"
    else:
        message = str(exc)
    click.echo(f"Error: {' '.join(message.split())}", err=True)
    sys.exit(2)


class LazyGroup(click.Group):
    """A group whose subcommands are modules exposing ``command``, imported on demand."""

    def __init__(self, *args: Any, package: str, names: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._package = package
        self._names = names

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self._names) | set(self.commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        if name not in self._names:
            return None
        try:
            module = importlib.import_module(f"{self._package}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{self._package}.{name}":
                return None
            raise
        return module.command

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> None:  # type: ignore[override]
        extra.pop("standalone_mode", None)
        run_click_main(self, args, prog_name, **extra)


@click.group(
    cls=LazyGroup,
    package="robustcaps.commands",
    names=SUBCOMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name="robustcaps")
def cli() -> None:
    """robustcaps: is this model really robust, or does it only look robust?

    White-box FGSM/BIM (untargeted and targeted) and black-box transfer sweeps,
    gradient-masking diagnostics, and the EM-routing capsule network of Hinton et al.
    (ICLR 2018) with its baseline CNN. Epsilons are L-infinity sizes in the model's
    input space (per-image standardised units for the built-in models).
    """


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="robustcaps")


if __name__ == "__main__":  # pragma: no cover
    main()
