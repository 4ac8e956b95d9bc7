"""``robustcaps train``: train a built-in architecture and write a zoo entry (a thin layer
over :func:`robustcaps.training.train`)."""

from __future__ import annotations

import click

from ._common import common_options, on_interrupt, out_dir, resume_hint


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@click.command("train")
@click.option("--model", "model_name", required=True, metavar="ARCH",
              help="Architecture to train: capsnet, capsnet-small, cnn (see `robustcaps models`).")
@click.option("--dataset", default="synthnorb", show_default=True,
              help="synthnorb, smallnorb, mnist or npz:PATH.")
@click.option("--test-dataset", default=None,
              help="Dataset of the test split when it is another one (e.g. a second npz:PATH).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder of the dataset files (default: the data module's default/cache).")
@click.option("--train-split", default="train", show_default=True, help="Split to train on.")
@click.option("--test-split", default="test", show_default=True, help="Split to evaluate on.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--lr", type=float, default=None,
              help="Adam learning rate [default: 3e-3 for capsule networks, 1e-3 otherwise].")
@click.option("--lr-decay", type=float, default=0.9, show_default=True,
              help="Exponential learning-rate decay: factor per epoch, applied every step.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="Adam L2 penalty.")
@click.option("--loss", type=click.Choice(["auto", "spread", "margin", "ce"]), default="auto",
              show_default=True, help="auto: spread loss for capsule networks, cross-entropy otherwise.")
@click.option("--margin-start", type=float, default=0.2, show_default=True,
              help="Spread-loss margin at the start (grows linearly over the run).")
@click.option("--margin-end", type=float, default=0.9, show_default=True,
              help="Spread-loss margin at the end of the run.")
@click.option("--augment", type=click.Choice(["auto", "paper", "none"]), default="auto",
              show_default=True,
              help="paper: random 32x32 crop + brightness/contrast; auto: paper when images are larger than 32x32.")
@click.option("--grad-clip", type=float, default=None, help="Clip the gradient norm to this value.")
@click.option("--arch-kw", multiple=True, metavar="KEY=VALUE",
              help="Architecture option, e.g. iterations=2 (JSON values); repeatable.")
@click.option("--data-seed", type=int, default=0, show_default=True,
              help="Seed of sample subsets and the validation hold-out (kept apart from --seed).")
@click.option("--mono", is_flag=True, help="Use only the left camera image of NORB pairs.")
@click.option("--max-train-samples", type=click.IntRange(min=1), default=None,
              help="Train on a class-stratified subset of this many images (CPU budget).")
@click.option("--max-test-samples", type=click.IntRange(min=1), default=None,
              help="Evaluate on a class-stratified subset of this many test images.")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=None,
              help="At most this many batches per epoch (each epoch reshuffles).")
@click.option("--val-instances", callback=_int_list, default=None, metavar="I,J",
              help="Hold out these object instances of the training split for validation (NORB).")
@click.option("--val-fraction", type=float, default=None,
              help="Hold out this class-stratified fraction of the training split for validation.")
@click.option("--stop-at-error", type=float, default=None, metavar="E",
              help="Stop once the error on the --on split is at most E (e.g. 0.05).")
@click.option("--on", "stop_on", type=click.Choice(["test", "val"]), default="test",
              show_default=True, help="Split watched by --stop-at-error.")
@click.option("--eval-every-steps", type=click.IntRange(min=1), default=None,
              help="Also evaluate (and check --stop-at-error) every this many steps.")
@click.option("--eval-samples", type=click.IntRange(min=1), default=None,
              help="Evaluations during training use this many test (and val) images; the final "
              "test error uses the whole test split.")
@click.option("--no-multi-crop", is_flag=True, help="Skip the final multi-crop test error.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, metavar="STEPS",
              help="Also checkpoint every this many steps (resume mid-epoch exactly).")
@click.option("--time-limit", type=float, default=None, metavar="SECONDS",
              help="Checkpoint and pause after this much time; continue with --resume.")
@click.option("--stop-after-steps", type=click.IntRange(min=1), default=None,
              help="Checkpoint and pause after this many steps of this invocation.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--overwrite", is_flag=True, help="Start again even if --out holds a run.")
@click.option("--name", default=None, help="Zoo name on the card [default: the --out folder name].")
@click.option("--description", default=None, help="One-line description for the model card.")
@common_options(out_help="Output folder, e.g. models/NAME (a zoo entry). Required.",
                batch_default=32)
def command(common, model_name: str, arch_kw: tuple[str, ...], no_multi_crop: bool, mono: bool,
            **kwargs) -> None:
    """Train a model (Adam, spread loss with growing margin for capsules, paper augmentation).

    Evaluates on the test split (centre crop) after each epoch, writes metrics.csv, a full
    checkpoint each epoch (optionally every --checkpoint-every steps) in OUT/checkpoints/,
    and at the end weights.pt plus a model card (card.json, card.md). Stops with an error on a
    NaN/Inf loss without touching the last good checkpoint.

    \b
    Example:
      robustcaps train --model capsnet-small --dataset synthnorb --epochs 2 \\
          --max-train-samples 4000 --out models/my-capsnet
    """
    from ..errors import Interrupted, RobustcapsError
    from ..training import parse_arch_kwargs, train

    if common.out is None:
        raise click.UsageError("--out is required (e.g. --out models/NAME)")
    out_dir(common)
    with on_interrupt("train", common.out, "checkpoints/last.pt"):
        result = train(model_name, out=common.out, seed=common.seed,
                       batch_size=common.batch_size, device=common.device,
                       progress=not common.quiet, arch_kwargs=parse_arch_kwargs(arch_kw),
                       multi_crop=not no_multi_crop, stereo=not mono, **kwargs)
    if result.get("rank", 0):  # under torchrun only rank 0 reports
        return
    if result.get("interrupted"):  # the trainer checkpointed on Ctrl-C
        raise Interrupted(resume_hint("train", common.out, "checkpoints/last.pt"))
    if result["status"] == "paused":
        click.echo(f"paused at step {result['global_step']}: resume with the same command and --resume")
        return
    card = result["card"]
    if card is None:  # pragma: no cover - finished runs always have a card
        raise RobustcapsError("training ended without a model card")
    err = card["test_error"]
    multi = f", multi-crop {err['multi_crop']:.2%}" if err.get("multi_crop") is not None else ""
    common.echo(f"{card['name']}: test error centre {err['center']:.2%}{multi} "
                f"({card['epochs']} epochs, {card['train_time_s']} s)")
    click.echo(str(result["paths"]["card_json"]))

