"""``robustcaps diagnose``: gradient statistics and masking indicators, as a report."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import click

from ..errors import RobustcapsError
from ..models.adapter import LOSSES
from ._common import common_options, out_dir
from ._model_options import model_options

#: default sample count: the embedded default (capsnet-small + cnn on SynthNORB) costs about
#: 4 CPU minutes with the 50-step tracked PGD (measured: 239 s of CPU; 16 min wall on 2
#: heavily shared cores).
DEFAULT_N = 32


def parse_epsilon_list(text: str) -> list[float]:
    """``"0.05,0.1,0.2"`` -> [0.05, 0.1, 0.2]; each must be a positive finite number."""
    import math

    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise RobustcapsError(f"--epsilons: {part!r} is not a number") from None
        if not (math.isfinite(v) and v > 0):
            raise RobustcapsError(f"--epsilons: {part!r} must be a positive finite number")
        values.append(v)
    if not values:
        raise RobustcapsError("--epsilons: give at least one epsilon, e.g. 0.05,0.1,0.2")
    return values


@click.command("diagnose")
@model_options(default=("capsnet-small", "cnn"))
@click.option("--dataset", default="synthnorb", show_default=True,
              metavar="synthnorb|smallnorb|mnist|npz:PATH", help="Data to measure on.")
@click.option("--split", default="test", show_default=True, help="Dataset split.")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder holding the dataset files (smallnorb, mnist).")
@click.option("--n-samples", type=click.IntRange(min=2), default=DEFAULT_N, show_default=True,
              help="Samples (class-stratified, deterministic given --seed).")
@click.option("--loss", type=click.Choice(LOSSES), default=None,
              help="Attack loss for every model (default: each model's own, ce for built-ins). "
              "cw = logit margin, immune to softmax saturation.")
@click.option("--epsilons", default=None, metavar="E1,E2,...",
              help="L-inf grid for the attack indicators, in input units "
              "(default 0.02,0.05,0.1,0.2,0.5 x data scale).")
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True,
              help="Iterations of the tracked PGD (step eps/3) and of the unbounded PGD; "
              "incomplete optimization looks at the last min(10, steps) passes.")
@click.option("--gradients-only", is_flag=True,
              help="Only the gradient statistics (skip every attack-based indicator).")
@click.option("--no-figures", is_flag=True, help="Skip the figures.")
@click.option("--adaptive", is_flag=True,
              help="When C/P4/P6 flag a capsule network, run the capsule-aware attacks "
              "(pgd-bpda, vote-attack, the cw loss) that the attack registry holds.")
@common_options(out_help="Output folder (default results/diagnostics/<timestamp>).")
def command(common, models, dataset, split, data_dir, n_samples, loss, epsilons, steps,
            gradients_only, no_figures, adaptive) -> None:
    """Can a robustness number be trusted? Gradient-masking diagnostics per model.

    Measures the input gradient of each model's attack loss (exact zeros, vanishing and
    non-finite entries, norms, float32 vs float64, finite differences, orders of magnitude
    between models) and runs masking indicators (FGSM vs BIM, transfer vs white-box,
    unbounded attack, random noise, and Pintor et al.'s six indicators of attack failure).
    Writes gradient_report.md (verdict table: PASS / WARN / FAIL per check), gradients.json,
    gradients.csv and figures. Default: capsnet-small and cnn on the SynthNORB test split.
    Under torchrun, rank 0 diagnoses (minutes, not hours) while the other ranks wait.
    """
    from ..evaluation.distributed import close_workers, detect_workers

    workers = detect_workers(common.device)
    try:
        if workers.rank == 0:
            _diagnose(common, models, dataset, split, data_dir, n_samples, loss, epsilons, steps,
                      gradients_only, no_figures, adaptive)
        workers.barrier()
    finally:
        close_workers(workers)


def _diagnose(common, models, dataset, split, data_dir, n_samples, loss, epsilons, steps,
              gradients_only, no_figures, adaptive) -> None:
    from .. import diagnose

    eps = parse_epsilon_list(epsilons) if epsilons is not None else None
    out = out_dir(common) or Path("results") / "diagnostics" / datetime.now().strftime("%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    common.echo(f"diagnose: {n_samples} samples of {dataset} ({split})"
                + (" [default N]" if n_samples == DEFAULT_N else ""))
    result = diagnose(
        models, dataset, split=split, data_dir=data_dir, n_samples=n_samples, seed=common.seed,
        device=common.device, loss=loss, out=out, progress=not common.quiet, epsilons=eps,
        steps=steps, attacks=not gradients_only, batch_size=common.batch_size,
        figures=not no_figures, adaptive=adaptive,
    )
    table = result.verdict_table()
    overall = result.overall()
    common.echo("")
    common.echo(table.to_string())
    common.echo("overall: " + ", ".join(f"{m} {v}" for m, v in overall.items()))
    zf = result.stats.set_index("model")["zero_fraction"]
    common.echo("exact-zero gradient entries: "
                + ", ".join(f"{m} {100 * v:.3f}%" for m, v in zf.items()))
    mag = result.magnitudes
    for _, r in mag.iterrows():
        common.echo(f"median L1 gradient norm, {r['model']} / {r['reference']}: "
                    f"{r['median_l1_ratio']:.3g} ({r['log10_l1_ratio']:+.2f} orders of magnitude)")
    echo_adaptive(common, result, adaptive)
    common.echo(f"done in {time.perf_counter() - t0:.1f} s")
    common.echo("files:")
    for kind in ("report", "json", "csv"):
        click.echo(f"  {result.paths[kind]}")


def echo_adaptive(common, result, ran: bool) -> None:
    """The capsule-aware attacks recommended per flagged capsule network, and their results."""
    from ..diagnostics.adaptive import available

    for model, names in result.recommended.items():
        listed = ", ".join(n if available(n) else f"{n} (unavailable: not in the attack registry)"
                           for n in names)
        common.echo(f"{model}: the checks point at attack failure; capsule-aware attacks to run "
                    f"next: {listed}" + ("" if ran else " (--adaptive runs them)"))
    done = result.adaptive[result.adaptive["status"] == "ran"]
    for (model, attack), g in done.groupby(["model", "attack"], sort=False):
        rates = ", ".join(f"{e:g}: {100 * r:.1f}%" for e, r in zip(g["epsilon"], g["success_rate"], strict=True))
        common.echo(f"  {model} {attack}: success by eps {rates}")
