"""``robustcaps inspect``: look inside a model. ``inspect routing`` draws Fig. 2 / Fig. B.2.

Click glue over :mod:`robustcaps.report.routing`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from ._common import common_options, out_dir


@click.group("inspect")
def command() -> None:
    """Look inside a model (EM routing histograms)."""


@command.command("routing")
@click.option("--model", "spec", default="capsnet-small", show_default=True, metavar="SPEC",
              help="An EM-routing capsule network (zoo name, NAME@weights.pt, ...).")
@click.option("--index", "indices", type=click.IntRange(min=0), multiple=True,
              help="Test-sample index (repeat for more).")
@click.option("--pick", "picks", type=click.Choice(["correct", "confused"]), multiple=True,
              help="Add the lowest-index sample the model classifies correctly / wrongly (repeat).")
@click.option("--dataset", default="synthnorb", show_default=True,
              metavar="synthnorb|smallnorb|mnist|npz:PATH", help="Data the indices refer to.")
@click.option("--split", default="test", show_default=True, help="Dataset split.")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder holding the dataset files.")
@click.option("--zoom", type=click.FloatRange(min=0, min_open=True), default=0.05,
              show_default=True, help="x-axis limit of the zoomed figure (Fig. 2 uses 0.05).")
@click.option("--bins", type=click.IntRange(min=2), default=200, show_default=True,
              help="Bins of the full-range figure (Fig. B.2).")
@click.option("--trust-pickle", is_flag=True, help="Allow unpickling full-module model files.")
@common_options(out_help="Output folder (default results/runs/<timestamp>-routing).",
                batch_default=64, skip=("seed",))  # every sample is named by its index
def routing(common, spec, indices, picks, dataset, split, data_dir, zoom, bins,
            trust_pickle) -> None:
    """Histograms of vote-to-class-mean distances after every routing iteration, weighted
    by assignment probability (paper Fig. 2 zoomed, Fig. B.2 full range), plus CSVs."""
    from ..data import load_dataset
    from ..models.resolve import ModelRequest
    from ..report.routing import check_indices, inspect_routing, pick_sample

    if not indices and not picks:
        raise click.UsageError("give at least one --index or --pick")
    out = out_dir(common) or Path("results/runs") / f"{datetime.now():%Y%m%d-%H%M%S}-routing"
    data = load_dataset(dataset, split, data_dir=data_dir,
                        progress=not common.quiet)
    check_indices(indices, len(data))  # before the model, whose loading may log warnings
    adapter = ModelRequest(spec, {"trust_pickle": True} if trust_pickle else {}).load(
        device=common.torch_device(),
        defaults={"num_classes": data.num_classes, "input_shape": data.input_shape,
                  "bounds": data.bounds})
    x = adapter.preprocess(data.x.to(adapter.device, adapter.dtype))
    chosen = list(indices)
    for outcome in picks:
        chosen.append(pick_sample(adapter.model, x, data.y, outcome, common.batch_size))
        common.echo(f"--pick {outcome}: sample {chosen[-1]}")
    res = inspect_routing(adapter.model, x, data.y, chosen, data.class_names, out,
                          label=f"{spec} on {data.name} {split}, ", zoom=zoom, full_bins=bins)
    for path in res.figures + res.csvs:
        click.echo(str(path))
