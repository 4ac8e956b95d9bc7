"""``robustcaps bench routing``: capsule-network throughput and peak memory.

For each configuration (``capsnet-small``, ``capsnet``) and device: images/s of the forward
pass (no autograd) and of forward + backward, where backward is the gradient w.r.t. the
input only (``torch.autograd.grad(loss, x)``, as attacks use it), plus peak memory of each.

Peak memory, over the warm-up and the timed runs: on CUDA ``torch.cuda.max_memory_allocated``
(reset before each measurement), minus what was allocated before it. On CPU the growth of
the process's resident-set high-water mark (``VmHWM`` in /proc/self/status, reset through
/proc/self/clear_refs) over the RSS before it, after ``malloc_trim(0)`` (glibc) has handed
freed heap memory back, so memory the allocator kept from earlier runs neither hides new
use nor counts as used; where the reset is unavailable, the growth of
``resource.getrusage().ru_maxrss`` (which then only shows new peaks). The ``memory_method``
field says which was used. Timings are medians over ``repeats`` runs after one warm-up.

Routing passes: on the CPU the passes over the votes are the native C kernels of
:mod:`robustcaps.models.native` when they could be built (``passes`` says ``native`` or
``torch``); ``--torch-passes`` measures the torch-ops implementation instead, for a ratio on
the same machine. ``cpu`` names the processor.

Threads: with ``threads > 1`` the routing runs a layer's sample chunks on that many threads
(``em_routing.CHUNK_THREADS``); ``--intra-op`` measures the alternative, every op split over
torch's intra-op threads. ``load_avg_1m`` (``os.getloadavg``, at the start of each row) says
how busy the machine was: on a shared CPU compare figures only at similar load, or compare
``*_cpu_s_per_batch`` (the least CPU time of the process over the runs), which the load
hardly moves.

Routing presets (``CapsNet(routing=...)``): every configuration is measured with each of
``routings`` (default ``paper`` and ``authors``, one after the other in the same run, so
their ratio is what to compare); the ``routing`` field says which.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import click
import torch

from ..errors import RobustcapsError

CONFIGS = ("capsnet-small", "capsnet")
ROUTINGS = ("paper", "authors")


def _read_status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _PeakMemory:
    """Peak extra memory (bytes) used while the block runs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.method = ""

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        _malloc_trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to current RSS
            self.base = _read_status("VmRSS")
            self.method = "VmHWM-VmRSS (/proc, peak reset)"
        except OSError:
            self.base = None
        if self.base is None:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss delta (new peaks only)"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.method.startswith("VmHWM"):
            self.peak = (_read_status("VmHWM") or 0) - self.base
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


