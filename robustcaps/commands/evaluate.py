"""``robustcaps evaluate``: FGSM/BIM/transfer epsilon sweeps -> records, summary, figures.

A thin layer over :func:`robustcaps.attacks.engine.evaluate`.
"""

from __future__ import annotations

import json
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ..errors import RobustcapsError
from ._common import common_options
from ._model_options import model_options

_DEFAULT_MODELS = ("capsnet-small", "cnn")


def _explicit(ctx: click.Context, name: str) -> bool:
    src = ctx.get_parameter_source(name)
    return src is not None and src not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


@click.command("evaluate")
@click.option("--attack", type=click.Choice(["fgsm", "bim", "transfer", "all"]), default=None,
              help="Attack to run (required unless --suite or --resume gives it).")
@click.option("--targeted", "mode", flag_value="targeted",
              help="Targeted: every sample towards each wrong class in turn (paper Fig. 3 right).")
@click.option("--untargeted", "mode", flag_value="untargeted", default=True,
              help="Untargeted (default).")
@click.option("--both", "mode", flag_value="both", help="Untargeted and targeted.")
@model_options(default=_DEFAULT_MODELS)
@click.option("--dataset", default="synthnorb", show_default=True,
              metavar="synthnorb|smallnorb|mnist|npz:PATH", help="Evaluation data (test split).")
@click.option("--split", default="test", show_default=True, help="Dataset split.")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder holding the dataset files.")
@click.option("--epsilons", default=None, metavar="LIST",
              help="Comma-separated L-inf epsilons in input units, e.g. 0,0.05,0.1.")
@click.option("--eps-range", default=None, metavar="START:STOP:STEP",
              help="Epsilon grid, STOP included. Default 0:0.5:0.05 (the paper's axis).")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="BIM iterations.")
@click.option("--step-size", type=float, default=None,
              help="BIM step in input units. Default 1.25*eps/steps.")
@click.option("--early-stop/--no-early-stop", default=True, show_default=True,
              help="BIM: keep each sample's first success and stop computing for it "
              "(--no-early-stop runs every step, like torchattacks/foolbox).")
@click.option("--loss", type=click.Choice(["ce", "spread", "margin", "cw"]), default=None,
              help="Loss the attacks differentiate. Default ce: cross-entropy on the scores "
              "(for capsule nets the logits of the class activations; spread saturates).")
@click.option("--n-samples", type=click.IntRange(min=1), default=None,
              help="Samples to attack (class-stratified). Default depends on the attack; printed.")
@click.option("--backend", type=click.Choice(["native", "torchattacks", "foolbox", "all"]),
              default="native", show_default=True,
              help="Attack implementation; 'all' runs the three on identical inputs and "
              "reports their largest disagreement.")
@click.option("--source", default=None, metavar="SPEC", help="Transfer: source model (default cnn).")
@click.option("--target", "targets", multiple=True, metavar="SPEC",
              help="Transfer: target model; repeat. Default capsnet-small and cnn-b (zoo).")
@click.option("--transfer-attack", type=click.Choice(["fgsm", "bim"]), default="fgsm",
              show_default=True, help="Transfer: attack crafting the examples on the source.")
@click.option("--suite", default=None, metavar="FILE|NAME",
              help="TOML attack suite (e.g. attacks/paper-fig3.toml or just paper-fig3).")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted run in --out (settings are read from it).")
@click.option("--no-figures", is_flag=True, help="Skip the figures.")
@common_options(out_help="Run directory (default results/runs/<timestamp>-<attack>).",
                batch_default=None)
@click.pass_context
def command(ctx: click.Context, common, models, attack, mode, dataset, split, data_dir, epsilons,
            eps_range, steps, step_size, early_stop, loss, n_samples, backend, source, targets,
            transfer_attack, suite, resume, no_figures) -> None:
    """Attack models over an epsilon sweep and write records, summary, figures and manifest.

    Epsilons are L-infinity sizes in the model's input space: per-image standardised
    units for NORB data (no bounds), [0, 1] units for MNIST. With --attack alone it runs
    the embedded default: SynthNORB test split, zoo capsnet-small and cnn.
    """
    from ..attacks.engine import evaluate, model_spec, parse_eps_range, parse_epsilons
    from ..attacks.suite import load_suite, suite_to_kwargs

    kwargs: dict[str, Any] = {}
    # 1. a resumed run's own settings, 2. a suite, 3. explicit options (highest priority)
    if resume:
        if common.out is None:
            raise click.UsageError("--resume needs --out DIR, the run directory to continue")
        mpath = common.out / "manifest.json"
        if not mpath.is_file():
            raise RobustcapsError(f"nothing to resume: {common.out} holds no manifest.json")
        kwargs.update(json.loads(mpath.read_text()).get("invocation", {}))
    if suite is not None:
        kwargs.update(suite_to_kwargs(load_suite(suite)))

    explicit = lambda name: _explicit(ctx, name)  # noqa: E731
    if attack is not None:
        kwargs["attack"] = attack
    if "attack" not in kwargs:
        raise click.UsageError("give --attack fgsm|bim|transfer|all (or --suite FILE)")
    if explicit("mode"):
        kwargs["targeted"] = mode
    kwargs.setdefault("targeted", mode)
    if explicit("model") or "models" not in kwargs or kwargs["models"] is None:
        kwargs["models"] = models  # ModelRequests (with their adapter options)
    if epsilons is not None and eps_range is not None:
        raise click.UsageError("give --epsilons or --eps-range, not both")
    if epsilons is not None:
        kwargs["epsilons"] = parse_epsilons(epsilons)
    elif eps_range is not None:
        kwargs["epsilons"] = parse_eps_range(eps_range)
    for name, value in [("dataset", dataset), ("split", split), ("steps", steps),
                        ("step_size", step_size), ("early_stop", early_stop), ("loss", loss),
                        ("n_samples", n_samples), ("backend", backend), ("source", source),
                        ("transfer_attack", transfer_attack)]:
        if explicit(name) or name not in kwargs:
            kwargs[name] = value
    if data_dir is not None:
        kwargs["data_dir"] = str(data_dir)
    if targets:
        kwargs["transfer_targets"] = list(targets)
    if common.batch_size is not None:
        kwargs["batch_size"] = common.batch_size
    if explicit("seed") or "seed" not in kwargs:
        kwargs["seed"] = common.seed
    if explicit("device") or "device" not in kwargs:
        kwargs["device"] = common.device

    model_list = kwargs.pop("models")
    out = common.out
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        label = kwargs["attack"] if isinstance(kwargs["attack"], str) else "-".join(kwargs["attack"])
        out = Path("results") / "runs" / f"{stamp}-{label}"
    white = kwargs["attack"] != "transfer" and kwargs["attack"] != ["transfer"]
    invocation = {**kwargs, "models": [model_spec(m) for m in model_list] if white else None}

    result = evaluate(
        model_list, out=out, resume=resume, figures=not no_figures,
        progress=not common.quiet, echo=common.echo,
        command=shlex.join(["robustcaps", *sys.argv[1:]]), invocation=invocation, **kwargs,
    )
    common.echo("")
    common.echo(result.table)
    common.echo("")
    common.echo("files:")
    for name, path in result.paths.items():
        if name != "complete":
            click.echo(f"  {path}")
