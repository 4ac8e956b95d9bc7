"""``robustcaps data``."""

from __future__ import annotations

import click

from ._common import common_options


@click.command("data")
@common_options
def command(common) -> None:
    """(Being built.)"""
    raise click.UsageError("'robustcaps data' is not available in this version yet")
