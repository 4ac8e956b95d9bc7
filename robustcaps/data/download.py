"""Resumable downloads and checksummed fetching of smallNORB and MNIST.

``download_file`` streams a URL to disk through ``<dest>.part`` and resumes an interrupted
transfer with an HTTP ``Range`` request (falling back to a fresh start when the server ignores
it). ``fetch`` downloads a dataset's ``.gz`` files, decompresses them, and checks each
decompressed file's size and sha256 against the reference in its :class:`RemoteFile`.
Files without a published reference (smallNORB testing-cat, the MNIST training files) get
their hash recorded in ``checksums.json`` beside the data on the first successful download,
and later verifications compare against that record.

Both the base URL(s) and the expected files are parameters, so the same code is tested
against a loopback server with small generated files.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gzip
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import DataError, RobustcapsError
from . import smallnorb

log = logging.getLogger(__name__)

SMALLNORB_URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
#: https mirrors only (the original host serves plain http): the PyTorch-maintained S3 copy
#: first, the CVDF copy second. Every file's decompressed sha256 is pinned in ``mnist``.
MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/")
CHECKSUMS_JSON = "checksums.json"
#: A file with no published sha256 is trusted on its first download, whose hash is recorded.
TOFU_MATCH = "recorded match (trusted on first use)"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: served as ``remote`` (gzip), stored decompressed as ``name``.

    ``size`` / ``sha256`` describe the DECOMPRESSED file; None means no published reference.
    ``validate(path)`` (optional) raises DataError when the file's content is malformed.
    """

    remote: str
    name: str
    size: int | None = None
    sha256: str | None = None
    validate: Callable[[Path], None] | None = field(default=None, compare=False, repr=False)


def _validate_norb(path: Path) -> None:
    header = smallnorb.read_header(path)
    kind = path.stem.rsplit("-", 1)[-1]
    if kind in smallnorb.EXPECTED_SHAPES:
        shape, dtype = smallnorb.EXPECTED_SHAPES[kind]
        if header.dtype != dtype or header.shape[1:] != shape[1:] or len(header.shape) != len(shape):
            raise DataError(
                f"{path}: expected {dtype.name} (N, {', '.join(map(str, shape[1:]))}) for a -{kind} "
                f"file, found {header.dtype.name} {header.shape}"
            )


def _validate_idx(path: Path) -> None:
    from .mnist import read_idx_header

    read_idx_header(path)


def smallnorb_files() -> list[RemoteFile]:
    """The six official smallNORB files with their official decompressed sizes and sha256."""
    files = []
    for split in smallnorb.SPLITS:
        for kind in smallnorb.KINDS:
            name = smallnorb.norb_filename(split, kind)
            files.append(RemoteFile(name + ".gz", name, smallnorb.OFFICIAL_SIZES[kind],
                                    smallnorb.OFFICIAL_SHA256[(split, kind)], _validate_norb))
    return files


def mnist_files() -> list[RemoteFile]:
    """The four MNIST idx files, each with its published decompressed sha256."""
    from .mnist import MNIST_FILES, MNIST_SHA256, MNIST_SIZES

    return [RemoteFile(name + ".gz", name, MNIST_SIZES[name], MNIST_SHA256.get(name), _validate_idx)
            for name in MNIST_FILES.values()]


DATASETS: dict[str, tuple[Callable[[], list[RemoteFile]], tuple[str, ...]]] = {
    "smallnorb": (smallnorb_files, (SMALLNORB_URL,)),
    "mnist": (mnist_files, MNIST_URLS),
}


# -- downloading --------------------------------------------------------------------------------

def _make_bar(total: int | None, initial: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
                unit_divisor=1024, disable=not progress, leave=False)


