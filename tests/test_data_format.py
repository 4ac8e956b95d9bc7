"""The smallNORB binary matrix format: round trips, exact bytes, malformed files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from robustcaps.data import smallnorb
from robustcaps.data.smallnorb import read_header, read_matrix, write_matrix
from robustcaps.errors import DataError, RobustcapsError

DTYPES = ["u1", "<i2", ">i2", "<i4", ">i4", "<f4", ">f4", "<f8"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    arr=st.sampled_from(DTYPES).flatmap(
        lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=5, min_side=0,
                                                             max_side=6))),
    mmap=st.booleans(),
)
def test_round_trip(tmp_path: Path, arr: np.ndarray, mmap: bool) -> None:
    path = tmp_path / "m.mat"
    write_matrix(path, arr)
    back = read_matrix(path, mmap=mmap)
    assert back.shape == arr.shape
    assert back.dtype == arr.dtype.newbyteorder("<") or back.dtype == arr.dtype
    np.testing.assert_array_equal(np.asarray(back), arr)  # NaNs compare equal here
    # Size is exactly header + data, header holds max(ndim, 3) dims.
    assert path.stat().st_size == 8 + 4 * max(arr.ndim, 3) + arr.nbytes
    # And gzip-compressed copies read the same.
    gz = tmp_path / "m.mat.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    np.testing.assert_array_equal(read_matrix(gz), arr)


def test_header_bytes_match_the_spec(tmp_path: Path) -> None:
    """An independent oracle: the header written by hand with struct."""
    cat = np.arange(7, dtype=np.int32) % 5
    write_matrix(tmp_path / "cat.mat", cat)
    raw = (tmp_path / "cat.mat").read_bytes()
    assert raw[:20] == struct.pack("<5i", 0x1E3D4C54, 1, 7, 1, 1)
    assert raw[20:] == struct.pack("<7i", *cat.tolist())

    dat = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)
    write_matrix(tmp_path / "dat.mat", dat)
    raw = (tmp_path / "dat.mat").read_bytes()
    assert raw[:24] == struct.pack("<6i", 0x1E3D4C55, 4, 2, 2, 3, 3)
    assert raw[24:] == dat.tobytes()

    f = np.array([[1.5, -2.0]], dtype=np.float64)
    write_matrix(tmp_path / "f.mat", f)
    assert (tmp_path / "f.mat").read_bytes()[:8] == struct.pack("<2i", 0x1E3D4C53, 2)
    assert read_matrix(tmp_path / "f.mat").dtype == np.float64


def test_reads_hand_written_file(tmp_path: Path) -> None:
    body = struct.pack("<5i", 0x1E3D4C51, 2, 2, 3, 1) + np.arange(6, dtype="<f4").tobytes()
    (tmp_path / "h.mat").write_bytes(body)
    out = read_matrix(tmp_path / "h.mat")
    assert out.dtype == np.float32 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, np.arange(6).reshape(2, 3))


def test_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(RobustcapsError, match="dtype int64 cannot be stored"):
        write_matrix(tmp_path / "x.mat", np.zeros(3, dtype=np.int64))
    assert not (tmp_path / "x.mat").exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\0", "trailing bytes"),
        (lambda b: b[:6], "truncated header"),
        (lambda b: b[:14], "truncated header"),
        (lambda b: struct.pack("<i", 0x12345678) + b[4:], "bad magic number 0x12345678"),
        (lambda b: b[:4] + struct.pack("<i", -1) + b[8:], "ndim = -1"),
        (lambda b: b[:4] + struct.pack("<i", 1000) + b[8:], "ndim = 1000"),
        (lambda b: b[:8] + struct.pack("<i", -5) + b[12:], "negative dimension"),
        (lambda b: b"", "truncated header"),
    ],
)
def test_malformed_files_are_clear_errors(tmp_path: Path, mutate, message) -> None:
    path = tmp_path / "bad-info.mat"
    write_matrix(path, np.ones((4, 4), dtype=np.int32))
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(DataError, match=message) as info:
        read_matrix(path)
    assert str(path) in str(info.value)


def test_unused_dims_must_be_one(tmp_path: Path) -> None:
    path = tmp_path / "c.mat"
    path.write_bytes(struct.pack("<5i", 0x1E3D4C54, 1, 3, 2, 1) + bytes(24))
    with pytest.raises(DataError, match="unused dimensions"):
        read_matrix(path)


def test_gzip_detected_and_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "a.mat"
    write_matrix(path, np.arange(1000, dtype=np.int32))
    blob = gzip.compress(path.read_bytes())
    (tmp_path / "b.mat").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="b.mat"):
        read_matrix(tmp_path / "b.mat")
    with pytest.raises(DataError, match="file not found"):
        read_matrix(tmp_path / "nope.mat")


def test_create_matrix_streaming_writer(tmp_path: Path) -> None:
    path = tmp_path / "s.mat"
    mm = smallnorb.create_matrix(path, np.uint8, (5, 2, 4, 4))
    expected = np.arange(5 * 32, dtype=np.uint8).reshape(5, 2, 4, 4)
    for i in range(5):
        mm[i] = expected[i]
    mm.flush()
    del mm
    np.testing.assert_array_equal(read_matrix(path), expected)
    assert read_header(path).file_size == path.stat().st_size


def test_norb_filenames() -> None:
    assert smallnorb.norb_filename("training", "dat") == "smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat"
    assert smallnorb.norb_filename("testing", "info") == "smallnorb-5x01235x9x18x6x2x96x96-testing-info.mat"
    assert smallnorb.norb_filename("test", "cat") == smallnorb.norb_filename("testing", "cat")
    with pytest.raises(RobustcapsError, match="unknown smallNORB split 'valid'"):
        smallnorb.norb_filename("valid", "dat")
    with pytest.raises(RobustcapsError, match="file kind 'img'"):
        smallnorb.norb_filename("training", "img")


def _write_split(folder: Path, split: str, n: int = 8, **override) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "dat": rng.integers(0, 256, (n, 2, 96, 96), dtype=np.uint8),
        "cat": (np.arange(n) % 5).astype(np.int32),
        "info": np.stack([np.arange(n) % 10, np.arange(n) % 9, 2 * (np.arange(n) % 18),
                          np.arange(n) % 6], 1).astype(np.int32),
    }
    arrays.update(override)
    for kind, arr in arrays.items():
        write_matrix(folder / smallnorb.norb_filename(split, kind), arr)
    return arrays


def test_norb_split_reader(tmp_path: Path) -> None:
    arrays = _write_split(tmp_path, "training")
    split = smallnorb.NorbSplit(tmp_path, "train")
    assert len(split) == 8
    assert isinstance(split.images, np.memmap)
    np.testing.assert_array_equal(split.images[3], arrays["dat"][3])
    np.testing.assert_array_equal(split.labels, arrays["cat"])
    assert set(split.meta) == {"instance", "elevation", "azimuth", "lighting"}
    np.testing.assert_array_equal(split.meta["azimuth"], arrays["info"][:, 2])
    chunks = list(split.iter_chunks(np.array([1, 5, 6]), chunk=2))
    assert [c.shape for c in chunks] == [(2, 2, 96, 96), (1, 2, 96, 96)]
    np.testing.assert_array_equal(chunks[1][0], arrays["dat"][6])
    rows = np.array([7, 2, 3, 4, 0, 0, 5])  # runs, repeats and out-of-order rows
    np.testing.assert_array_equal(split.read_rows(rows), arrays["dat"][rows])
    assert split.read_rows(np.array([], dtype=int)).shape == (0, 2, 96, 96)
    with pytest.raises(RobustcapsError, match="out of range"):
        split.read_rows(np.array([8]))


def test_norb_split_rejects_inconsistent_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="testing files missing"):
        smallnorb.NorbSplit(tmp_path, "testing")
    _write_split(tmp_path, "testing", cat=np.arange(7, dtype=np.int32) % 5)
    with pytest.raises(DataError, match=r"testing-cat.mat: expected int32 \(8,\) labels"):
        smallnorb.NorbSplit(tmp_path, "testing")
    _write_split(tmp_path, "testing", cat=np.full(8, 7, dtype=np.int32))
    with pytest.raises(DataError, match="labels outside 0..4"):
        smallnorb.NorbSplit(tmp_path, "testing")
    info = np.zeros((8, 4), dtype=np.int32)
    info[0, 2] = 3
    _write_split(tmp_path, "testing", info=info)
    with pytest.raises(DataError, match="odd azimuth"):
        smallnorb.NorbSplit(tmp_path, "testing")
    _write_split(tmp_path, "testing", dat=np.zeros((8, 2, 48, 48), dtype=np.uint8))
    with pytest.raises(DataError, match=r"expected uint8 \(N, 2, 96, 96\)"):
        smallnorb.NorbSplit(tmp_path, "testing")
