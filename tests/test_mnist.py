"""MNIST idx reader/writer on generated files, and on the real t10k files when present."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from robustcaps.data import load_dataset
from robustcaps.data.mnist import load_mnist, read_idx, read_idx_header, write_idx
from robustcaps.errors import DataError, RobustcapsError

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    arr=st.sampled_from(["u1", "i1", ">i2", "<i4", "<f4", ">f8"]).flatmap(
        lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=1, max_dims=4, min_side=0,
                                                             max_side=5))),
    compress=st.booleans(),
)
def test_idx_round_trip(tmp_path, arr, compress):
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, arr)
    back = read_idx(path)
    assert back.shape == arr.shape and back.dtype.kind == arr.dtype.kind
    np.testing.assert_array_equal(back, arr)


def test_idx_bytes_oracle(tmp_path):
    labels = np.array([7, 2, 1], dtype=np.uint8)
    write_idx(tmp_path / "l", labels)
    assert (tmp_path / "l").read_bytes() == bytes([0, 0, 8, 1]) + struct.pack(">i", 3) + bytes([7, 2, 1])
    images = np.arange(2 * 3 * 2, dtype=np.uint8).reshape(2, 3, 2)
    blob = bytes([0, 0, 8, 3]) + struct.pack(">3i", 2, 3, 2) + images.tobytes()
    (tmp_path / "i.gz").write_bytes(gzip.compress(blob))
    np.testing.assert_array_equal(read_idx(tmp_path / "i.gz"), images)


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x00\x00\x08", "truncated idx header"),
        (b"\x01\x02\x08\x01" + struct.pack(">i", 1) + b"\x00", "bad magic bytes 01020801"),
        (b"\x00\x00\x07\x01" + struct.pack(">i", 1) + b"\x00", "bad magic"),
        (b"\x00\x00\x08\x02" + struct.pack(">i", 1), "truncated idx header"),
        (b"\x00\x00\x08\x01" + struct.pack(">i", 5) + b"\x00\x01", "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">i", 1) + b"\x00\x01", "trailing bytes"),
    ],
)
def test_malformed_idx(tmp_path, blob, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(blob)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert "bad-idx" in str(info.value)


def _fake_mnist(folder: Path, n: int = 10_000, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", images)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", labels)
    return images, labels


def test_mnist_splits_generated(tmp_path):
    images, labels = _fake_mnist(tmp_path)
    x, y = load_mnist(tmp_path, "test")
    np.testing.assert_array_equal(x, images)
    assert y.dtype == np.int64
    xtr, ytr = load_mnist(tmp_path, "t10k-train")
    xte, yte = load_mnist(tmp_path, "t10k-test")
    assert len(xtr) == 8000 and len(xte) == 2000
    np.testing.assert_array_equal(np.concatenate([xtr, xte]), images)
    np.testing.assert_array_equal(np.concatenate([ytr, yte]), labels)
    with pytest.raises(DataError, match="only the t10k files are here: use split 't10k-train'"):
        load_mnist(tmp_path, "train")
    with pytest.raises(RobustcapsError, match="unknown MNIST split 'val'"):
        load_mnist(tmp_path, "val")


def test_mnist_dataset_tensors(tmp_path):
    images, labels = _fake_mnist(tmp_path, gz=False)
    ds = load_dataset("mnist", "t10k-test", data_dir=tmp_path)
    assert ds.x.shape == (2000, 1, 28, 28) and ds.bounds == (0.0, 1.0)
    assert ds.num_classes == 10 and ds.class_names[3] == "3"
    np.testing.assert_allclose(ds.x[5, 0].numpy(), images[8005] / 255.0, atol=1e-7)
    assert ds.meta["index"][0] == 8000
    assert ds.input_shape == (1, 28, 28)
    sub = load_dataset("mnist", "t10k-train", data_dir=tmp_path, n_samples=100, seed=1)
    assert len(sub) == 100
    np.testing.assert_array_equal(sub.y.numpy(), labels[sub.meta["index"]])
    assert np.bincount(sub.y.numpy(), minlength=10).tolist() == [10] * 10
    with pytest.raises(RobustcapsError, match="crop='multi' applies only to NORB"):
        load_dataset("mnist", "test", data_dir=tmp_path, crop="multi")


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="../shared/data/mnist-t10k not present")
def test_real_mnist_t10k():
    header = read_idx_header(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")
    assert header.shape == (10000, 28, 28)
    x, y = load_mnist(SHARED_MNIST, "test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    # Published class counts of the MNIST test set.
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # First test digits are 7, 2, 1, 0, 4.
    assert y[:5].tolist() == [7, 2, 1, 0, 4]
    ds = load_dataset("mnist", "t10k-test", data_dir=SHARED_MNIST)
    assert len(ds) == 2000 and float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="../shared/data/mnist-t10k not present")
def test_verify_real_gz_files_against_official_checksums():
    from robustcaps.data import download

    reports = {r.name: r for r in download.verify(SHARED_MNIST, "mnist", progress=False)}
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert reports[name].ok and reports[name].checksum == "official match"
    assert not reports["train-images-idx3-ubyte"].present


def test_verify_corrupt_gz(tmp_path):
    from robustcaps.data import download

    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    blob = (tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(blob[:-8])  # cut the gzip trailer
    reports = {r.name: r for r in download.verify(tmp_path, "mnist", progress=False)}
    rep = reports["t10k-labels-idx1-ubyte.gz"]
    assert not rep.ok and "t10k-labels-idx1-ubyte.gz" in rep.format_error