def _content_range_start(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) from 'bytes START-END/TOTAL' (total None for '*')."""
    m = re.match(r"bytes\s+(\d+)-\d+/(\d+|\*)", value or "")
    if not m:
        return None, None
    return int(m.group(1)), (None if m.group(2) == "*" else int(m.group(2)))


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    resume: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    backoff: float = 1.0,
) -> Path:
    """Download ``url`` to ``dest`` via ``dest + '.part'``, resuming where a previous try stopped.

    A partial ``.part`` file is continued with ``Range: bytes=N-``; a server that answers 200
    instead of 206 restarts the file. A dropped connection is retried ``retries`` times (each
    retry resumes). Raises :class:`DataError` on HTTP errors or when retries are exhausted; the
    ``.part`` file stays so a later call continues it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if not resume and part.exists():
        part.unlink()
    attempt = 0
    while True:
        try:
            _download_once(url, part, timeout=timeout, progress=progress, desc=dest.name)
            os.replace(part, dest)
            return dest
        except _Retryable as exc:
            attempt += 1
            have = part.stat().st_size if part.exists() else 0
            if attempt > retries:
                raise DataError(
                    f"download of {url} interrupted after {have} bytes ({exc.reason}); "
                    f"run the same command again to resume from {part.name}"
                ) from None
            log.warning("download of %s interrupted at %d bytes (%s); resuming", url, have, exc.reason)
            time.sleep(backoff * attempt)


class _Retryable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _download_once(url: str, part: Path, *, timeout: float, progress: bool, desc: str) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"robustcaps/{__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (http/https only)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # Range not satisfiable: the part file may already be complete.
            total = _total_from_416(exc.headers.get("Content-Range"))
            if total == have:
                return
            part.unlink()
            raise _Retryable("server rejected the resume range; restarting") from None
        if exc.code >= 500 or exc.code == 429:
            raise _Retryable(f"HTTP {exc.code}") from None
        raise DataError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (TimeoutError, ConnectionResetError)):
            raise _Retryable(str(reason)) from None
        raise DataError(f"cannot reach {url}: {reason}") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise _Retryable(f"{type(exc).__name__}: {exc}") from None
    with contextlib.closing(response):
        status = response.status
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if have and status == 206:
            start, total = _content_range_start(response.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise _Retryable(f"server resumed at byte {start}, expected {have}; restarting")
            mode = "ab"
            total = total if total is not None else (have + length if length is not None else None)
        else:
            if have:
                log.info("server ignored the Range request for %s; starting over", url)
            have, mode = 0, "wb"
            total = length
        received = 0
        with open(part, mode) as f, _make_bar(total, have, desc, progress) as bar:
            try:
                while block := response.read(_CHUNK):
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        if length is not None and received < length:
            raise _Retryable(f"connection closed after {received} of {length} bytes")


def _total_from_416(value: str | None) -> int | None:
    m = re.match(r"bytes\s+\*/(\d+)", value or "")
    return int(m.group(1)) if m else None


# -- checksums ----------------------------------------------------------------------------------

def sha256_file(path: Path, progress: bool = False) -> str:
    """Hex sha256 of a file, streamed (with a byte progress bar when asked)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, _make_bar(size, 0, f"sha256 {path.name}", progress and size > 50 << 20) as bar:
        while block := f.read(_CHUNK * 8):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def sha256_gunzip(path: Path) -> str:
    """Hex sha256 of a gzip file's decompressed content, streamed."""
    h = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read(_CHUNK * 8):
                h.update(block)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip stream ({exc})") from None
    return h.hexdigest()


def load_recorded(data_dir: str | os.PathLike) -> dict[str, dict]:
    """The ``checksums.json`` records in ``data_dir`` ({} when absent or unreadable)."""
    path = Path(data_dir) / CHECKSUMS_JSON
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record(data_dir: Path, name: str, size: int, digest: str, source: str) -> None:
    records = load_recorded(data_dir)
    records[name] = {
        "sha256": digest,
        "size": size,
        "source": source,
        "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "note": "no official checksum published; recorded on first successful download",
    }
    tmp = data_dir / (CHECKSUMS_JSON + ".part")
    tmp.write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, data_dir / CHECKSUMS_JSON)


