"""``robustcaps evaluate``: attack sweeps -> records, summary, figures (click glue only).

The options are generated from the settings of :mod:`robustcaps.evaluation.config`; the
run is :func:`robustcaps.evaluation.run.evaluate`. Precedence: a resumed run's own
settings, then a suite, then options given explicitly.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ..evaluation.config import DEFAULT_MODELS, iter_settings, threats
from ._common import common_options, on_interrupt
from ._model_options import model_options


def _explicit(ctx: click.Context, name: str) -> bool:
    src = ctx.get_parameter_source(name)
    return src is not None and src not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _setting_options() -> list[tuple[str, dataclasses.Field, Any]]:
    """(dest, setting, click option) for every setting whose option is generated."""
    options = []
    for _, f in iter_settings():
        cli = f.metadata["cli"]
        if cli is None:
            continue
        dest = cli.get("dest", f.name)
        options.append((dest, f, click.option(*_decls(f.name, dest, cli), **_option_kwargs(f, cli))))
    return options


def _decls(key: str, dest: str, cli: dict[str, Any]) -> list[str]:
    flag = cli.get("flag_name", "--" + key.replace("_", "-"))
    if cli.get("flag"):
        return [f"{flag}/--no-{flag[2:]}", dest]
    return [flag, dest]


def _option_kwargs(f: dataclasses.Field, cli: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {"help": f.metadata["help"], "show_default": cli.get("show_default", False)}
    if cli.get("multiple"):
        kw["multiple"] = True
    else:  # a list setting's option names one item
        kw["default"] = f.default[0] if isinstance(f.default, tuple) else f.default
    if "metavar" in cli:
        kw["metavar"] = cli["metavar"]
    kind = cli.get("type")
    if "choices" in cli:
        kw["type"] = click.Choice(list(cli["choices"]()))
    elif kind == "count":
        kw["type"] = click.IntRange(min=1)
    elif cli.get("path"):
        kw["type"] = click.Path(path_type=Path, file_okay=False)
    elif kind is not None:
        kw["type"] = kind
    return kw


def _settings_options(f):
    for _, _, option in reversed(_setting_options()):
        f = option(f)
    return f


@click.command("evaluate")
@click.option("--attack", type=click.Choice([*threats(), "all"]), default=None,
              help="Attack to run (required unless --suite or --resume gives it); "
              "'robustcaps attacks' lists them.")
@click.option("--targeted", "mode", flag_value="targeted",
              help="Targeted: every sample towards each wrong class in turn (paper Fig. 3 right).")
@click.option("--untargeted", "mode", flag_value="untargeted", default=True,
              help="Untargeted (default).")
@click.option("--both", "mode", flag_value="both", help="Untargeted and targeted.")
@model_options(default=DEFAULT_MODELS)
@click.option("--epsilons", default=None, metavar="LIST",
              help="Comma-separated L-inf epsilons in input units, e.g. 0,0.05,0.1.")
@click.option("--eps-range", default=None, metavar="START:STOP:STEP",
              help="Epsilon grid, STOP always included (0:0.5:0.3 gives 0, 0.3, 0.5). "
              "Default 0:0.5:0.05 (the paper's axis).")
@_settings_options
@click.option("--suite", default=None, metavar="FILE|NAME",
              help="TOML attack suite (e.g. attacks/paper-fig3.toml or just paper-fig3).")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted run in --out (settings are read from it).")
@click.option("--no-figures", is_flag=True, help="Skip the figures.")
@click.option("--shard", default=None, metavar="I/N",
              help="Run share I of N (0 <= I < N) into --out, for schedulers without torchrun "
              "(e.g. a Slurm array); the last shard to finish merges (else: robustcaps report OUT).")
@common_options(out_help="Run directory (default results/runs/<timestamp>-<attack>).",
                batch_default=None)
@click.pass_context
def command(ctx: click.Context, common, models, attack, mode, epsilons, eps_range, suite,
            resume, no_figures, shard, **options) -> None:
    """Attack models over an epsilon sweep and write records, summary, figures and manifest.

    Epsilons are L-infinity sizes in the model's input space: per-image standardised
    units for NORB data (no bounds), [0, 1] units for MNIST. With --attack alone it runs
    the embedded default: SynthNORB test split, zoo capsnet-small and cnn. Under torchrun
    (python -m torch.distributed.run --nproc-per-node N -m robustcaps evaluate ...) the
    ranks share the units and rank 0 merges and prints.
    """
    from ..evaluation.config import EvaluationConfig, OutputSettings
    from ..evaluation.distributed import close_workers
    from ..evaluation.run import evaluate

    settings = _base_settings(common, resume, suite)
    settings.update(_explicit_settings(ctx, options, attack, mode, epsilons, eps_range))
    settings.update({k: v for k, v in (("batch_size", common.batch_size),) if v is not None})
    for name in ("seed", "device"):
        if _explicit(ctx, name) or name not in settings:
            settings[name] = getattr(common, name)
    if "attack" not in settings:
        raise click.UsageError("give --attack fgsm|bim|transfer|all (or --suite FILE)")
    if _explicit(ctx, "model") or settings.get("models") is None:
        settings["models"] = models  # ModelRequests (with their adapter options)
    workers = start_workers(shard, settings["device"])
    out = common.out or workers.same(_default_out(settings["attack"]))
    config = EvaluationConfig.from_kwargs(**settings, output=OutputSettings(
        out=out, resume=resume, figures=not no_figures,
        progress=not common.quiet and workers.rank == 0))
    echo = common.echo if workers.main or workers.mode == "shard" else None
    try:
        with on_interrupt("evaluate", out, "config.json"):
            result = evaluate(config, echo=echo, workers=workers,
                              command=shlex.join(["robustcaps", *sys.argv[1:]]))
    finally:
        close_workers(workers)
    if result.complete and echo is not None:  # torchrun: rank 0 alone prints
        print_result(common, result)
    elif workers.mode == "shard":
        _print_shard_done(common, workers, out)


def start_workers(shard: str | None, device: str):
    """This process's place: shard I/N, a torchrun rank, or the only process."""
    from ..evaluation.distributed import detect_workers, parse_shard

    if shard is None:
        return detect_workers(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise click.UsageError("--shard is for independent processes; under torchrun the ranks "
                               "split the run by themselves")
    return parse_shard(shard)


def print_result(common, result) -> None:
    """The console table and the files written (evaluate, and report after a merge)."""
    common.echo("")
    common.echo(result.table)
    common.echo("")
    common.echo("files:")
    for name, path in result.paths.items():
        if name != "complete":
            click.echo(f"  {path}")


def _print_shard_done(common, workers, out: Path) -> None:
    from ..evaluation.merge import missing_units

    left = missing_units(out) or []
    common.echo(f"{workers.label} done; {len(left)} units of the run are still with other "
                f"shards; once they finish: robustcaps report {out}")


def _base_settings(common, resume: bool, suite: str | None) -> dict[str, Any]:
    """A resumed run's settings, then the suite's on top."""
    from ..evaluation.config import read_invocation
    from ..evaluation.suite import load_suite, suite_to_kwargs

    settings: dict[str, Any] = {}
    if resume:
        if common.out is None:
            raise click.UsageError("--resume needs --out DIR, the run directory to continue")
        settings.update(read_invocation(common.out))
    if suite is not None:
        settings.update(suite_to_kwargs(load_suite(suite)))
    return settings


def _explicit_settings(ctx: click.Context, options: dict[str, Any], attack: str | None,
                       mode: str, epsilons: str | None, eps_range: str | None) -> dict[str, Any]:
    """The settings given on the command line."""
    from ..evaluation.config import parse_eps_range, parse_epsilons

    given: dict[str, Any] = {}
    if attack is not None:
        given["attack"] = attack
    if _explicit(ctx, "mode"):
        given["targeted"] = mode
    if epsilons is not None and eps_range is not None:
        raise click.UsageError("give --epsilons or --eps-range, not both")
    if epsilons is not None:
        given["epsilons"] = parse_epsilons(epsilons)
    elif eps_range is not None:
        given["epsilons"] = parse_eps_range(eps_range)
    for dest, f, _ in _setting_options():
        if _explicit(ctx, dest) and options[dest] not in (None, ()):
            given[f.name] = options[dest]
    return given


def _default_out(attack: str | list[str]) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    label = attack if isinstance(attack, str) else "-".join(attack)
    return Path("results") / "runs" / f"{stamp}-{label}"
