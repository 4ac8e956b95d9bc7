"""SynthNORB: a procedural, smallNORB-compatible dataset rendered locally (the embedded default).

Protocol (as smallNORB): 5 categories (0 animal, 1 human, 2 airplane, 3 truck, 4 car), 10
instances each (4, 6, 7, 8, 9 for training; 0, 1, 2, 3, 5 for testing), 9 elevations
(30-70 degrees every 5), 18 azimuths (0-340 every 20), 6 lighting conditions, stereo pairs of
96x96 uint8 grey images: 24,300 pairs per split, written in the official matrix format and
file names so that :mod:`robustcaps.data.smallnorb` reads them.

Record order (both splits): nested loops category, instance (in the split's order above),
elevation, azimuth, lighting, i.e. record ``i`` has

    i = (((category * 5 + instance_position) * 9 + elevation) * 18 + azimuth_index) * 6 + lighting

and ``dat[i, 0]`` / ``dat[i, 1]`` are the left / right camera. ``info[i]`` = (instance id,
elevation index 0-8, azimuth 0, 2, ..., 34 (degrees / 10), lighting 0-5).

Objects are unions of ellipsoids, boxes and cylinders whose proportions are drawn per
instance from a generator seeded by ``(seed, category, instance)``
(:mod:`.synthnorb_shapes`), ray-cast with a depth test and matte shading
(:mod:`.synthnorb_render`). Image ``i`` depends only on ``(split, i, seed)`` (there is no
per-image noise), so :func:`render_subset` returns exactly the rows of the full files.

Rendering: pinhole cameras 6 object radii away (focal 240 px), converged on the object,
0.36 radii apart (about 3.4 degrees of vergence) for the stereo pair; azimuth turns the
turntable (the lights turn with the cameras, as in a fixed studio), elevation raises both
cameras. Matte (Lambertian) objects with ambient light, 6 lighting conditions of one or two
directional lights, a plain background whose grey level depends on the lighting, and a
[1,2,1]/4 blur for the optics. Full generation takes well under a minute on 2 cores
(``robustcaps bench data``); the files take 0.9 GB.

Cache: :func:`ensure_generated` writes into ``<cache>/synthnorb-r<RENDERER_VERSION>-seed<seed>``
with ``<cache>`` = ``$ROBUSTCAPS_CACHE`` or ``~/.cache/robustcaps`` (:func:`default_cache_dir`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import current_process, get_all_start_methods, get_context
from pathlib import Path

import numpy as np

from ..errors import RobustcapsError
from .synthnorb_render import IMAGE_SIZE, N_LIGHTINGS, render_views
from .synthnorb_shapes import CATEGORY_NAMES, make_shape

#: Bump whenever a change alters any rendered byte; it keys the cache.
RENDERER_VERSION = "3"
SPLITS = ("training", "testing")
INSTANCES = {"training": (4, 6, 7, 8, 9), "testing": (0, 1, 2, 3, 5)}
N_CATEGORIES = 5
N_INSTANCES = 5  # per split
N_ELEVATIONS = 9
N_AZIMUTHS = 18
N_PAIRS = N_CATEGORIES * N_INSTANCES * N_ELEVATIONS * N_AZIMUTHS * N_LIGHTINGS  # 24,300
ELEVATIONS_DEG = 30 + 5 * np.arange(N_ELEVATIONS)
AZIMUTHS_DEG = 20 * np.arange(N_AZIMUTHS)
PAIRS_PER_INSTANCE = N_ELEVATIONS * N_AZIMUTHS * N_LIGHTINGS  # 972
__all__ = [
    "CATEGORY_NAMES", "RENDERER_VERSION", "SPLITS", "N_PAIRS", "metadata", "render_subset",
    "render_instance", "object_tasks", "iter_render_objects", "generate", "default_cache_dir",
    "cache_dir_for", "is_generated", "ensure_generated", "contact_sheet",
]


def _split(split: str) -> str:
    name = {"train": "training", "test": "testing"}.get(split, split)
    if name not in SPLITS:
        raise RobustcapsError(f"unknown SynthNORB split {split!r}: use 'training' or 'testing'")
    return name


def _seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise RobustcapsError(f"invalid SynthNORB seed {seed!r}: use an integer in [0, 2**32)")
    return int(seed)


def metadata(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels and metadata of a split without rendering.

    Returns ``cat`` int32 (24300,) and ``info`` int32 (24300, 4) = (instance id, elevation
    index, azimuth (0, 2, ..., 34), lighting), in the record order of the files.
    """
    split = _split(split)
    i = np.arange(N_PAIRS)
    rest, light = np.divmod(i, N_LIGHTINGS)
    rest, az = np.divmod(rest, N_AZIMUTHS)
    rest, elev = np.divmod(rest, N_ELEVATIONS)
    cat, pos = np.divmod(rest, N_INSTANCES)
    inst = np.asarray(INSTANCES[split])[pos]
    info = np.stack([inst, elev, 2 * az, light], axis=1).astype(np.int32)
    return cat.astype(np.int32), info


