"""SynthNORB: protocol, determinism, 3-D behaviour, ray-casting oracle, files and cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from robustcaps.data import synthnorb as S
from robustcaps.data import synthnorb_render as R
from robustcaps.data.smallnorb import read_matrix, write_matrix
from robustcaps.data.synthnorb_shapes import BOX, CYLINDER, ELLIPSOID, Shape, make_shape
from robustcaps.errors import RobustcapsError

# sha256 of dat bytes + cat bytes + info bytes of render_subset("training", PINNED_ROWS, seed=0).
# Changes only when the rendering changes; then bump RENDERER_VERSION and re-pin.
PINNED_ROWS = [0, 1, 977, 5000, 9999, 12345, 17000, 24299]
PINNED_SHA256 = "d6400b970d52cb6b8efb73c546b739dcd35ac04bc29034bc64a4d59fe9e24987"


def row(c: int, p: int, e: int, a: int, light: int) -> int:
    """Record index of (category, instance position, elevation idx, azimuth idx, lighting)."""
    return (((c * 5 + p) * 9 + e) * 18 + a) * 6 + light


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# -- protocol -------------------------------------------------------------------------------------

@pytest.mark.parametrize("split, instances", [("training", {4, 6, 7, 8, 9}), ("testing", {0, 1, 2, 3, 5})])
def test_metadata_protocol(split, instances):
    cat, info = S.metadata(split)
    assert cat.shape == (24300,) and cat.dtype == np.int32
    assert info.shape == (24300, 4) and info.dtype == np.int32
    assert np.bincount(cat).tolist() == [4860] * 5
    assert set(info[:, 0].tolist()) == instances
    assert sorted(set(info[:, 1].tolist())) == list(range(9))
    assert sorted(set(info[:, 2].tolist())) == list(range(0, 36, 2))
    assert sorted(set(info[:, 3].tolist())) == list(range(6))
    # Every (category, instance, elevation, azimuth, lighting) exactly once.
    keys = np.unique(np.column_stack([cat, info]), axis=0)
    assert len(keys) == 24300
    # The documented nested order.
    c, p, e, a, li = 3, 2, 7, 11, 4
    i = row(c, p, e, a, li)
    assert cat[i] == c and info[i].tolist() == [sorted(instances)[p], e, 2 * a, li]
    # An instance id belongs to every category (instances are per-category objects).
    for k in instances:
        assert set(cat[info[:, 0] == k].tolist()) == {0, 1, 2, 3, 4}


def test_split_aliases_and_bad_input():
    assert np.array_equal(S.metadata("train")[1], S.metadata("training")[1])
    with pytest.raises(RobustcapsError, match="split"):
        S.metadata("validation")
    with pytest.raises(RobustcapsError, match="out of range"):
        S.render_subset("testing", [24300])
    with pytest.raises(RobustcapsError, match="out of range"):
        S.render_subset("testing", [-1])
    with pytest.raises(RobustcapsError, match="integers"):
        S.render_subset("testing", [0.5])
    with pytest.raises(RobustcapsError, match="seed"):
        S.render_subset("testing", [0], seed=-3)


# -- images ---------------------------------------------------------------------------------------

def test_shapes_dtypes_and_values():
    idx = np.array([row(c, 1, 3, 5, li) for c in range(5) for li in (0, 4)])
    dat, cat, info = S.render_subset("testing", idx)
    assert dat.shape == (10, 2, 96, 96) and dat.dtype == np.uint8
    assert np.array_equal(cat, S.metadata("testing")[0][idx])
    assert np.array_equal(info, S.metadata("testing")[1][idx])
    for k, (img, li) in enumerate(zip(dat, info[:, 3], strict=True)):
        bg = round(R.LIGHTINGS[li][1] * 255)
        # Plain background: the border is the lighting's background level...
        border = np.concatenate([img[:, 0].ravel(), img[:, -1].ravel(), img[:, :, 0].ravel()])
        assert np.all(np.abs(border.astype(int) - bg) <= 1), k
        # ... and a real object covers a sizeable, shaded part of the frame.
        obj = np.abs(img.astype(int) - bg) > 10
        assert 0.03 < obj.mean() < 0.7, (k, obj.mean())
        assert img.max() - img.min() > 60


def test_empty_subset():
    dat, cat, info = S.render_subset("training", np.array([], dtype=np.int64))
    assert dat.shape == (0, 2, 96, 96) and cat.shape == (0,) and info.shape == (0, 4)


def test_deterministic_and_pinned():
    a = S.render_subset("training", PINNED_ROWS, seed=0)
    b = S.render_subset("training", PINNED_ROWS[::-1], seed=0)
    assert np.array_equal(a[0], b[0][::-1])
    h = hashlib.sha256()
    for arr in a:
        h.update(np.ascontiguousarray(arr).tobytes())
    assert h.hexdigest() == PINNED_SHA256
    other = S.render_subset("training", PINNED_ROWS[:2], seed=1)[0]
    assert not np.array_equal(other, a[0][:2])  # the seed changes the objects


def test_subset_equals_full_object_rows():
    """render_subset (arbitrary rows, its own batching) == the rows generate() writes."""
    full = S.render_instance("testing", 4, 3)  # the block generate() writes for this object
    assert full.shape == (972, 2, 96, 96)
    rng = np.random.default_rng(0)
    local = rng.choice(972, 30, replace=False)
    base = row(4, 3, 0, 0, 0)
    dat, cat, info = S.render_subset("testing", base + local)
    assert np.array_equal(dat, full[local])
    assert np.all(cat == 4) and np.all(info[:, 0] == 3)


def _view_diffs(c: int) -> tuple[float, float, float]:
    ids = []
    for a in (0, 4, 8, 12, 16):
        ids += [row(c, 1, 2, a, 0), row(c, 1, 2, a + 1, 0), row(c, 1, 6, a, 0)]
    d = S.render_subset("testing", ids)[0].reshape(5, 3, 2, 96, 96)
    stereo = mad(d[:, 0, 0], d[:, 0, 1])
    azimuth = mad(d[:, 0, 0], d[:, 1, 0])  # 20 degrees
    elevation = mad(d[:, 0, 0], d[:, 2, 0])  # 20 degrees
    return stereo, azimuth, elevation


@pytest.mark.parametrize("category", range(5))
def test_viewpoint_changes_the_image(category):
    """Truly 3-D: a 20-degree turn of the turntable or of the camera's elevation changes the
    image much more than the ~3.4-degree stereo vergence, which itself is not zero."""
    stereo, azimuth, elevation = _view_diffs(category)
    assert stereo > 0.3
    assert azimuth > 2.0 * stereo
    assert elevation > 1.3 * stereo


def test_silhouette_rotates_but_lighting_only_shades():
    c, p = 3, 0
    ids = [row(c, p, 0, 0, 0), row(c, p, 0, 4, 0), row(c, p, 0, 0, 2)]
    d, _, _ = S.render_subset("testing", ids)
    shape = make_shape(c, S.INSTANCES["testing"][p])
    frames = R.camera_frames(np.array([30.0, 30.0]), np.array([0.0, 80.0]), np.array([0, 0]))
    _, prim = R.cast(shape, *frames)
    m0, m_az = prim[0] >= 0, prim[1] >= 0
    assert (m0 & m_az).sum() / (m0 | m_az).sum() < 0.6  # 80 degrees: another silhouette
    # Same view, other lighting: the background level changes, the object is shaded
    # differently inside the same silhouette (blur: 1-pixel margins left out).
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    inner = np.logical_and.reduce([np.roll(m0, sh, (0, 1)) for sh in shifts])
    outer = ~np.logical_or.reduce([np.roll(m0, sh, (0, 1)) for sh in shifts])
    for img, li in ((d[0, 0], 0), (d[2, 0], 2)):
        assert np.all(img[outer] == round(R.LIGHTINGS[li][1] * 255))
    assert mad(d[0, 0][inner], d[2, 0][inner]) > 5


@pytest.mark.parametrize("category", range(5))
def test_test_instances_are_not_copies_of_training_ones(category):
    views = [(2, a) for a in (0, 4, 8, 12, 16)]
    tr = [S.render_subset("training", [row(category, p, e, a, 0) for e, a in views])[0] for p in range(5)]
    te = [S.render_subset("testing", [row(category, p, e, a, 0) for e, a in views])[0] for p in range(5)]
    stereo = np.mean([mad(t[:, 0], t[:, 1]) for t in te])
    for t in te:
        nearest = min(mad(t[:, 0], u[:, 0]) for u in tr)
        assert nearest > stereo  # more than the two eyes' views of one object differ
    # Their proportions differ too (parameters depend on (category, instance, seed) only).
    shapes = [make_shape(category, i) for i in range(10)]
    for i in (0, 1, 2, 3, 5):
        for j in (4, 6, 7, 8, 9):
            a, b = shapes[i], shapes[j]
            if a.n == b.n:
                assert np.abs(a.half - b.half).max() > 0.02
    again = make_shape(category, 7)
    assert np.array_equal(again.half, shapes[7].half)


def test_stereo_cameras():
    c, f, r, u = R.camera_frames(np.array([30.0, 30.0]), np.array([40.0, 40.0]), np.array([0, 1]))
    base = c[1] - c[0]
    assert np.linalg.norm(base) == pytest.approx(R.BASELINE)
    assert abs(base @ r[0]) == pytest.approx(R.BASELINE, rel=1e-3)  # horizontal baseline
    for k in range(2):  # converged: both look at the object's centre
        assert np.allclose(np.cross(f[k], -c[k] / np.linalg.norm(c[k])), 0, atol=1e-12)
        assert abs(r[k][2]) < 1e-12 and u[k][2] > 0  # no roll, up is up


# -- ray casting against an independent float64 reference -------------------------------------

def _reference_cast(shape: Shape, centre, fwd, right, up):
    """Straightforward per-ray float64 intersection in each primitive's local frame."""
    x = np.arange(96) + 0.5 - 48
    y = 47.5 - np.arange(96)
    d = (fwd[None, None] + x[None, :, None] / R.FOCAL * right + y[:, None, None] / R.FOCAL * up)
    depth = np.full((96, 96), np.inf)
    prim = np.full((96, 96), -1)
    for k in range(shape.n):
        m = shape.rot[k].T / shape.half[k][:, None]
        o = m @ (centre - shape.center[k])
        dl = d @ m.T
        if shape.kind[k] == BOX:
            with np.errstate(divide="ignore", invalid="ignore"):
                t1, t2 = (-1 - o) / dl, (1 - o) / dl
            t_in = np.minimum(t1, t2).max(-1)
            t_out = np.maximum(t1, t2).min(-1)
            hit = t_in < t_out
        else:
            comps = [0, 1, 2] if shape.kind[k] == ELLIPSOID else [0, 1]
            a = (dl[..., comps] ** 2).sum(-1)
            b = (dl[..., comps] * o[comps]).sum(-1)
            cc = (o[comps] ** 2).sum() - 1
            disc = b * b - a * cc
            sq = np.sqrt(np.maximum(disc, 0))
            t_in, t_out = (-b - sq) / a, (-b + sq) / a
            hit = disc > 0
            if shape.kind[k] == CYLINDER:
                with np.errstate(divide="ignore", invalid="ignore"):
                    z1, z2 = (-1 - o[2]) / dl[..., 2], (1 - o[2]) / dl[..., 2]
                t_in = np.maximum(t_in, np.minimum(z1, z2))
                t_out = np.minimum(t_out, np.maximum(z1, z2))
                hit &= t_in < t_out
        closer = hit & (t_in < depth)
        depth[closer] = t_in[closer]
        prim[closer] = k
    return depth, prim


