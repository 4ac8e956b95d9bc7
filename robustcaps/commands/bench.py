"""``robustcaps bench``: throughput and memory benchmarks, reported for comparison as ratios.

The benchmarks live in :mod:`robustcaps.bench`; ``attacks`` and ``data`` are declared here,
``routing`` is its module's own ``command`` (loaded on demand).
"""

from __future__ import annotations

import json

import click

from ..cli import LazyGroup
from ._common import Common, common_options, out_dir

BENCHMARKS = ("routing", "scale")


@click.group("bench", cls=LazyGroup, package="robustcaps.bench", names=BENCHMARKS)
def command() -> None:
    """Benchmarks: routing (capsule layers), attacks (backends), data (SynthNORB), scale
    (1 vs N processes)."""


@command.command("attacks")
@click.option("--model", "models", multiple=True, default=("capsnet-small", "cnn"),
              show_default=True, help="Models to time (repeat).")
@click.option("--n-samples", type=click.IntRange(min=1), default=16, show_default=True,
              help="Samples (the libraries run BIM per epsilon: 110 passes per sample).")
@click.option("--dataset", default="synthnorb", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Best of N timings.")
@click.option("--iterative-samples", type=click.IntRange(min=0), default=8, show_default=True,
              help="Also PGD-50, APGD-CE/DLR/T-100 native vs torchattacks at eps 0.1, 0.2 on "
              "the first N samples (0: skip).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
@common_options(skip=("out", "batch_size"))
def attacks(common, models, n_samples, dataset, steps, repeats, iterative_samples, as_json) -> None:
    """Native vs torchattacks vs foolbox: 11-epsilon FGSM and 10-step BIM sweeps; PGD and
    APGD native vs torchattacks."""
    from ..bench.attacks import EPSILONS, run_bench

    res = run_bench(list(models), n_samples, dataset, common.device, common.seed, steps,
                    repeats, progress=not (as_json or common.quiet),
                    iterative_samples=iterative_samples)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"{res['n_samples']} samples of {dataset}, {len(EPSILONS)} epsilons "
               f"(L-inf, input units), BIM {steps} steps, device {res['device']}")
    for name, r in res["models"].items():
        flag = "" if r["trained"] else "  [UNTRAINED: numbers say little]"
        click.echo(f"{name} (clean accuracy {100 * r['clean_accuracy']:.1f}%){flag}")
        for attack in ("fgsm", "bim"):
            parts = [f"{b} {r[f'{attack}_{b}_s']:.2f}s (adv acc {100 * r[f'{attack}_{b}_mean_adv_acc']:.1f}%)"
                     for b in ("native", "torchattacks", "foolbox")]
            click.echo(f"  {attack.upper():4s} " + " | ".join(parts))
        click.echo(f"  FGSM speed-up vs foolbox {r['fgsm_speedup_vs_foolbox']:.1f}x (target 3x), "
                   f"vs torchattacks {r['fgsm_speedup_vs_torchattacks']:.1f}x")
        click.echo(f"  BIM  speed-up vs torchattacks {r['bim_speedup_vs_torchattacks']:.1f}x (target 2x), "
                   f"vs foolbox {r['bim_speedup_vs_foolbox']:.1f}x; without early stop "
                   f"{r['bim_no_early_stop_speedup_vs_torchattacks']:.1f}x")
        _echo_iterative(r.get("iterative"))


def _echo_iterative(it) -> None:
    """One line per PGD/APGD attack: seconds, robust accuracy per epsilon, speed-up."""
    if not it:
        return
    eps = ", ".join(f"{e:g}" for e in it["epsilons"])
    for name in ("pgd", "apgd-ce", "apgd-dlr", "apgd-t"):
        r = it[name]
        acc = lambda v: "/".join(f"{100 * a:.0f}" for a in v)  # noqa: E731
        click.echo(f"  {name:8s} native {r['native_s']:.2f}s (acc% {acc(r['native_adv_acc'])}) | "
                   f"torchattacks {r['torchattacks_s']:.2f}s (acc% {acc(r['torchattacks_adv_acc'])})"
                   f" at eps {eps}: speed-up {r['speedup_vs_torchattacks']:.1f}x, native minus "
                   f"torchattacks accuracy max {100 * r['native_acc_minus_torchattacks_max']:+.0f} pp")


@command.command("data")
@click.option("--fraction", type=float, default=1.0, show_default=True,
              help="Share of the 50 objects to render; < 1 extrapolates and writes nothing.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Rendering processes (default: the CPUs available).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@common_options(out_help="Keep the generated files in this folder (default: a temporary "
                "folder, deleted afterwards).", skip=("device", "batch_size"))
def data(common: Common, fraction: float, workers: int | None, as_json: bool) -> None:
    """SynthNORB generation time: both splits, 97,200 images (budget: 120 s on 2 cores).

    Rendering runs on the CPU (NumPy) whatever --device says.
    """
    from ..bench.data import bench_data

    res = bench_data(fraction=fraction, seed=common.seed, workers=workers, out=out_dir(common),
                     progress=not common.quiet and not as_json)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    how = "extrapolated from " + f"{res['measured_images']:,} images" if res["extrapolated"] else \
        "measured, files written"
    verdict = "within" if res["within_budget"] else "OVER"
    click.echo(f"SynthNORB full generation, {res['full_images']:,} images 96x96 "
               f"({res['workers']} worker(s), {res['cpus']} CPU(s), load {res['load_average_before']}):")
    click.echo(f"  {res['full_seconds']:.1f} s  ({res['images_per_second']:,.0f} images/s; {how})")
    click.echo(f"  {verdict} the {res['budget_seconds']:.0f} s budget")