def _malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc), so RSS is the memory in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_routing(
    configs: tuple[str, ...] = CONFIGS,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    iterations: int = 3,
    repeats: int = 3,
    dtype: torch.dtype = torch.float32,
    compile_routing: bool = False,
    threads: int | None = None,
    chunk_threads: bool = True,
    native_passes: bool = True,
    routings: tuple[str, ...] = ROUTINGS,
) -> list[dict[str, Any]]:
    """One row per configuration: forward and forward+backward images/s and peak memory.

    ``threads``: CPU threads for the measurement (restored afterwards); None keeps torch's
    current setting. ``chunk_threads``: route sample chunks in parallel on those threads
    (the default); False splits every op over torch's intra-op threads instead.
    ``native_passes``: False routes with torch ops even where the native kernels exist.
    ``routings``: the routing presets measured, one row each per configuration.
    """
    from ..models import em_routing

    if threads is not None and threads < 1:
        raise RobustcapsError(f"threads must be positive, got {threads}")
    old_threads = torch.get_num_threads()
    old_chunk_threads = em_routing.CHUNK_THREADS
    old_native = os.environ.get("ROBUSTCAPS_NATIVE")
    if threads is not None:
        torch.set_num_threads(threads)
    em_routing.CHUNK_THREADS = chunk_threads
    if not native_passes:
        os.environ["ROBUSTCAPS_NATIVE"] = "0"
    try:
        return _benchmark(configs, device, batch_size, iterations, repeats, dtype,
                          compile_routing, routings)
    finally:
        torch.set_num_threads(old_threads)
        em_routing.CHUNK_THREADS = old_chunk_threads
        if old_native is None:
            os.environ.pop("ROBUSTCAPS_NATIVE", None)
        else:
            os.environ["ROBUSTCAPS_NATIVE"] = old_native


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo), else what platform reports."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() == "model name":
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _benchmark(configs: tuple[str, ...], device: str | torch.device, batch_size: int,
               iterations: int, repeats: int, dtype: torch.dtype,
               compile_routing: bool, routings: tuple[str, ...] = ROUTINGS,
               ) -> list[dict[str, Any]]:
    from ..models import em_routing, native
    from ..models.registry import count_params, create_model
    from ..utils import resolve_device

    dev = resolve_device(device)
    if batch_size < 1 or repeats < 1:
        raise RobustcapsError("batch size and repeats must be positive")
    rows = []
    for name, routing in ((c, r) for c in configs for r in routings):
        torch.manual_seed(0)
        model = create_model(name, iterations=iterations, compile_routing=compile_routing,
                             routing=routing).to(device=dev, dtype=dtype).eval()
        x = torch.randn(batch_size, 2, 32, 32, device=dev, dtype=dtype)
        y = torch.arange(batch_size, device=dev) % 5

        def forward(model: torch.nn.Module = model, x: torch.Tensor = x) -> None:
            with torch.no_grad():
                model(x)

        def forward_backward(model: torch.nn.Module = model, x: torch.Tensor = x,
                             y: torch.Tensor = y) -> None:
            xr = x.detach().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(xr), y)
            torch.autograd.grad(loss, xr)

        row: dict[str, Any] = {
            "model": name, "routing": routing, "device": str(dev), "dtype": str(dtype).replace("torch.", ""),
            "batch_size": batch_size, "iterations": iterations, "params": count_params(model),
            "threads": torch.get_num_threads(), "compiled": compile_routing,
            "chunk_threads": em_routing.CHUNK_THREADS and torch.get_num_threads() > 1,
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "passes": "native" if native.usable(x) and not compile_routing else "torch",
            "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        }
        for key, fn in (("forward", forward), ("forward_backward", forward_backward)):
            times, cpu_times = [], []
            with _PeakMemory(dev) as mem:
                t0 = time.perf_counter()
                fn()  # warm-up (allocator, caches; compilation with --compile)
                _sync(dev)
                row[f"{key}_warmup_s"] = round(time.perf_counter() - t0, 2)
                for _ in range(repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    _sync(dev)
                    times.append(time.perf_counter() - t0)
                    cpu_times.append(time.process_time() - c0)
            med = statistics.median(times)
            row[f"{key}_img_s"] = round(batch_size / med, 2)
            row[f"{key}_s_per_batch"] = round(med, 4)
            # CPU seconds of this process (all its threads): on a shared, loaded CPU the
            # cost of a configuration, where wall-clock figures swing with the load
            row[f"{key}_cpu_s_per_batch"] = round(min(cpu_times), 4)
            row[f"{key}_peak_mem_mb"] = round(max(mem.peak, 0) / 2**20, 1)
            row["memory_method"] = mem.method
        rows.append(row)
    return rows


@click.command("routing")
@click.option("--device", default="all", show_default=True, metavar="all|cpu|cuda[:N]",
              help="'all': the CPU, and CUDA too where available.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--iterations", type=click.IntRange(1, 10), default=3, show_default=True,
              help="EM routing iterations.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs per figure (median reported).")
@click.option("--model", "models", multiple=True, type=click.Choice(CONFIGS),
              help="Configuration(s) to run (default: both).")
@click.option("--compile", "compile_routing", is_flag=True,
              help="Route through torch.compile (warm-up then includes compilation).")
@click.option("--threads", "threads", multiple=True, type=click.IntRange(min=1),
              help="CPU intra-op threads (repeatable to compare, e.g. --threads 1 --threads 2; "
                   "default: torch's setting). On a loaded shared CPU 1 thread can be faster.")
@click.option("--intra-op", is_flag=True,
              help="Split every routing op over the threads instead of routing sample chunks "
                   "on parallel threads (the default).")
@click.option("--torch-passes", is_flag=True,
              help="Route with torch ops even where the native CPU kernels are built.")
@click.option("--routing", "routings", multiple=True,
              type=click.Choice(["paper", "authors", "authors-smooth", "pertype"]),
              help="Routing preset(s) to run (default: paper and authors).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(device: str, batch_size: int, iterations: int, repeats: int,
            models: tuple[str, ...], compile_routing: bool, threads: tuple[int, ...],
            intra_op: bool, torch_passes: bool, routings: tuple[str, ...],
            as_json: bool) -> None:
    """Capsule network forward and forward+backward (input gradient) images/s and memory."""
    if device == "all":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [device]
    rows = []
    for dev in devices:
        for nt in threads or (None,):
            rows += benchmark_routing(models or CONFIGS, dev, batch_size, iterations, repeats,
                                      compile_routing=compile_routing, threads=nt,
                                      chunk_threads=not intra_op,
                                      native_passes=not torch_passes,
                                      routings=routings or ROUTINGS)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"EM routing benchmark: batch {batch_size}, 2x32x32 input, {iterations} iterations, "
               f"median of {repeats}{', compiled' if compile_routing else ', eager'}; peak memory: {rows[0]['memory_method']}")
    click.echo(f"CPU: {rows[0]['cpu']} ({rows[0]['cpu_count']} logical cores)")
    header = (f"{'model':<14} {'routing':<8} {'device':<7} {'thr':>3} {'passes':<6} {'params':>8} {'fwd img/s':>10} "
              f"{'fwd MB':>8} {'fwd+bwd img/s':>14} {'fwd+bwd MB':>11} {'load':>5} "
              f"{'fwd CPU s':>9} {'f+b CPU s':>9}")
    click.echo(header)
    click.echo("-" * len(header))
    for r in rows:
        click.echo(f"{r['model']:<14} {r['routing']:<8} {r['device']:<7} {r['threads']:>3} {r['passes']:<6} {r['params']:>8,} {r['forward_img_s']:>10.1f} "
                   f"{r['forward_peak_mem_mb']:>8.0f} {r['forward_backward_img_s']:>14.1f} "
                   f"{r['forward_backward_peak_mem_mb']:>11.0f} {r['load_avg_1m']:>5.2f} "
                   f"{r['forward_cpu_s_per_batch']:>9.3f} {r['forward_backward_cpu_s_per_batch']:>9.3f}")
