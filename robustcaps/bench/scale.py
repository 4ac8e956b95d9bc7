"""``robustcaps bench scale``: the same evaluation on 1 and N processes (one thread each).

Each run is a fresh command (``python -m robustcaps evaluate`` for 1 process, torch's
launcher ``python -m torch.distributed.run --nproc-per-node N -m robustcaps evaluate`` for
N), timed end to end, start-up included, so the speed-up is what a user sees. The records of
the runs are compared (sorted) and the N-process run's manifest gives the busy time per rank
and the imbalance. Timings on a shared machine move with its load, so the load average is
reported next to them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import pandas as pd

#: a default workload of about a minute on one CPU thread (32 samples with 4 epsilons took
#: 10 s of CPU), so that the few seconds each process needs to start are small beside it:
#: zoo capsnet-small and cnn, untargeted BIM, 48 units of 4 samples (enough to balance)
DEFAULT_ARGS = ("--attack", "bim", "--model", "capsnet-small", "--model", "cnn",
                "--n-samples", "96", "--batch-size", "4",
                "--epsilons", "0,0.05,0.1,0.15,0.2,0.25,0.3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_line(nproc: int, args: list[str]) -> list[str]:
    """The command that runs ``robustcaps evaluate ARGS`` on ``nproc`` processes."""
    if nproc == 1:
        return [sys.executable, "-m", "robustcaps", "evaluate", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(_free_port()), "-m", "robustcaps", "evaluate", *args]


def _sorted_records(run: Path) -> bytes:
    df = pd.read_csv(io.BytesIO(gzip.decompress((run / "records.csv.gz").read_bytes())))
    return df.sort_values(list(df.columns), kind="stable").to_csv(index=False).encode()


def time_run(nproc: int, args: list[str], out: Path, device: str) -> dict[str, Any]:
    """Wall time of one run on ``nproc`` single-threaded processes, and its manifest's
    balance figures."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = command_line(nproc, [*args, "--device", device, "--no-figures", "-q", "--out", str(out)])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise click.ClickException(f"{nproc}-process run failed: {p.stderr.strip()[-500:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    scale = manifest.get("scale") or {  # a single process: the sum of its unit times
        "busy_seconds": [sum(manifest["timings"]["units_seconds"].values())], "imbalance": 0.0}
    return {"processes": nproc, "wall_seconds": wall, "busy_seconds": scale["busy_seconds"],
            "imbalance": scale["imbalance"]}


def run_scale_bench(args: list[str], nprocs: tuple[int, ...], device: str = "cpu",
                    repeats: int = 1, workdir: Path | None = None) -> dict[str, Any]:
    """Time the runs (interleaved, best of ``repeats``: other jobs only ever slow a run
    down); speed-ups relative to the first count; whether all records agree."""
    best: dict[int, dict[str, Any]] = {}
    records: set[bytes] = set()
    load_before = os.getloadavg()
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            for n in nprocs:
                r = time_run(n, args, Path(tmp) / f"p{n}", device)
                records.add(_sorted_records(Path(tmp) / f"p{n}"))
                if n not in best or r["wall_seconds"] < best[n]["wall_seconds"]:
                    best[n] = r
    rows, same = [best[n] for n in nprocs], len(records) == 1
    for r in rows:
        r["speedup"] = rows[0]["wall_seconds"] / r["wall_seconds"]
    return {"rows": rows, "records_identical": same, "args": args, "cpu_count": os.cpu_count(),
            "repeats": repeats, "load_before": load_before, "load_after": os.getloadavg()}


@click.command("scale")
@click.option("--nproc", "nprocs", multiple=True, type=click.IntRange(min=1), default=(1, 2),
              show_default=True, help="Process counts to time (repeat); the first is the base.")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda",
              help="cuda: one GPU per process (cuda:LOCAL_RANK).")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Interleaved repetitions; the best wall time of each count is kept.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
@click.argument("evaluate_args", nargs=-1, type=click.UNPROCESSED)
def command(nprocs: tuple[int, ...], device: str, repeats: int, as_json: bool,
            evaluate_args: tuple[str, ...]) -> None:
    """Wall time and speed-up of one evaluation on 1 and N processes (1 thread each).

    EVALUATE_ARGS (after --) are robustcaps evaluate options; default: zoo capsnet-small
    and cnn, BIM, 96 SynthNORB samples in 48 units. Example:
    robustcaps bench scale --nproc 1 --nproc 2 -- --attack fgsm --n-samples 200
    """
    res = run_scale_bench(list(evaluate_args or DEFAULT_ARGS), tuple(nprocs), device, repeats)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"robustcaps evaluate {' '.join(res['args'])}  ({res['cpu_count']} CPUs, best of "
               f"{res['repeats']}, load average {res['load_before'][0]:.2f} before, {res['load_after'][0]:.2f} after)")
    click.echo(f"{'processes':>9}  {'wall s':>8}  {'speed-up':>8}  {'imbalance':>9}  busy s per process")
    for r in res["rows"]:
        busy = ", ".join(f"{b:.1f}" for b in r["busy_seconds"] or [])
        click.echo(f"{r['processes']:>9}  {r['wall_seconds']:>8.1f}  {r['speedup']:>7.2f}x  "
                   f"{100 * r['imbalance']:>8.1f}%  {busy or '-'}")
    click.echo(f"records identical: {'yes' if res['records_identical'] else 'NO'}")
