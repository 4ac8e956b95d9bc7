"""The smallNORB binary matrix format, the official file set, and a split reader.

Format (LeCun et al., "NORB" dataset page): a header of little-endian int32 words

    magic, ndim, dim_0, ..., dim_{max(ndim, 3) - 1}

(at least three dims are stored even for 1-D or 2-D data; unused ones are 1), followed by the
data in row-major order. The magic number encodes the element type:

    0x1E3D4C55 uint8, 0x1E3D4C56 int16, 0x1E3D4C54 int32, 0x1E3D4C51 float32, 0x1E3D4C53 float64

A split is three files: ``-dat`` uint8 (24300, 2, 96, 96) stereo image pairs, ``-cat`` int32
(24300,) class labels in 0..4 and ``-info`` int32 (24300, 4) per-pair metadata columns
instance, elevation (0-8), azimuth (0, 2, ..., 34; index a means a*10 degrees), lighting (0-5).
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, RobustcapsError

# -- format -------------------------------------------------------------------------------------

MAGIC_TO_DTYPE: dict[int, np.dtype] = {
    0x1E3D4C55: np.dtype("u1"),
    0x1E3D4C56: np.dtype("<i2"),
    0x1E3D4C54: np.dtype("<i4"),
    0x1E3D4C51: np.dtype("<f4"),
    0x1E3D4C53: np.dtype("<f8"),
}
DTYPE_TO_MAGIC: dict[str, int] = {dt.str.lstrip("<|>="): m for m, dt in MAGIC_TO_DTYPE.items()}
_MAX_NDIM = 32  # far beyond any real file; rejects garbage headers before allocating anything

SUPPORTED_DTYPES = ("uint8", "int16", "int32", "float32", "float64")


def _dtype_key(dtype: np.dtype) -> str:
    return np.dtype(dtype).newbyteorder("<").str.lstrip("<|>=")


def magic_for_dtype(dtype: np.dtype | str) -> int:
    """The matrix-format magic number for a numpy dtype (any byte order)."""
    key = _dtype_key(np.dtype(dtype))
    if key not in DTYPE_TO_MAGIC:
        raise RobustcapsError(
            f"dtype {np.dtype(dtype)} cannot be stored in the smallNORB matrix format; "
            f"supported: {', '.join(SUPPORTED_DTYPES)}"
        )
    return DTYPE_TO_MAGIC[key]


def encode_header(dtype: np.dtype | str, shape: tuple[int, ...]) -> bytes:
    """The header bytes for an array of ``dtype`` and ``shape`` (dims padded with 1 to >= 3)."""
    shape = tuple(int(d) for d in shape)
    if any(d < 0 or d > 0x7FFFFFFF for d in shape):
        raise RobustcapsError(f"shape {shape} has a dimension outside 0..2^31-1")
    if len(shape) > _MAX_NDIM:
        raise RobustcapsError(f"shape {shape} has more than {_MAX_NDIM} dimensions")
    dims = list(shape) + [1] * max(0, 3 - len(shape))
    return struct.pack(f"<ii{len(dims)}i", magic_for_dtype(dtype), len(shape), *dims)


@dataclass(frozen=True)
class MatrixHeader:
    """A parsed header: element type, logical shape and where the data starts."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def file_size(self) -> int:
        return self.offset + self.nbytes


