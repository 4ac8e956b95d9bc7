"""``robustcaps data``: fetch, verify, generate and inspect datasets.

A thin layer over :mod:`robustcaps.data` (download.fetch / download.verify,
synthnorb.generate, load_dataset).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..utils import ensure_dir
from ._common import common_options, out_dir

_DIR_HELP = "Data folder (default: the robustcaps cache, $ROBUSTCAPS_CACHE or ~/.cache/robustcaps)."


def _default_dir(dataset: str) -> Path:
    from ..data.datasets import _cache_root

    return _cache_root() / dataset


def _quiet_options(f):
    f = click.option("-q", "--quiet", is_flag=True, help="No progress bars; only errors and paths.")(f)
    return f


@click.group("data", context_settings={"help_option_names": ["-h", "--help"]})
def command() -> None:
    """Datasets: fetch smallNORB/MNIST, verify files, render SynthNORB, show a summary.

    \b
    Dataset names used across robustcaps (--dataset):
      synthnorb            rendered smallNORB-like data (default; generated and cached locally)
      smallnorb            the official files (robustcaps data fetch smallnorb --dir D)
      mnist                idx files (splits train/test, or t10k-train/t10k-test = first
                           8,000 / last 2,000 of the test file when only t10k is present)
      npz:PATH             your own data: x (N,C,H,W) float or uint8, y (N,) int labels
    """


@command.command("fetch")
@click.argument("dataset", type=click.Choice(["smallnorb", "mnist"]))
@click.option("--dir", "data_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help=_DIR_HELP)
@click.option("--base-url", multiple=True, metavar="URL",
              help="Download from this base URL instead of the default (repeat to try several).")
@click.option("--keep-gz", is_flag=True, help="Keep the downloaded .gz files.")
@click.option("--split", type=click.Choice(["train", "test"]), default=None,
              help="Fetch only this split's files (default: all).")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="Resume attempts per file after a dropped connection.")
@_quiet_options
def fetch_cmd(dataset: str, data_dir: Path | None, base_url: tuple[str, ...], keep_gz: bool,
              split: str | None, retries: int, quiet: bool) -> None:
    """Download DATASET, decompress it and verify sizes and sha256.

    smallNORB: the six .mat.gz files from https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/.
    Interrupted downloads resume (HTTP Range) when the command is run again. Files without a
    published checksum (smallNORB testing-cat) are trusted on first use: their sha256 is
    recorded in checksums.json on the first successful download and checked from then on.
    """
    from ..data import download

    folder = ensure_dir(data_dir or _default_dir(dataset), "--dir")
    got = download.fetch(dataset, folder, base_url=list(base_url) or None, progress=not quiet,
                         keep_compressed=keep_gz, retries=retries, split=split)
    for f in got:
        note = {"official": "sha256 matches the official checksum",
                "recorded": "no official checksum; trusted on first use, sha256 recorded in checksums.json",
                "skipped": "already present and verified"}[f.status]
        if not quiet:
            click.echo(f"{f.name}: {f.size:,} bytes, {note}")
    click.echo(str(folder))


@command.command("verify")
@click.option("--dir", "data_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help=_DIR_HELP)
@click.option("--dataset", type=click.Choice(["smallnorb", "mnist", "synthnorb"]), default="smallnorb",
              show_default=True,
              help="Which file set to expect (synthnorb: smallNORB-format files, no official hashes).")
@click.option("--no-checksum", is_flag=True, help="Skip the sha256 (fast: sizes and headers only).")
@click.option("--json", "as_json", is_flag=True, help="Print the per-file report as JSON.")
@_quiet_options
def verify_cmd(data_dir: Path | None, dataset: str, no_checksum: bool, as_json: bool,
               quiet: bool) -> None:
    """Check each expected file: present, size, format, checksum.

    Exits with an error (code 2) when any file is missing or bad.
    """
    import dataclasses

    from ..data import download
    from ..errors import DataError

    folder = data_dir or _default_dir(dataset)
    files = None
    if dataset == "synthnorb":
        files = [dataclasses.replace(f, sha256=None) for f in download.smallnorb_files()]
        dataset = "smallnorb"
    reports = download.verify(folder, dataset, files=files, checksums=not no_checksum,
                              progress=not quiet)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) | {"ok": r.ok} for r in reports], indent=2))
    else:
        width = max(len(r.name) for r in reports)
        for r in reports:
            if not r.present:
                line = "MISSING"
            else:
                size = f"{r.size:,} B" + ("" if r.size_ok is not False else " (WRONG SIZE)")
                fmt = "format ok" if r.format_ok else f"BAD FORMAT: {r.format_error}"
                line = f"{size}, {fmt}, checksum: {r.checksum}"
            click.echo(f"{'ok ' if r.ok else 'BAD'} {r.name:<{width}}  {line}")
    bad = [r.name for r in reports if not r.ok]
    if bad:
        raise DataError(f"{len(bad)} of {len(reports)} files in {folder} failed verification"
                        + (f": {bad[0]}" if len(bad) == 1 else " (see the list above)"))


@command.command("synthnorb")
@common_options(out_help="Output folder for the smallNORB-format files (default: the per-seed "
                           "cache folder, reused when complete).", skip=("device", "batch_size"))
@click.option("--split", "splits", type=click.Choice(["training", "testing"]), multiple=True,
              help="Generate only this split (repeatable; default both).")
def synthnorb_cmd(common, splits: tuple[str, ...]) -> None:
    """Render SynthNORB (24,300 stereo pairs per split) into official-format files.

    --seed selects a different rendering; the built-in 'synthnorb' dataset is seed 0.
    """
    from ..data import synthnorb
    from ..data.smallnorb import norb_filename

    chosen = splits or ("training", "testing")
    out_dir(common)
    if common.out is None:
        folder = synthnorb.ensure_generated(None, seed=common.seed, splits=chosen,
                                            progress=not common.quiet)
        paths = [folder / norb_filename(s, k) for s in chosen for k in ("dat", "cat", "info")]
    else:
        paths = synthnorb.generate(common.out, seed=common.seed, splits=chosen,
                                   progress=not common.quiet)
    for p in paths:
        click.echo(str(p))


@command.command("info")
@common_options(out_help="Also write the summary as JSON into this folder (dataset_info.json).",
                skip=("device", "batch_size"))
@click.option("--dataset", "name", default="synthnorb", show_default=True,
              help="synthnorb, smallnorb, mnist or npz:PATH.")
@click.option("--split", default="test", show_default=True,
              help="train, test, a viewpoint split (azimuth-train, azimuth-test-novel, ...) or, "
                   "for MNIST, t10k-train / t10k-test.")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder of the dataset files.")
@click.option("--n-samples", type=click.IntRange(min=1), default=None,
              help="Class-stratified subset of this size (chosen by --seed).")
@click.option("--crop", type=click.Choice(["center", "none", "multi"]), default="center",
              show_default=True, help="NORB crop: centre 32x32, none (48x48), multi (48x48 kept).")
@click.option("--mono", is_flag=True, help="NORB: only the left image (1 channel) instead of the pair.")
def info_cmd(common, name: str, split: str, data_dir: Path | None, n_samples: int | None,
             crop: str, mono: bool) -> None:
    """Load a dataset and print a summary: name, split, N, shape, classes, bounds, fingerprint."""
    from ..data import load_dataset

    out_dir(common)
    ds = load_dataset(name, split, data_dir=data_dir, n_samples=n_samples, seed=common.seed,
                      stereo=not mono, crop=crop, progress=not common.quiet)
    s = ds.summary()
    if common.out is not None:
        path = common.out / "dataset_info.json"
        path.write_text(json.dumps(s, indent=2) + "\n")
    lines = [
        ("name", s["name"]), ("split", s["split"]), ("N", f"{s['n']:,}"),
        ("x shape", " x ".join(map(str, s["x_shape"]))),
        ("model input (C,H,W)", " x ".join(map(str, s["input_shape"]))),
        ("classes", f"{s['num_classes']}: " + ", ".join(
            f"{n} ({c})" for n, c in zip(s["class_names"], s["class_counts"], strict=False))),
        ("bounds", "none (standardised)" if s["bounds"] is None else f"[{s['bounds'][0]}, {s['bounds'][1]}]"),
        ("value range", "-" if s["x_range"] is None else f"{s['x_range'][0]:.3f} .. {s['x_range'][1]:.3f}"),
        ("fingerprint", s["fingerprint"]),
        ("source", s["source"]),
    ]
    if not common.quiet:
        for key, value in lines:
            click.echo(f"{key:<20} {value}")
    if common.out is not None:
        click.echo(str(common.out / "dataset_info.json"))
