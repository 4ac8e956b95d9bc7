"""``robustcaps report RUN_DIR``: regenerate a run's summaries and figures from its records."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import common_options


@click.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--no-figures", is_flag=True, help="Only the tables.")
@common_options(out_help="Write the tables and figures here instead (RUN_DIR is left untouched).",
                skip=("device", "seed", "batch_size"))
def command(common, run_dir: Path, no_figures: bool) -> None:
    """Rebuild summary.csv, summary_per_target.csv, table.txt and figures/ of RUN_DIR.

    Everything is recomputed from RUN_DIR/records.csv.gz (plus manifest.json for class
    names and examples/*.npz for the example grid), so any figure can be regenerated.
    With --out OTHER they are written to OTHER and RUN_DIR is only read. A run whose
    processes (--shard I/N, torchrun) have all finished is merged into RUN_DIR first;
    otherwise the missing units and shards are named.
    """
    from ..report import COMPLETE_MARKER, build_report

    if not (run_dir / "records.csv.gz").is_file() and (run_dir / "plan.json").is_file():
        _merge(common, run_dir, no_figures)  # a run filled unit by unit (shards, torchrun)
        return
    result = build_report(run_dir, figures=not no_figures, out=common.out)
    if not (run_dir / COMPLETE_MARKER).is_file():
        click.echo(f"Warning: {run_dir} has no {COMPLETE_MARKER} marker; the records may be "
                   "from an older or unfinished run", err=True)
    common.echo(result.table)
    common.echo("")
    common.echo("files:")
    for path in result.values():
        click.echo(f"  {path}")


def _merge(common, run_dir: Path, no_figures: bool) -> None:
    from ..evaluation.merge import merge_run
    from .evaluate import print_result

    print_result(common, merge_run(run_dir, figures=not no_figures))