@pytest.mark.parametrize("category, instance", [(0, 4), (1, 0), (2, 6), (3, 1), (4, 9)])
def test_cast_matches_reference(category, instance):
    shape = make_shape(category, instance)
    el = np.array([30.0, 55.0, 70.0])
    az = np.array([0.0, 140.0, 260.0])
    cam = np.array([0, 1, 0])
    frames = R.camera_frames(el, az, cam)
    depth, prim = R.cast(shape, *frames)
    for v in range(3):
        ref_d, ref_p = _reference_cast(shape, *(f[v] for f in frames))
        assert (ref_p >= 0).sum() > 150  # the object is in view
        hit, ref_hit = prim[v] >= 0, ref_p >= 0
        assert (hit == ref_hit).mean() > 0.998  # silhouettes (a rim pixel may round apart)
        both = hit & ref_hit
        close = np.abs(depth[v][both] - ref_d[both]) < 2e-3
        assert close.mean() > 0.998
        # Where the visible primitive differs, the two surfaces coincide (a seam).
        diff = both & (prim[v] != ref_p)
        assert np.allclose(depth[v][diff], ref_d[diff], atol=2e-3)


def test_normals_of_a_sphere_are_radial():
    shape = Shape(np.array([ELLIPSOID]), np.zeros((1, 3)), np.eye(3)[None], np.full((1, 3), 0.8), 0.9)
    frames = R.camera_frames(np.array([45.0]), np.array([60.0]), np.array([0]))
    depth, prim = R.cast(shape, *frames)
    flat, n = R.normals(shape, *frames, depth, prim)
    # Sphere of radius 0.8 at distance 6: angular radius asin(0.8/6) -> disc radius in pixels.
    area = len(flat)
    r_pix = R.FOCAL * np.tan(np.arcsin(0.8 / R.CAM_DIST))
    assert area == pytest.approx(np.pi * r_pix**2, rel=0.03)
    centre, fwd, right, up = (f[0] for f in frames)
    yy, xx = np.divmod(flat % (96 * 96), 96)
    d = fwd + ((xx + 0.5 - 48) / R.FOCAL)[:, None] * right + ((47.5 - yy) / R.FOCAL)[:, None] * up
    p = centre + depth.reshape(-1)[flat][:, None] * d
    assert np.allclose(np.linalg.norm(p, axis=1), 0.8, atol=1e-4)  # hit points on the sphere
    assert np.allclose(n, p / 0.8, atol=1e-3)


