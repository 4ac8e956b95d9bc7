"""``robustcaps train``."""

from __future__ import annotations

import click

from ._common import common_options


@click.command("train")
@common_options
def command(common) -> None:
    """(Being built.)"""
    raise click.UsageError("'robustcaps train' is not available in this version yet")
