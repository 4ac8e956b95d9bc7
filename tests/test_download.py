"""The resumable downloader and fetch/verify, against a loopback HTTP server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from robustcaps.data import download, smallnorb
from robustcaps.data.mnist import read_idx, write_idx
from robustcaps.errors import DataError


class _Server:
    """Serves ``files`` (path -> bytes) with Range support; can drop a transfer midway."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.drop_after: dict[str, int] = {}  # path -> bytes to send before closing (once)
        self.ignore_range = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):  # noqa: N802 (http.server API)
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                cut = server.drop_after.pop(self.path, None)
                if cut is not None:
                    self.wfile.write(payload[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        # A bound on the server's life even if a test forgets to stop it.
        self.watchdog = threading.Timer(60.0, self.httpd.shutdown)
        self.watchdog.daemon = True

    def url(self, prefix: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{prefix}"

    def __enter__(self) -> _Server:
        self.thread.start()
        self.watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self.watchdog.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    with _Server() as s:
        yield s


def _blob(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_plain_download(server, tmp_path):
    data = _blob(300_000)
    server.files["/a.bin"] = data
    out = download.download_file(server.url("/a.bin"), tmp_path / "a.bin", progress=False)
    assert out.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()
    assert server.requests == [("/a.bin", None)]


def test_interrupted_then_resumed(server, tmp_path):
    data = _blob(2_500_000, seed=1)
    server.files["/big.bin"] = data
    server.drop_after["/big.bin"] = 1_000_000
    with pytest.raises(DataError, match="interrupted after 1000000 bytes.*resume"):
        download.download_file(server.url("/big.bin"), tmp_path / "big.bin", retries=0, progress=False)
    part = tmp_path / "big.bin.part"
    assert part.stat().st_size == 1_000_000
    assert not (tmp_path / "big.bin").exists()
    # The second call continues from byte 1,000,000 with a Range request.
    download.download_file(server.url("/big.bin"), tmp_path / "big.bin", retries=0, progress=False)
    assert (tmp_path / "big.bin").read_bytes() == data
    assert server.requests[-1] == ("/big.bin", "bytes=1000000-")


def test_retry_resumes_within_one_call(server, tmp_path):
    data = _blob(700_000, seed=2)
    server.files["/r.bin"] = data
    server.drop_after["/r.bin"] = 123_457
    download.download_file(server.url("/r.bin"), tmp_path / "r.bin", retries=2, backoff=0.0,
                           progress=False)
    assert (tmp_path / "r.bin").read_bytes() == data
    assert [r[1] for r in server.requests] == [None, "bytes=123457-"]


def test_server_ignoring_range_restarts(server, tmp_path):
    data = _blob(50_000, seed=3)
    server.files["/x.bin"] = data
    server.ignore_range = True
    (tmp_path / "x.bin.part").write_bytes(b"garbage prefix that must not survive")
    download.download_file(server.url("/x.bin"), tmp_path / "x.bin", progress=False)
    assert (tmp_path / "x.bin").read_bytes() == data


def test_complete_part_file_and_416(server, tmp_path):
    data = _blob(10_000, seed=4)
    server.files["/c.bin"] = data
    (tmp_path / "c.bin.part").write_bytes(data)  # finished but never renamed
    download.download_file(server.url("/c.bin"), tmp_path / "c.bin", progress=False)
    assert (tmp_path / "c.bin").read_bytes() == data


def test_http_404_and_unreachable(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        download.download_file(server.url("/missing.bin"), tmp_path / "m.bin", progress=False)
    with pytest.raises(DataError, match="cannot reach"):
        download.download_file("http://127.0.0.1:9/x.bin", tmp_path / "m.bin", progress=False,
                               timeout=2)


# -- fetch smallNORB-format files (small generated stand-ins for the official six) -------------

def _norb_files(n: int = 6) -> dict[str, bytes]:
    """Small valid smallNORB-format files (n pairs per split), uncompressed bytes by name."""
    rng = np.random.default_rng(5)
    out = {}
    for split in smallnorb.SPLITS:
        arrays = {
            "dat": rng.integers(0, 256, (n, 2, 96, 96), dtype=np.uint8),
            "cat": rng.integers(0, 5, n).astype(np.int32),
            "info": np.stack([rng.integers(0, 10, n), rng.integers(0, 9, n),
                              2 * rng.integers(0, 18, n), rng.integers(0, 6, n)], 1).astype(np.int32),
        }
        for kind, arr in arrays.items():
            header = smallnorb.encode_header(arr.dtype, arr.shape)
            out[smallnorb.norb_filename(split, kind)] = header + arr.tobytes()
    return out


def _manifest(raw: dict[str, bytes], unknown: tuple[str, ...] = ()) -> list[download.RemoteFile]:
    files = []
    for rf in download.smallnorb_files():
        body = raw[rf.name]
        sha = None if rf.name in unknown else hashlib.sha256(body).hexdigest()
        files.append(dataclasses.replace(rf, size=len(body), sha256=sha))
    return files


def test_fetch_smallnorb_records_missing_hash_and_verifies(server, tmp_path):
    raw = _norb_files()
    for name, body in raw.items():
        server.files["/norb/" + name + ".gz"] = gzip.compress(body)
    testing_cat = smallnorb.norb_filename("testing", "cat")
    files = _manifest(raw, unknown=(testing_cat,))
    server.drop_after["/norb/" + smallnorb.norb_filename("training", "dat") + ".gz"] = 2000

    got = download.fetch("smallnorb", tmp_path, base_url=server.url("/norb/"), files=files,
                         progress=False, retries=1)
    assert [g.name for g in got] == [rf.name for rf in files]
    for name, body in raw.items():
        assert (tmp_path / name).read_bytes() == body
        assert not (tmp_path / (name + ".gz")).exists()
    status = {g.name: g.status for g in got}
    assert status[testing_cat] == "recorded"
    assert sum(s == "official" for s in status.values()) == 5
    record = json.loads((tmp_path / download.CHECKSUMS_JSON).read_text())
    assert record[testing_cat]["sha256"] == hashlib.sha256(raw[testing_cat]).hexdigest()
    assert record[testing_cat]["size"] == len(raw[testing_cat])

    # The reader sees the fetched files.
    split = smallnorb.NorbSplit(tmp_path, "testing")
    assert split.images.shape == (6, 2, 96, 96)

    # A second fetch downloads nothing.
    n_requests = len(server.requests)
    again = download.fetch("smallnorb", tmp_path, base_url=server.url("/norb/"), files=files,
                           progress=False)
    assert {g.status for g in again} == {"skipped"}
    assert len(server.requests) == n_requests

    reports = {r.name: r for r in download.verify(tmp_path, files=files, progress=False)}
    assert reports[testing_cat].checksum == download.TOFU_MATCH
    assert all(r.ok for r in reports.values())
    assert sum(r.checksum == "official match" for r in reports.values()) == 5


def test_fetch_checksum_mismatch(server, tmp_path):
    raw = _norb_files()
    for name, body in raw.items():
        server.files["/norb/" + name + ".gz"] = gzip.compress(body)
    files = _manifest(raw)
    bad_name = smallnorb.norb_filename("training", "info")
    files = [dataclasses.replace(f, sha256="0" * 64) if f.name == bad_name else f for f in files]
    with pytest.raises(DataError, match=f"{bad_name}: checksum verification failed: sha256"):
        download.fetch("smallnorb", tmp_path, base_url=server.url("/norb/"), files=files,
                       progress=False)
    assert (tmp_path / (bad_name + ".bad")).is_file()
    assert not (tmp_path / bad_name).exists()
    assert not (tmp_path / (bad_name + ".gz")).exists()


def test_fetch_rejects_non_gzip_payload(server, tmp_path):
    raw = _norb_files()
    files = _manifest(raw)[:1]
    server.files["/norb/" + files[0].remote] = b"<html>not found</html>"
    with pytest.raises(DataError, match="not a valid gzip file"):
        download.fetch("smallnorb", tmp_path, base_url=server.url("/norb/"), files=files,
                       progress=False)


def test_verify_reports_bad_files(tmp_path):
    raw = _norb_files()
    files = _manifest(raw)
    for name, body in raw.items():
        (tmp_path / name).write_bytes(body)
    dat = smallnorb.norb_filename("training", "dat")
    cat = smallnorb.norb_filename("training", "cat")
    info = smallnorb.norb_filename("testing", "info")
    (tmp_path / dat).write_bytes(raw[dat][:-100])  # truncated
    (tmp_path / cat).write_bytes(b"\x00\x01\x02\x03" + raw[cat][4:])  # wrong magic
    (tmp_path / info).unlink()
    reports = {r.name: r for r in download.verify(tmp_path, files=files, progress=False)}
    assert not reports[dat].ok and "truncated" in reports[dat].format_error
    assert reports[dat].size_ok is False and reports[dat].checksum == "MISMATCH"
    assert "bad magic number 0x03020100" in reports[cat].format_error
    assert reports[info].present is False and not reports[info].ok
    assert reports[smallnorb.norb_filename("testing", "dat")].ok


def test_official_manifest_matches_issue():
    files = {rf.name: rf for rf in download.smallnorb_files()}
    assert len(files) == 6
    dat = files["smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat"]
    assert dat.size == 447_897_624 and dat.remote == dat.name + ".gz"
    assert dat.sha256 == "4813bf104d229583fea8ed57fdc3e9258c927b8dfb43d75412e854a7a9588067"
    assert files["smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat"].sha256 is None
    assert files["smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat"].size == 97_220
    # The sizes are what the header of full-size splits implies.
    for kind, (shape, dtype) in smallnorb.EXPECTED_SHAPES.items():
        assert len(smallnorb.encode_header(dtype, shape)) + int(np.prod(shape)) * dtype.itemsize \
            == smallnorb.OFFICIAL_SIZES[kind]


def test_fetch_mnist_generated(server, tmp_path):
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 20).astype(np.uint8)
    src = tmp_path / "src"
    write_idx(src / "t10k-images-idx3-ubyte", images)
    write_idx(src / "t10k-labels-idx1-ubyte", labels)
    files = []
    for rf in download.mnist_files():
        if rf.name.startswith("t10k"):
            body = (src / rf.name).read_bytes()
            server.files["/mnist/" + rf.remote] = gzip.compress(body)
            files.append(dataclasses.replace(rf, size=len(body),
                                             sha256=hashlib.sha256(body).hexdigest()))
    out = tmp_path / "out"
    download.fetch("mnist", out, base_url=server.url("/mnist/"), files=files, progress=False)
    np.testing.assert_array_equal(read_idx(out / "t10k-images-idx3-ubyte"), images)
    np.testing.assert_array_equal(read_idx(out / "t10k-labels-idx1-ubyte"), labels)


def test_fetch_unknown_dataset(tmp_path):
    with pytest.raises(Exception, match="unknown dataset 'cifar'"):
        download.fetch("cifar", tmp_path)


def test_mnist_base_urls_try_next(server, tmp_path):
    server.files["/good/f.gz"] = gzip.compress(b"hello")
    rf = download.RemoteFile("f.gz", "f", 5, hashlib.sha256(b"hello").hexdigest())
    got = download.fetch_files([rf], tmp_path, [server.url("/bad/"), server.url("/good/")],
                               progress=False)
    assert Path(got[0].path).read_bytes() == b"hello"


def test_default_sources_are_https_and_pinned():
    assert all(url.startswith("https://") for url in (*download.MNIST_URLS, download.SMALLNORB_URL))
    assert all(rf.sha256 is not None and len(rf.sha256) == 64 for rf in download.mnist_files())
    # smallNORB's testing-cat has no published hash: it is the one trusted-on-first-use file.
    unpinned = [rf.name for rf in download.smallnorb_files() if rf.sha256 is None]
    assert unpinned == ["smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat"]