def test_box_normals_are_face_normals():
    shape = Shape(np.array([BOX]), np.zeros((1, 3)), np.eye(3)[None], np.array([[0.6, 0.4, 0.3]]), 0.9)
    frames = R.camera_frames(np.array([40.0]), np.array([30.0]), np.array([0]))
    depth, prim = R.cast(shape, *frames)
    _, n = R.normals(shape, *frames, depth, prim)
    faces = {tuple(np.round(v).astype(int)) for v in n}
    assert faces == {(1, 0, 0), (0, 1, 0), (0, 0, 1)}  # the three faces seen from +x+y+z
    assert np.allclose(np.abs(n).max(1), 1.0)


# -- files, cache, CLI ------------------------------------------------------------------------------

def test_matrix_round_trip(tmp_path):
    idx = np.array([row(2, 0, 4, 9, 3), row(0, 4, 8, 17, 5)])
    dat, cat, info = S.render_subset("testing", idx)
    for name, arr in (("dat", dat), ("cat", cat), ("info", info)):
        write_matrix(tmp_path / f"{name}.mat", arr)
        back = read_matrix(tmp_path / f"{name}.mat", mmap=False)
        assert back.dtype == arr.dtype and np.array_equal(back, arr)


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUSTCAPS_CACHE", str(tmp_path / "c"))
    assert S.default_cache_dir() == tmp_path / "c"
    assert S.cache_dir_for(None, 3) == tmp_path / "c" / f"synthnorb-r{S.RENDERER_VERSION}-seed3"
    monkeypatch.delenv("ROBUSTCAPS_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert S.default_cache_dir() == Path.home() / ".cache" / "robustcaps"


def test_ensure_generated_caches_and_detects_incomplete(monkeypatch, tmp_path):
    from robustcaps.data.smallnorb import create_matrix

    calls = []

    def fake_generate(out_dir, seed=0, splits=S.SPLITS, progress=True, workers=None):
        # Complete-size files (sparse), as generate() would leave them.
        calls.append((Path(out_dir), seed, tuple(splits)))
        for split in splits:
            paths = S._paths(Path(out_dir), split)
            create_matrix(paths["dat"], np.uint8, (24300, 2, 96, 96))
            write_matrix(paths["cat"], S.metadata(split)[0])
            write_matrix(paths["info"], S.metadata(split)[1])
        return []

    monkeypatch.setattr(S, "generate", fake_generate)
    folder = S.ensure_generated(tmp_path, seed=5, splits=("testing",), progress=False)
    assert folder == tmp_path / f"synthnorb-r{S.RENDERER_VERSION}-seed5"
    assert calls == [(folder, 5, ("testing",))]
    assert S.is_generated(folder, ["testing"]) and not S.is_generated(folder)
    S.ensure_generated(tmp_path, seed=5, splits=("test",), progress=False)
    assert len(calls) == 1  # cached: nothing rendered again
    S.ensure_generated(tmp_path, seed=5, progress=False)
    assert calls[-1][2] == ("training",)  # only the missing split
    # A truncated dat file is not a complete split.
    dat = S._paths(folder, "testing")["dat"]
    with open(dat, "r+b") as f:
        f.truncate(1000)
    assert not S.is_generated(folder, ["testing"])
    S.ensure_generated(tmp_path, seed=5, splits=("testing",), progress=False)
    assert calls[-1][2] == ("testing",)


def test_concurrent_ensure_generated_renders_once(monkeypatch, tmp_path):
    import threading
    import time

    from robustcaps.data.smallnorb import create_matrix

    calls = []

    def slow_generate(out_dir, seed=0, splits=S.SPLITS, progress=True, workers=None):
        calls.append(tuple(splits))
        time.sleep(0.3)
        for split in splits:
            paths = S._paths(Path(out_dir), split)
            create_matrix(paths["dat"], np.uint8, (24300, 2, 96, 96))
            create_matrix(paths["cat"], np.int32, (24300,))
            create_matrix(paths["info"], np.int32, (24300, 4))
        return []

    monkeypatch.setattr(S, "generate", slow_generate)
    threads = [threading.Thread(target=S.ensure_generated, args=(tmp_path,),
                                kwargs={"splits": ("testing",), "progress": False}) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [("testing",)]


def test_generate_refuses_without_disk_space(monkeypatch, tmp_path):
    import shutil

    monkeypatch.setattr(S.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**9, 10**9 - 5, 5))
    with pytest.raises(RobustcapsError, match="not enough disk space"):
        S.generate(tmp_path, splits=("testing",), progress=False)


def test_contact_sheet(tmp_path):
    path = S.contact_sheet(tmp_path / "sheet.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.shape[0] > 1000 and img.shape[1] > 1000


def test_bench_cli_fraction_json_and_bad_input():
    from robustcaps.cli import cli

    res = CliRunner().invoke(cli, ["bench", "data", "--fraction", "0.02", "--workers", "1", "--json", "-q"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["full_images"] == 97200 and out["measured_images"] == 1944
    assert out["extrapolated"] is True and out["files_written"] is False
    assert out["full_seconds"] == pytest.approx(out["measured_seconds"] * 50, rel=1e-2)
    assert out["images_per_second"] > 0
    # Bad input: one line, exit code 2 (a real subprocess, as a user sees it).
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "robustcaps.cli", "bench", "data", "--fraction", "1.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["Error: invalid --fraction 1.5: use a number in (0, 1]"]


# -- the real thing (slow) ---------------------------------------------------------------------------

@pytest.mark.slow
def test_full_generation_reads_back(tmp_path):
    from robustcaps.data.smallnorb import NorbSplit, norb_filename

    paths = S.generate(tmp_path, seed=0, progress=False)
    assert {p.name for p in paths} == {norb_filename(s, k) for s in S.SPLITS for k in ("dat", "cat", "info")}
    assert S.is_generated(tmp_path)
    rng = np.random.default_rng(3)
    for split in S.SPLITS:
        sp = NorbSplit(tmp_path, split)
        cat, info = S.metadata(split)
        assert np.array_equal(sp.labels, cat) and np.array_equal(sp.info, info)
        idx = np.sort(rng.choice(24300, 50, replace=False))
        assert np.array_equal(np.asarray(sp.images[idx]), S.render_subset(split, idx)[0])
    if (pinned := S.render_subset("training", PINNED_ROWS)[0]) is not None:
        assert np.array_equal(np.asarray(NorbSplit(tmp_path, "training").images[PINNED_ROWS]), pinned)
