"""MNIST in its idx format (raw or gzip) and the MNIST splits.

idx format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64), the number of dims, then big-endian int32 dims and the data
(big-endian, row-major).

Splits: "train" (60,000) and "test" (10,000) from the standard files. When only the test
files are available (e.g. ``../shared/data/mnist-t10k``), "t10k-train" is the FIRST 8,000
images of t10k and "t10k-test" the LAST 2,000, so a model can be trained and evaluated on
disjoint real images.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, RobustcapsError

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_BY_KIND = {(dt.kind, dt.itemsize): code for code, dt in IDX_DTYPES.items()}

MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
#: Decompressed sizes.
MNIST_SIZES = {
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}
#: sha256 of the four decompressed idx files, as published with several independent copies
#: of MNIST (the t10k pair matches the test split shipped beside this project).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
SPLITS = ("train", "test", "t10k-train", "t10k-test")
T10K_TRAIN = 8000  # "t10k-train" = t10k[:8000], "t10k-test" = t10k[8000:]
CLASS_NAMES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class IdxHeader:
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _parse_header(f, path: Path) -> IdxHeader:
    head = f.read(4)
    if len(head) < 4:
        raise DataError(f"{path}: truncated idx header ({len(head)} of 4 bytes)")
    if head[:2] != b"\x00\x00" or head[2] not in IDX_DTYPES:
        raise DataError(f"{path}: not an idx file: bad magic bytes {head.hex()}")
    ndim = head[3]
    if ndim == 0:
        raise DataError(f"{path}: corrupt idx header: 0 dimensions")
    dims_raw = f.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DataError(f"{path}: truncated idx header (dimensions)")
    dims = struct.unpack(f">{ndim}i", dims_raw)
    if any(d < 0 for d in dims):
        raise DataError(f"{path}: corrupt idx header: negative dimension in {list(dims)}")
    return IdxHeader(IDX_DTYPES[head[2]], tuple(dims), 4 + 4 * ndim)


def read_idx_header(path: str | os.PathLike) -> IdxHeader:
    """Parse and check an idx file's header (and, for raw files, its exact size)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with _open(path) as f:
            header = _parse_header(f, path)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip stream ({exc})") from None
    if not _is_gz(path):
        size = path.stat().st_size
        if size != header.offset + header.nbytes:
            state = "truncated" if size < header.offset + header.nbytes else "has trailing bytes"
            raise DataError(f"{path}: {state}: header says {header.shape}, file has {size} bytes")
    return header


def _is_gz(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (raw or gzip) into a native-byte-order array of its stored shape."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with _open(path) as f:
            header = _parse_header(f, path)
            raw = f.read(header.nbytes + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip stream ({exc})") from None
    if len(raw) != header.nbytes:
        state = "truncated" if len(raw) < header.nbytes else "has trailing bytes"
        raise DataError(f"{path}: {state}: header says {header.dtype.name} {header.shape} "
                        f"({header.nbytes} data bytes)")
    arr = np.frombuffer(raw, dtype=header.dtype).reshape(header.shape)
    return arr.astype(header.dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as an idx file; gzip when ``compress`` (default: name ends in .gz)."""
    path = Path(path)
    array = np.asarray(array)
    key = (array.dtype.kind, array.dtype.itemsize)
    if key not in _CODE_BY_KIND or array.ndim == 0 or array.ndim > 255:
        raise RobustcapsError(f"cannot store dtype {array.dtype} with shape {array.shape} as idx")
    code = _CODE_BY_KIND[key]
    data = array.astype(IDX_DTYPES[code]).tobytes()
    blob = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + data
    if compress if compress is not None else path.suffix == ".gz":
        blob = gzip.compress(blob)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)


def find_file(data_dir: str | os.PathLike, name: str) -> Path | None:
    """``name`` or ``name.gz`` in ``data_dir`` (raw preferred), else None."""
    for candidate in (Path(data_dir) / name, Path(data_dir) / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def load_mnist(data_dir: str | os.PathLike, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of an MNIST split (see module doc)."""
    if split not in SPLITS:
        raise RobustcapsError(f"unknown MNIST split {split!r}: use one of {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: MNIST directory not found")
    base = "train" if split == "train" else "test"
    paths = {}
    for kind in ("images", "labels"):
        name = MNIST_FILES[(base, kind)]
        found = find_file(data_dir, name)
        if found is None:
            hint = ""
            if split == "train" and find_file(data_dir, MNIST_FILES[("test", kind)]):
                hint = " (only the t10k files are here: use split 't10k-train' / 't10k-test')"
            raise DataError(f"{data_dir}: MNIST file {name}[.gz] not found{hint}")
        paths[kind] = found
    images = read_idx(paths["images"])
    labels = read_idx(paths["labels"])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{paths['images']}: expected uint8 (N, H, W) images, found {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise DataError(f"{paths['labels']}: expected ({images.shape[0]},) labels, found {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{paths['labels']}: labels outside 0..9")
    labels = labels.astype(np.int64)
    if split == "t10k-train":
        images, labels = images[:T10K_TRAIN], labels[:T10K_TRAIN]
    elif split == "t10k-test":
        images, labels = images[T10K_TRAIN:], labels[T10K_TRAIN:]
    return images, labels
