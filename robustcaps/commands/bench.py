"""``robustcaps bench``: throughput and memory benchmarks, reported for comparison as ratios.

Each benchmark is a module ``robustcaps.bench.<name>`` exposing a click ``command``.
"""

from __future__ import annotations

import click

from ..cli import LazyGroup

BENCHMARKS = ("routing", "attacks", "data")


@click.group("bench", cls=LazyGroup, package="robustcaps.bench", names=BENCHMARKS)
def command() -> None:
    """Benchmarks: routing (capsule layers), attacks (backends), data (SynthNORB)."""
