"""``robustcaps evaluate``."""

from __future__ import annotations

import click

from ._common import common_options


@click.command("evaluate")
@common_options
def command(common) -> None:
    """(Being built.)"""
    raise click.UsageError("'robustcaps evaluate' is not available in this version yet")