def render_instance(split: str, category: int, position: int, seed: int = 0) -> np.ndarray:
    """All 972 pairs of one object, uint8 (972, 2, 96, 96), in record order.

    ``position`` is the instance's place (0-4) in the split's instance list.
    """
    split = _split(split)
    shape = make_shape(category, INSTANCES[split][position], _seed(seed))
    # Views ordered (azimuth, elevation, camera): neighbouring views share screen rectangles.
    az = np.repeat(AZIMUTHS_DEG, N_ELEVATIONS * 2)
    el = np.tile(np.repeat(ELEVATIONS_DEG, 2), N_AZIMUTHS)
    cam = np.tile(np.array([0, 1]), N_AZIMUTHS * N_ELEVATIONS)
    img = render_views(shape, el, az, cam)  # (6, 18*9*2, 96, 96)
    img = img.reshape(N_LIGHTINGS, N_AZIMUTHS, N_ELEVATIONS, 2, IMAGE_SIZE, IMAGE_SIZE)
    img = img.transpose(2, 1, 0, 3, 4, 5)  # (elev, az, light, cam, H, W)
    return np.ascontiguousarray(img.reshape(PAIRS_PER_INSTANCE, 2, IMAGE_SIZE, IMAGE_SIZE))


def render_subset(split: str, indices: np.ndarray | Sequence[int], seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render the given records of a split.

    ``indices`` (n,) in [0, 24300). Returns ``dat`` uint8 (n, 2, 96, 96), ``cat`` int32 (n,),
    ``info`` int32 (n, 4): exactly those rows of the files :func:`generate` writes.
    """
    split = _split(split)
    seed = _seed(seed)
    try:
        idx = np.asarray(indices)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError
        idx = idx.astype(np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise RobustcapsError("SynthNORB indices must be a 1-D sequence of integers") from None
    if idx.size and (idx.min() < 0 or idx.max() >= N_PAIRS):
        raise RobustcapsError(f"SynthNORB index out of range: indices must lie in [0, {N_PAIRS})")
    all_cat, all_info = metadata(split)
    dat = np.empty((len(idx), 2, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    view = idx // N_LIGHTINGS  # (category, position, elevation, azimuth)
    light = idx % N_LIGHTINGS
    obj = idx // PAIRS_PER_INSTANCE
    for o in np.unique(obj):
        sel = np.flatnonzero(obj == o)
        cat, pos = divmod(int(o), N_INSTANCES)
        shape = make_shape(cat, INSTANCES[split][pos], seed)
        views = np.unique(view[sel])
        el_i, az_i = np.divmod(views % (N_ELEVATIONS * N_AZIMUTHS), N_AZIMUTHS)
        order = np.lexsort((el_i, az_i))  # group by azimuth, as the full render does
        views, el_i, az_i = views[order], el_i[order], az_i[order]
        lights = tuple(int(x) for x in np.unique(light[sel]))
        img = render_views(shape, np.repeat(ELEVATIONS_DEG[el_i], 2),
                           np.repeat(AZIMUTHS_DEG[az_i], 2), np.tile([0, 1], len(views)), lights)
        img = img.reshape(len(lights), len(views), 2, IMAGE_SIZE, IMAGE_SIZE)
        vpos = np.searchsorted(views, view[sel], sorter=np.argsort(views))
        vpos = np.argsort(views)[vpos]
        lpos = np.searchsorted(np.asarray(lights), light[sel])
        dat[sel] = img[lpos, vpos]
    return dat, all_cat[idx], all_info[idx]


# -- files and cache ------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """Root of robustcaps' per-user cache: ``$ROBUSTCAPS_CACHE``, else ``$XDG_CACHE_HOME/robustcaps``,
    else ``~/.cache/robustcaps``."""
    env = os.environ.get("ROBUSTCAPS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "robustcaps"


def cache_dir_for(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The folder holding the cached files for ``seed``: ``<cache>/synthnorb-r<version>-seed<seed>``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"synthnorb-r{RENDERER_VERSION}-seed{_seed(seed)}"


def _paths(out_dir: Path, split: str) -> dict[str, Path]:
    from .smallnorb import norb_filename

    return {k: out_dir / norb_filename(split, k) for k in ("dat", "cat", "info")}


_SIZES = {"dat": N_PAIRS * 2 * IMAGE_SIZE * IMAGE_SIZE, "cat": N_PAIRS * 4, "info": N_PAIRS * 16}


def is_generated(out_dir: str | os.PathLike, splits: Iterable[str] = SPLITS) -> bool:
    """True when every file of ``splits`` exists in ``out_dir`` with its complete size."""
    out_dir = Path(out_dir)
    for split in splits:
        for kind, path in _paths(out_dir, _split(split)).items():
            header = 24 if kind == "dat" else 20  # magic, ndim, max(ndim, 3) dims
            if not path.is_file() or path.stat().st_size != header + _SIZES[kind]:
                return False
    return True


def _render_task(args: tuple[str, int, int, int]) -> np.ndarray:
    split, cat, pos, seed = args
    return render_instance(split, cat, pos, seed)


def _mp_context():
    # fork: workers only run NumPy code, and unlike spawn it needs no `if __name__ ==
    # "__main__"` guard in the user's script; spawn where fork does not exist.
    methods = get_all_start_methods()
    return get_context("fork" if "fork" in methods else "spawn")


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS/Windows
        n = os.cpu_count() or 1
    return max(1, n)


def object_tasks(splits: Iterable[str] = SPLITS) -> list[tuple[str, int, int]]:
    """The rendering work units, in file order: (split, category, instance position)."""
    return [(_split(s), c, p) for s in splits for c in range(N_CATEGORIES) for p in range(N_INSTANCES)]


def iter_render_objects(tasks: Sequence[tuple[str, int, int]], seed: int = 0,
                        workers: int | None = None) -> Iterator[np.ndarray]:
    """Yield :func:`render_instance` blocks uint8 (972, 2, 96, 96) for ``tasks``, in order,
    rendered by ``workers`` processes (default: the CPUs this process may use)."""
    seed = _seed(seed)
    workers = _default_workers() if workers is None else int(workers)
    if workers < 1:
        raise RobustcapsError(f"invalid number of workers {workers}: use 1 or more")
    jobs = [(s, c, p, seed) for s, c, p in tasks]
    if workers == 1 or len(jobs) <= 1 or current_process().daemon:  # daemons cannot fork workers
        yield from map(_render_task, jobs)
        return
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=_mp_context())
    try:
        yield from pool.map(_render_task, jobs)
    finally:
        pool.shutdown(cancel_futures=True)


def generate(out_dir: str | os.PathLike, seed: int = 0, splits: Iterable[str] = SPLITS,
             progress: bool = True, workers: int | None = None) -> list[Path]:
    """Render full splits and write them in the official format into ``out_dir``.

    Each file is written under a temporary name and renamed; a split's old ``dat`` file is
    removed first and its new one renamed last, so an interrupted run never leaves a
    complete-looking split. ``workers`` processes render objects in parallel (default: the
    CPUs this process may use). Returns the paths written (dat, cat, info per split).
    """
    from tqdm.auto import tqdm

    from .smallnorb import write_matrix

    seed = _seed(seed)
    splits = list(dict.fromkeys(_split(s) for s in splits))
    if not splits:
        raise RobustcapsError("no SynthNORB split requested: use 'training' and/or 'testing'")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RobustcapsError(f"cannot create SynthNORB folder {out_dir}: {exc.strerror}") from None
    need = len(splits) * sum(_SIZES.values())
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise RobustcapsError(f"not enough disk space in {out_dir} for SynthNORB: "
                              f"{need / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free")
    written: list[Path] = []
    per_split = N_CATEGORIES * N_INSTANCES
    blocks = iter_render_objects(object_tasks(splits), seed, workers)
    with tqdm(total=len(splits) * N_PAIRS * 2, desc=f"SynthNORB seed {seed}", unit="img",
              disable=not progress, smoothing=0.1) as bar:
        try:
            for split in splits:
                paths = _paths(out_dir, split)
                paths["dat"].unlink(missing_ok=True)
                dat = np.empty((N_PAIRS, 2, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
                for o in range(per_split):
                    dat[o * PAIRS_PER_INSTANCE:(o + 1) * PAIRS_PER_INSTANCE] = next(blocks)
                    bar.update(2 * PAIRS_PER_INSTANCE)
                cat, info = metadata(split)
                try:
                    write_matrix(paths["cat"], cat)
                    write_matrix(paths["info"], info)
                    write_matrix(paths["dat"], dat)
                except OSError as exc:
                    raise RobustcapsError(f"cannot write SynthNORB files to {out_dir}: "
                                          f"{exc.strerror or exc}") from None
                written += [paths["dat"], paths["cat"], paths["info"]]
                del dat
        finally:
            blocks.close()
    return written


def ensure_generated(cache_dir: str | os.PathLike | None = None, seed: int = 0,
                     splits: Iterable[str] = SPLITS, progress: bool = True,
                     workers: int | None = None) -> Path:
    """Generate the requested splits once into the cache and return the folder holding them.

    The folder is :func:`cache_dir_for` ``(cache_dir, seed)``; splits already complete there
    are not rendered again.
    """
    folder = cache_dir_for(cache_dir, seed)
    wanted = list(dict.fromkeys(_split(s) for s in splits))
    if all(is_generated(folder, [s]) for s in wanted):
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RobustcapsError(f"cannot create SynthNORB cache {folder}: {exc.strerror}") from None
    with _lock(folder / ".generate.lock"):  # a concurrent process may be generating it
        missing = [s for s in wanted if not is_generated(folder, [s])]
        if missing:
            generate(folder, seed=seed, splits=missing, progress=progress, workers=workers)
    return folder


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory file lock (POSIX); a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- contact sheet --------------------------------------------------------------------------------

def contact_sheet(path: str | os.PathLike, seed: int = 0, dpi: int = 100) -> Path:
    """Write a PNG showing every category (one training and one test instance each) across
    azimuths, elevations and lightings, plus a stereo pair. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = _seed(seed)
    cols: list[tuple[str, int, int, int, int]] = []  # (label, elev idx, az idx, light, cam)
    for a in (0, 3, 6, 9, 12, 15):
        cols.append((f"az {AZIMUTHS_DEG[a]}°", 0, a, 0, 0))
    for e in (4, 8):
        cols.append((f"elev {ELEVATIONS_DEG[e]}°", e, 3, 0, 0))
    for li in (2, 3, 5):
        cols.append((f"light {li}", 0, 3, li, 0))
    cols.append(("right cam", 0, 3, 0, 1))
    rows = [(c, s, 0) for c in range(N_CATEGORIES) for s in ("training", "testing")]
    tiles = np.zeros((len(rows), len(cols), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for r, (c, split, pos) in enumerate(rows):
        shape = make_shape(c, INSTANCES[split][pos], seed)
        for k, (_lab, e, a, li, cam) in enumerate(cols):
            tiles[r, k] = render_views(shape, ELEVATIONS_DEG[[e]], AZIMUTHS_DEG[[a]],
                                       np.array([cam]), (li,))[0, 0]
    gap = 4
    h = len(rows) * (IMAGE_SIZE + gap) - gap
    w = len(cols) * (IMAGE_SIZE + gap) - gap
    sheet = np.full((h, w), 255, dtype=np.uint8)
    for r in range(len(rows)):
        for k in range(len(cols)):
            y, x = r * (IMAGE_SIZE + gap), k * (IMAGE_SIZE + gap)
            sheet[y:y + IMAGE_SIZE, x:x + IMAGE_SIZE] = tiles[r, k]
    scale = 2.0
    fig_w, fig_h = (w * scale + 260) / dpi, (h * scale + 150) / dpi
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    ax = fig.add_axes((200 / (w * scale + 260), 20 / (h * scale + 150),
                       w * scale / (w * scale + 260), h * scale / (h * scale + 150)))
    ax.imshow(sheet, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([k * (IMAGE_SIZE + gap) + IMAGE_SIZE / 2 for k in range(len(cols))])
    ax.set_xticklabels([c[0] for c in cols], fontsize=11)
    ax.xaxis.tick_top()
    ax.set_yticks([r * (IMAGE_SIZE + gap) + IMAGE_SIZE / 2 for r in range(len(rows))])
    ax.set_yticklabels([f"{CATEGORY_NAMES[c]} {INSTANCES[s][p]}\n({'train' if s == 'training' else 'test'})"
                        for c, s, p in rows], fontsize=11)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(f"SynthNORB (seed {seed}): default view elevation {ELEVATIONS_DEG[0]}°, "
                 f"azimuth {AZIMUTHS_DEG[3]}°, lighting 0, left camera; one column varies each",
                 y=0.995, fontsize=12)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