def _read_exact(f, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise DataError(f"{path}: truncated header ({what}): file ends after {len(data)} of {n} bytes")
    return data


def parse_header(f, path: Path) -> MatrixHeader:
    """Parse the header from an open binary file object positioned at 0."""
    magic, ndim = struct.unpack("<ii", _read_exact(f, 8, path, "magic and ndim"))
    magic &= 0xFFFFFFFF
    if magic not in MAGIC_TO_DTYPE:
        hint = ""
        if magic == 0x1F8B or (magic & 0xFFFF) == 0x8B1F:
            hint = " (it looks gzip-compressed; decompress it or name it *.gz)"
        raise DataError(
            f"{path}: not a smallNORB matrix file: bad magic number 0x{magic:08X}{hint}"
        )
    if not 0 <= ndim <= _MAX_NDIM:
        raise DataError(f"{path}: corrupt header: ndim = {ndim} (expected 0..{_MAX_NDIM})")
    n_stored = max(ndim, 3)
    dims = struct.unpack(f"<{n_stored}i", _read_exact(f, 4 * n_stored, path, "dimensions"))
    if any(d < 0 for d in dims):
        raise DataError(f"{path}: corrupt header: negative dimension in {list(dims)}")
    if any(d != 1 for d in dims[ndim:]):
        raise DataError(
            f"{path}: corrupt header: unused dimensions {list(dims[ndim:])} should all be 1"
        )
    return MatrixHeader(MAGIC_TO_DTYPE[magic], tuple(dims[:ndim]), 8 + 4 * n_stored)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def read_header(path: str | os.PathLike) -> MatrixHeader:
    """Read and validate only the header of a matrix file (raw or gzip).

    Also checks that a raw file's size matches the header exactly.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if _is_gzip(path):
        try:
            with gzip.open(path, "rb") as f:
                return parse_header(f, path)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip stream ({exc})") from None
    with open(path, "rb") as f:
        header = parse_header(f, path)
    size = path.stat().st_size
    if size != header.file_size:
        state = "truncated" if size < header.file_size else "has trailing bytes"
        raise DataError(
            f"{path}: {state}: header says {header.dtype.name} {header.shape} "
            f"({header.file_size} bytes), file has {size} bytes"
        )
    return header


def read_matrix(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Read a matrix file into an array of the stored dtype and logical shape.

    ``mmap=True`` returns a read-only ``np.memmap`` (no data read until used) for raw files;
    gzip files (detected by content) are always decompressed into memory.
    Raises :class:`DataError` naming the file for a bad magic, corrupt header or wrong size.
    """
    path = Path(path)
    header = read_header(path)
    count = int(np.prod(header.shape, dtype=np.int64))
    if _is_gzip(path):
        try:
            with gzip.open(path, "rb") as f:
                f.seek(header.offset)
                raw = f.read(header.nbytes + 1)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip stream ({exc})") from None
        if len(raw) != header.nbytes:
            state = "truncated" if len(raw) < header.nbytes else "has trailing bytes"
            raise DataError(
                f"{path}: {state}: header says {header.nbytes} data bytes, "
                f"decompressed data has {len(raw) if len(raw) <= header.nbytes else 'more'}"
            )
        return np.frombuffer(raw, dtype=header.dtype, count=count).reshape(header.shape).copy()
    if mmap and count > 0:
        return np.memmap(path, dtype=header.dtype, mode="r", offset=header.offset, shape=header.shape)
    with open(path, "rb") as f:
        f.seek(header.offset)
        arr = np.fromfile(f, dtype=header.dtype, count=count)
    return arr.reshape(header.shape)


def write_matrix(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` in the matrix format (atomically: a temp file renamed into place).

    The dtype must be one of uint8, int16, int32, float32, float64 (stored little-endian).
    """
    path = Path(path)
    array = np.asarray(array)
    magic_for_dtype(array.dtype)  # validates before touching the disk
    header = encode_header(array.dtype, array.shape)
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    tmp = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(header)
        # Chunked so a 448 MB array does not need a second full-size bytes copy.
        flat = data.reshape(-1)
        step = max(1, (64 << 20) // max(1, data.itemsize))
        for start in range(0, flat.size, step):
            f.write(flat[start:start + step].tobytes())
    os.replace(tmp, path)


def create_matrix(path: str | os.PathLike, dtype: np.dtype | str, shape: tuple[int, ...]) -> np.memmap:
    """Create a matrix file of ``shape`` and return a writable memmap over its data.

    For writers that fill a large file in chunks (e.g. 24,300 rendered pairs) without holding
    it all in memory. Call ``.flush()`` (or drop the reference) when done.
    """
    path = Path(path)
    dtype = np.dtype(dtype).newbyteorder("<")
    header = encode_header(dtype, shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + nbytes)
    return np.memmap(path, dtype=dtype, mode="r+", offset=len(header), shape=tuple(shape))


# -- the official file set ----------------------------------------------------------------------

SPLITS = ("training", "testing")
KINDS = ("dat", "cat", "info")
N_PAIRS = 24300
CLASS_NAMES = ["animal", "human", "airplane", "truck", "car"]
INFO_COLUMNS = ("instance", "elevation", "azimuth", "lighting")
IMAGE_SHAPE = (2, 96, 96)

_PREFIX = {
    "training": "smallnorb-5x46789x9x18x6x2x96x96-training",
    "testing": "smallnorb-5x01235x9x18x6x2x96x96-testing",
}

#: Decompressed sizes of the official files (identical for both splits).
OFFICIAL_SIZES: dict[str, int] = {"dat": 447_897_624, "cat": 97_220, "info": 388_820}

#: sha256 of the decompressed official files. testing-cat is unknown until a first successful
#: download records it (see :mod:`robustcaps.data.download`).
OFFICIAL_SHA256: dict[tuple[str, str], str | None] = {
    ("training", "dat"): "4813bf104d229583fea8ed57fdc3e9258c927b8dfb43d75412e854a7a9588067",
    ("testing", "dat"): "2b1de646c57ffdc259b8fb973a6453e90915248a8fdb4d9df948786bdae72b34",
    ("training", "cat"): "591ed90c090cb6724593e8de28180bd602095ee8ec82bd1a5ca30b488cd1d06e",
    ("testing", "cat"): None,
    ("training", "info"): "6b4075d3800ba0c6fa8c46a02f672572abe7b93f7ed82fb7668354a99ef03306",
    ("testing", "info"): "318f817236b7c97af03cd90e07a9cbb4346e20ef83a1118a61eeb50e3b96db7e",
}

EXPECTED_SHAPES: dict[str, tuple[tuple[int, ...], np.dtype]] = {
    "dat": ((N_PAIRS, *IMAGE_SHAPE), np.dtype("u1")),
    "cat": ((N_PAIRS,), np.dtype("<i4")),
    "info": ((N_PAIRS, 4), np.dtype("<i4")),
}


def _check_split(split: str) -> str:
    aliases = {"train": "training", "test": "testing"}
    split = aliases.get(split, split)
    if split not in SPLITS:
        raise RobustcapsError(f"unknown smallNORB split {split!r}: use 'training' or 'testing'")
    return split


def norb_filename(split: str, kind: str) -> str:
    """Official file name, e.g. ``smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat``.

    ``split`` is "training" or "testing" ("train"/"test" accepted); ``kind`` is dat, cat or info.
    """
    split = _check_split(split)
    if kind not in KINDS:
        raise RobustcapsError(f"unknown smallNORB file kind {kind!r}: use dat, cat or info")
    return f"{_PREFIX[split]}-{kind}.mat"


def split_paths(data_dir: str | os.PathLike, split: str) -> dict[str, Path]:
    """``{"dat": path, "cat": path, "info": path}`` for a split in ``data_dir``."""
    return {k: Path(data_dir) / norb_filename(split, k) for k in KINDS}


def has_split(data_dir: str | os.PathLike, split: str) -> bool:
    """True when all three files of ``split`` exist (not validated) in ``data_dir``."""
    return all(p.is_file() for p in split_paths(data_dir, split).values())


class NorbSplit:
    """One smallNORB-format split on disk, memory-mapped.

    ``images``: uint8 (N, 2, 96, 96) memmap; ``labels``: int32 (N,); ``info``: int32 (N, 4).
    """

    def __init__(self, data_dir: str | os.PathLike, split: str) -> None:
        self.data_dir = Path(data_dir)
        self.split = _check_split(split)
        paths = split_paths(self.data_dir, self.split)
        missing = [p.name for p in paths.values() if not p.is_file()]
        if missing:
            raise DataError(
                f"{self.data_dir}: smallNORB {self.split} files missing: {', '.join(missing)} "
                "(run 'robustcaps data fetch smallnorb --dir DIR')"
            )
        self.images = read_matrix(paths["dat"], mmap=True)
        self._dat_path = paths["dat"]
        self._dat_offset = read_header(paths["dat"]).offset
        self.labels = np.asarray(read_matrix(paths["cat"], mmap=False))
        self.info = np.asarray(read_matrix(paths["info"], mmap=False))
        self._check(paths)

    def _check(self, paths: dict[str, Path]) -> None:
        n = self.images.shape[0] if self.images.ndim else -1
        if self.images.ndim != 4 or self.images.shape[1:] != IMAGE_SHAPE or self.images.dtype != np.uint8:
            raise DataError(
                f"{paths['dat']}: expected uint8 (N, 2, 96, 96) image pairs, "
                f"found {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (n,) or self.labels.dtype.kind != "i":
            raise DataError(
                f"{paths['cat']}: expected int32 ({n},) labels, found {self.labels.dtype} {self.labels.shape}"
            )
        if self.info.shape != (n, 4) or self.info.dtype.kind != "i":
            raise DataError(
                f"{paths['info']}: expected int32 ({n}, 4) metadata, found {self.info.dtype} {self.info.shape}"
            )
        if n and (self.labels.min() < 0 or self.labels.max() > 4):
            raise DataError(f"{paths['cat']}: labels outside 0..4 (found {self.labels.min()}..{self.labels.max()})")
        limits = {"instance": (0, 9), "elevation": (0, 8), "azimuth": (0, 34), "lighting": (0, 5)}
        for col, (name, (lo, hi)) in enumerate(limits.items()):
            if n and (self.info[:, col].min() < lo or self.info[:, col].max() > hi):
                raise DataError(f"{paths['info']}: {name} outside {lo}..{hi}")
        if n and np.any(self.info[:, 2] % 2):
            raise DataError(f"{paths['info']}: odd azimuth values (expected 0, 2, ..., 34)")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def meta(self) -> dict[str, np.ndarray]:
        """Per-pair metadata columns as int64 arrays (instance, elevation, azimuth, lighting)."""
        return {name: self.info[:, i].astype(np.int64) for i, name in enumerate(INFO_COLUMNS)}

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (len(rows), 2, 96, 96) image pairs of ``rows`` (in the given order).

        Plain file reads, one per run of consecutive rows: unlike indexing the memmap, this
        does not leave the whole file mapped into the process's resident memory.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise RobustcapsError(f"row index out of range [0, {len(self)})")
        out = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        row_bytes = int(np.prod(self.images.shape[1:]))
        if rows.size == 0:
            return out
        flat = out.reshape(len(rows), row_bytes)
        starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)
        ends = np.append(starts[1:], len(rows))
        with open(self._dat_path, "rb") as f:
            for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
                f.seek(self._dat_offset + int(rows[a]) * row_bytes)
                got = f.readinto(memoryview(flat[a:b]).cast("B"))
                if got != (b - a) * row_bytes:
                    raise DataError(f"{self._dat_path}: file shrank while reading")
        return out

    def iter_chunks(self, indices: np.ndarray | None = None, chunk: int = 1024) -> Iterator[np.ndarray]:
        """Yield uint8 (<=chunk, 2, 96, 96) arrays of the selected rows, in order."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        for start in range(0, len(idx), chunk):
            yield self.read_rows(idx[start:start + chunk])