def _decompress(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".part")
    try:
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, _CHUNK * 4)
    except (OSError, EOFError, zlib.error) as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{src}: not a valid gzip file ({exc}); delete it and fetch again") from None
    os.replace(tmp, dest)


@dataclass
class FetchedFile:
    name: str
    path: Path
    size: int
    sha256: str
    status: str  # "official" (matches), "recorded" (hash recorded now or matches the record), "skipped"


def fetch_files(
    files: Sequence[RemoteFile],
    dest_dir: str | os.PathLike,
    base_urls: Sequence[str],
    *,
    progress: bool = True,
    keep_compressed: bool = False,
    retries: int = 3,
    timeout: float = 60.0,
) -> list[FetchedFile]:
    """Download, decompress and verify ``files`` into ``dest_dir``.

    Files already present with the expected size and checksum are skipped. A checksum or size
    mismatch raises :class:`DataError` naming the file (the bad file is kept as
    ``<name>.bad`` for inspection and the download is removed so a rerun starts clean).
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    if not base_urls:
        raise RobustcapsError("no base URL to download from")
    done: list[FetchedFile] = []
    for rf in files:
        target = dest_dir / rf.name
        recorded = load_recorded(dest_dir).get(rf.name, {}).get("sha256")
        reference = rf.sha256 or recorded
        if target.is_file() and (rf.size is None or target.stat().st_size == rf.size) and reference:
            digest = sha256_file(target, progress)
            if digest == reference:
                done.append(FetchedFile(rf.name, target, target.stat().st_size, digest, "skipped"))
                continue
        gz = dest_dir / rf.remote
        if not gz.is_file():
            _download_any(rf.remote, gz, base_urls, progress=progress, retries=retries, timeout=timeout)
        _decompress(gz, target)
        size = target.stat().st_size
        digest = sha256_file(target, progress)
        problem = None
        if rf.size is not None and size != rf.size:
            problem = f"size {size} bytes, expected {rf.size}"
        elif reference is not None and digest != reference:
            problem = f"sha256 {digest}, expected {reference}"
        elif rf.validate is not None:
            try:
                rf.validate(target)
            except DataError as exc:
                problem = f"invalid content ({exc})"
        if problem:
            bad = target.with_name(target.name + ".bad")
            os.replace(target, bad)
            gz.unlink(missing_ok=True)
            raise DataError(
                f"{rf.name}: checksum verification failed: {problem}; the file was moved to "
                f"{bad.name} and the download deleted (fetch again, or check the source)"
            )
        status = "official"
        if rf.sha256 is None:
            status = "recorded"
            if recorded is None:
                _record(dest_dir, rf.name, size, digest, base_urls[0] + rf.remote)
        if not keep_compressed:
            gz.unlink(missing_ok=True)
        done.append(FetchedFile(rf.name, target, size, digest, status))
    return done


def _download_any(remote: str, dest: Path, base_urls: Sequence[str], **kw) -> Path:
    errors = []
    for i, base in enumerate(base_urls):
        url = base if base.endswith(remote) else base.rstrip("/") + "/" + remote
        try:
            return download_file(url, dest, **kw)
        except DataError as exc:
            errors.append(str(exc))
            if i + 1 < len(base_urls):
                log.warning("%s; trying the next source", exc)
    raise DataError(" / ".join(errors))


def split_of(name: str) -> str:
    """"train" or "test" for a smallNORB or MNIST file name."""
    return "test" if ("-testing-" in name or name.startswith("t10k")) else "train"


def fetch(
    dataset: str,
    dest_dir: str | os.PathLike,
    *,
    base_url: str | Sequence[str] | None = None,
    files: Sequence[RemoteFile] | None = None,
    progress: bool = True,
    keep_compressed: bool = False,
    retries: int = 3,
    timeout: float = 60.0,
    split: str | None = None,
) -> list[FetchedFile]:
    """Fetch ``dataset`` ("smallnorb" or "mnist") into ``dest_dir`` and verify it.

    ``base_url`` replaces the default source(s) (a list is tried in order); ``files`` replaces
    the list of expected files and their reference sizes/hashes (for mirrors and tests).
    ``split`` ("train" or "test") fetches only that split's files.
    """
    if dataset not in DATASETS:
        raise RobustcapsError(f"unknown dataset {dataset!r} to fetch: use {' or '.join(DATASETS)}")
    default_files, default_urls = DATASETS[dataset]
    urls: tuple[str, ...]
    if base_url is None:
        urls = default_urls
    elif isinstance(base_url, str):
        urls = (base_url,)
    else:
        urls = tuple(base_url)
    chosen = list(files if files is not None else default_files())
    if split is not None:
        chosen = [f for f in chosen if split_of(f.name) == split]
        if not chosen:
            raise RobustcapsError(f"no {dataset} files for split {split!r}: use train or test")
    return fetch_files(chosen, dest_dir, urls,
                       progress=progress, keep_compressed=keep_compressed, retries=retries,
                       timeout=timeout)


# -- verification -------------------------------------------------------------------------------

@dataclass
class FileReport:
    """What ``verify`` found for one expected file."""

    name: str
    present: bool
    size: int | None = None
    size_ok: bool | None = None
    format_ok: bool | None = None
    format_error: str | None = None
    sha256: str | None = None
    checksum: str = "not checked"  # "official match", "MISMATCH", TOFU_MATCH, "no reference"

    @property
    def ok(self) -> bool:
        return bool(self.present and self.size_ok is not False and self.format_ok
                    and self.checksum not in ("MISMATCH",))


def verify(
    data_dir: str | os.PathLike,
    dataset: str = "smallnorb",
    *,
    files: Sequence[RemoteFile] | None = None,
    checksums: bool = True,
    progress: bool = True,
) -> list[FileReport]:
    """Check each expected file of ``dataset`` in ``data_dir``: present, size, format, sha256.

    Never raises for bad files: problems are reported per file (``FileReport.format_error``).
    """
    if dataset not in DATASETS:
        raise RobustcapsError(f"unknown dataset {dataset!r} to verify: use {' or '.join(DATASETS)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such directory")
    recorded = load_recorded(data_dir)
    reports = []
    for rf in files if files is not None else DATASETS[dataset][0]():
        path = data_dir / rf.name
        compressed = False
        if not path.is_file() and (data_dir / (rf.name + ".gz")).is_file():
            # Still compressed (the readers accept .gz): check the decompressed content.
            path, compressed = data_dir / (rf.name + ".gz"), True
        if not path.is_file():
            reports.append(FileReport(rf.name, present=False))
            continue
        rep = FileReport(path.name, present=True, size=path.stat().st_size)
        rep.size_ok = None if rf.size is None or compressed else rep.size == rf.size
        try:
            if rf.validate is not None:
                rf.validate(path)
            rep.format_ok = True
        except DataError as exc:
            rep.format_ok, rep.format_error = False, str(exc)
        if checksums:
            try:
                rep.sha256 = sha256_gunzip(path) if compressed else sha256_file(path, progress)
            except DataError as exc:
                rep.format_ok, rep.format_error = False, str(exc)
                rep.checksum = "MISMATCH"
                reports.append(rep)
                continue
            if rf.sha256 is not None:
                rep.checksum = "official match" if rep.sha256 == rf.sha256 else "MISMATCH"
            elif rf.name in recorded:
                rep.checksum = (TOFU_MATCH if rep.sha256 == recorded[rf.name].get("sha256")
                                else "MISMATCH")
            else:
                rep.checksum = "no reference"
        reports.append(rep)
    return reports
