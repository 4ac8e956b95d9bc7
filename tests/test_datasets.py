"""load_dataset: NORB-format preprocessing, viewpoint splits, subsets, SynthNORB paths, npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from robustcaps.data import Dataset, load_dataset, smallnorb, splits, synthnorb
from robustcaps.data.datasets import protocol_table, stratified_indices
from robustcaps.errors import DataError, RobustcapsError
from robustcaps.utils import tensor_fingerprint

STEP = 45  # keep every 45th record of the protocol: 540 rows, all classes and viewpoints


def _write_norb(folder: Path, step: int = STEP) -> dict[str, dict[str, np.ndarray]]:
    """A small smallNORB-format dataset (every ``step``-th record of both splits)."""
    rng = np.random.default_rng(0)
    out = {}
    for fs in smallnorb.SPLITS:
        cat, info = protocol_table(fs)
        cat, info = cat[::step], info[::step]
        dat = rng.integers(0, 256, (len(cat), 2, 96, 96), dtype=np.uint8)
        for kind, arr in (("dat", dat), ("cat", cat), ("info", info)):
            smallnorb.write_matrix(folder / smallnorb.norb_filename(fs, kind), arr)
        out[fs] = {"dat": dat, "cat": cat, "info": info}
    return out


@pytest.fixture(scope="module")
def norb_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smallnorb")
    return folder, _write_norb(folder)


def _oracle(dat: np.ndarray) -> np.ndarray:
    """Independent float64 NumPy version of 96->48 + per-image standardisation."""
    x = dat.astype(np.float64).reshape(len(dat), dat.shape[1], 48, 2, 48, 2).mean(axis=(3, 5)) / 255
    flat = x.reshape(len(x), -1)
    std = np.maximum(flat.std(axis=1, keepdims=True), 1 / np.sqrt(flat.shape[1]))
    return ((flat - flat.mean(axis=1, keepdims=True)) / std).reshape(x.shape)


def test_smallnorb_preprocessing_matches_oracle(norb_dir):
    folder, arrays = norb_dir
    ds = load_dataset("smallnorb", "train", data_dir=folder, crop="none", progress=False)
    ref = arrays["training"]
    assert isinstance(ds, Dataset)
    assert ds.x.shape == (540, 2, 48, 48) and ds.x.dtype == torch.float32
    assert ds.y.dtype == torch.int64
    np.testing.assert_array_equal(ds.y.numpy(), ref["cat"])
    np.testing.assert_allclose(ds.x.numpy(), _oracle(ref["dat"]), atol=2e-5)
    assert ds.bounds is None and ds.num_classes == 5 and ds.class_names[4] == "car"
    for i, col in enumerate(smallnorb.INFO_COLUMNS):
        np.testing.assert_array_equal(ds.meta[col], ref["info"][:, i])
    np.testing.assert_array_equal(ds.meta["index"], np.arange(540))
    assert ds.fingerprint == tensor_fingerprint(ds.x, ds.y)
    assert ds.input_shape == (2, 48, 48)


def test_crops_and_mono(norb_dir):
    folder, arrays = norb_dir
    full = load_dataset("smallnorb", "test", data_dir=folder, crop="none", progress=False)
    center = load_dataset("smallnorb", "test", data_dir=folder, progress=False)
    assert center.x.shape == (540, 2, 32, 32) and center.input_shape == (2, 32, 32)
    assert torch.equal(center.x, full.x[..., 8:40, 8:40])
    multi = load_dataset("smallnorb", "test", data_dir=folder, crop="multi", progress=False)
    assert multi.x.shape == (540, 2, 48, 48) and multi.input_shape == (2, 32, 32)
    mono = load_dataset("smallnorb", "test", data_dir=folder, stereo=False, progress=False)
    assert mono.x.shape == (540, 1, 32, 32)
    np.testing.assert_allclose(mono.x.numpy(), _oracle(arrays["testing"]["dat"][:, :1])[..., 8:40, 8:40],
                               atol=2e-5)
    assert center.fingerprint != mono.fingerprint != full.fingerprint


def test_viewpoint_split_protocol_counts():
    """Section 5.1: one third of the training data, two thirds of the test data."""
    _, train_info = protocol_table("training")
    _, test_info = protocol_table("testing")
    deg = lambda info: info[:, 2] * 10  # noqa: E731
    az_train = splits.resolve_split("azimuth-train").mask(train_info)
    assert az_train.sum() == 24300 // 3
    assert set(deg(train_info[az_train])) == {300, 320, 340, 0, 20, 40}
    novel = splits.resolve_split("azimuth-test-novel").mask(test_info)
    assert novel.sum() == 2 * 24300 // 3
    assert set(deg(test_info[novel])) == set(range(60, 281, 20))
    familiar = splits.resolve_split("azimuth-test-familiar").mask(test_info)
    assert np.all(familiar ^ novel)
    el_train = splits.resolve_split("elevation-train").mask(train_info)
    assert el_train.sum() == 24300 // 3 and set(train_info[el_train, 1]) == {0, 1, 2}
    el_novel = splits.resolve_split("elevation-test-novel").mask(test_info)
    assert el_novel.sum() == 2 * 24300 // 3 and set(test_info[el_novel, 1]) == set(range(3, 9))
    assert splits.resolve_split("elevation-test-familiar").file_split == "testing"
    with pytest.raises(RobustcapsError, match="unknown split 'azimuth'"):
        splits.resolve_split("azimuth")


def test_viewpoint_splits_through_load_dataset(norb_dir):
    folder, arrays = norb_dir
    info = arrays["testing"]["info"]
    ds = load_dataset("smallnorb", "azimuth-test-novel", data_dir=folder, progress=False)
    expected = np.flatnonzero(np.isin(info[:, 2], np.arange(6, 29, 2)))
    np.testing.assert_array_equal(ds.meta["index"], expected)
    assert ds.split == "azimuth-test-novel"
    tr = load_dataset("smallnorb", "elevation-train", data_dir=folder, progress=False)
    assert set(tr.meta["elevation"]) <= {0, 1, 2} and len(tr) > 0
    np.testing.assert_array_equal(tr.y.numpy(), arrays["training"]["cat"][tr.meta["index"]])


def test_stratified_subsets(norb_dir):
    folder, _ = norb_dir
    a = load_dataset("smallnorb", "test", data_dir=folder, n_samples=52, seed=3, progress=False)
    b = load_dataset("smallnorb", "test", data_dir=folder, n_samples=52, seed=3, progress=False)
    c = load_dataset("smallnorb", "test", data_dir=folder, n_samples=52, seed=4, progress=False)
    assert len(a) == 52 and a.fingerprint == b.fingerprint != c.fingerprint
    counts = np.bincount(a.y.numpy(), minlength=5)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 52
    assert np.all(np.diff(a.meta["index"]) > 0)
    with pytest.raises(RobustcapsError, match="n_samples=1000 exceeds the 540"):
        load_dataset("smallnorb", "test", data_dir=folder, n_samples=1000, progress=False)


def test_stratified_indices_properties():
    labels = np.array([0] * 50 + [1] * 5 + [2] * 45)
    idx = stratified_indices(labels, 30, seed=0)
    assert len(set(idx)) == 30
    # Class 1 (5 rows) is exhausted; the other 25 are shared as evenly as possible.
    assert np.bincount(labels[idx])[1] == 5
    assert sorted(np.bincount(labels[idx]).tolist()) == [5, 12, 13]
    assert np.array_equal(stratified_indices(labels, 30, seed=0), idx)
    assert np.array_equal(np.sort(stratified_indices(labels, 100, seed=1)), np.arange(100))


def test_subset_method(norb_dir):
    folder, _ = norb_dir
    ds = load_dataset("smallnorb", "test", data_dir=folder, n_samples=20, progress=False)
    sub = ds.subset([0, 5, 7])
    assert torch.equal(sub.x, ds.x[[0, 5, 7]])
    np.testing.assert_array_equal(sub.meta["azimuth"], ds.meta["azimuth"][[0, 5, 7]])
    assert sub.fingerprint == tensor_fingerprint(sub.x, sub.y)


def test_smallnorb_missing_or_corrupt(tmp_path):
    with pytest.raises(DataError, match="smallNORB training files not found.*data fetch smallnorb"):
        load_dataset("smallnorb", "train", data_dir=tmp_path)
    _write_norb(tmp_path, step=2430)
    path = tmp_path / smallnorb.norb_filename("testing", "dat")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="testing-dat.mat: truncated"):
        load_dataset("smallnorb", "test", data_dir=tmp_path)


def test_synthnorb_metadata_follows_protocol():
    for fs in smallnorb.SPLITS:
        cat, info = synthnorb.metadata(fs)
        pcat, pinfo = protocol_table(fs)
        np.testing.assert_array_equal(cat, pcat)
        np.testing.assert_array_equal(info, pinfo)


def test_synthnorb_subset_same_rendered_or_from_files(tmp_path):
    """The n_samples subset is identical whether rendered on demand or read from full files."""
    rendered = load_dataset("synthnorb", "azimuth-test-novel", data_dir=tmp_path / "empty",
                            n_samples=15, seed=2, progress=False)
    assert not (tmp_path / "empty").exists()  # nothing generated
    assert rendered.source.startswith("rendered")
    assert rendered.x.shape == (15, 2, 32, 32)
    assert np.all(np.isin(rendered.meta["azimuth"], np.arange(6, 29, 2)))
    assert np.bincount(rendered.y.numpy(), minlength=5).tolist() == [3] * 5

    # Full-size files (sparse: only the chosen rows rendered, the rest zeros).
    folder = tmp_path / "full"
    cat, info = synthnorb.metadata("testing")
    dat = smallnorb.create_matrix(folder / smallnorb.norb_filename("testing", "dat"), np.uint8,
                                  (smallnorb.N_PAIRS, 2, 96, 96))
    rows = rendered.meta["index"]
    dat[rows] = synthnorb.render_subset("testing", rows)[0]
    dat.flush()
    del dat
    smallnorb.write_matrix(folder / smallnorb.norb_filename("testing", "cat"), cat)
    smallnorb.write_matrix(folder / smallnorb.norb_filename("testing", "info"), info)
    from_files = load_dataset("synthnorb", "azimuth-test-novel", data_dir=folder, n_samples=15,
                              seed=2, progress=False)
    assert from_files.source == str(folder)
    np.testing.assert_array_equal(from_files.meta["index"], rows)
    assert torch.equal(from_files.x, rendered.x)
    assert from_files.fingerprint == rendered.fingerprint
    # The images are standardised real renders, not blank.
    flat = rendered.x.reshape(15, -1)
    assert torch.all(flat.std(dim=1) > 0.5)


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_dataset(tmp_path):
    rng = np.random.default_rng(0)
    x8 = rng.integers(0, 256, (30, 3, 8, 8), dtype=np.uint8)
    y = np.arange(30) % 3
    ds = load_dataset(_npz(tmp_path / "u8.npz", x=x8, y=y), progress=False)
    assert ds.x.shape == (30, 3, 8, 8) and ds.bounds == (0.0, 1.0) and ds.num_classes == 3
    np.testing.assert_allclose(ds.x.numpy(), x8 / 255.0, atol=1e-7)
    xf = rng.standard_normal((30, 1, 5, 5)).astype(np.float32)
    ds = load_dataset(_npz(tmp_path / "f.npz", x=xf, y=y.astype(np.int16),
                           class_names=np.array(["a", "b", "c"])), n_samples=9)
    assert ds.bounds is None and ds.class_names == ["a", "b", "c"] and len(ds) == 9
    np.testing.assert_array_equal(ds.x.numpy(), xf[ds.meta["index"]])
    ds = load_dataset(_npz(tmp_path / "b.npz", x=np.clip(xf, -1, 1), y=y, bounds=np.array([-1.0, 1.0])))
    assert ds.bounds == (-1.0, 1.0)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 1, 2, 2), np.float32)}, r"needs arrays 'x' and 'y'; missing \['y'\]"),
        ({"x": np.zeros((4, 2, 2), np.float32), "y": np.zeros(4, int)}, r"shape \(N, C, H, W\)"),
        ({"x": np.zeros((4, 1, 2, 2), np.float32), "y": np.zeros(3, int)}, r"'y' must have shape \(4,\)"),
        ({"x": np.zeros((4, 1, 2, 2), np.float32), "y": np.full(4, 0.5)}, "integer labels"),
        ({"x": np.zeros((4, 1, 2, 2), np.int32), "y": np.zeros(4, int)}, "must be float"),
        ({"x": np.full((4, 1, 2, 2), np.nan, np.float32), "y": np.zeros(4, int)}, "NaN"),
        ({"x": np.zeros((4, 1, 2, 2), np.float32), "y": -np.ones(4, int)}, "negative labels"),
        ({"x": np.full((4, 1, 2, 2), 3, np.float32), "y": np.zeros(4, int),
          "bounds": np.array([0.0, 1.0])}, "outside 'bounds'"),
        ({"x": np.zeros((2, 1, 2, 2), np.float32), "y": np.zeros(2, int),
          "class_names": np.array([1, 2])}, "class_names"),
    ],
)
def test_npz_validation(tmp_path, arrays, message):
    name = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(name)


def test_npz_pickle_and_garbage_refused(tmp_path):
    obj = np.empty(4, dtype=object)
    name = _npz(tmp_path / "obj.npz", x=np.zeros((4, 1, 2, 2), np.float32), y=obj)
    with pytest.raises(DataError, match="never unpickles") as err:
        load_dataset(name)
    assert "allow_pickle" not in str(err.value).split(": ", 1)[1]  # never advise unsafe loading
    (tmp_path / "junk.npz").write_text("x,y\n0,1\n")  # a CSV renamed .npz
    with pytest.raises(DataError, match="junk.npz: not a valid .npz file") as err:
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")
    assert "pickle" not in str(err.value).split(": ", 1)[1]
    empty = _npz(tmp_path / "empty.npz", x=np.zeros((0, 1, 2, 2), np.float32), y=np.zeros(0, int))
    with pytest.raises(DataError, match="'x' holds no data"):
        load_dataset(empty)
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'none.npz'}")


def test_bad_names_and_options(norb_dir):
    folder, _ = norb_dir
    with pytest.raises(RobustcapsError, match="unknown dataset 'cifar10'"):
        load_dataset("cifar10")
    with pytest.raises(RobustcapsError, match="unknown crop 'left'"):
        load_dataset("smallnorb", data_dir=folder, crop="left")
    with pytest.raises(RobustcapsError, match="unknown split 'valid'"):
        load_dataset("smallnorb", "valid", data_dir=folder)
    with pytest.raises(RobustcapsError, match="n_samples must be >= 1"):
        load_dataset("smallnorb", data_dir=folder, n_samples=0)
    with pytest.raises(RobustcapsError, match="needs a file path"):
        load_dataset("npz:")
