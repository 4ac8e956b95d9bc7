"""Batched ray casting of SynthNORB shapes: depth test, matte (Lambertian) shading.

Geometry: a pinhole camera at distance ``CAM_DIST`` looks at the object's centre from
elevation ``e`` and azimuth ``a`` (the turntable angle); the stereo pair is two such cameras
``BASELINE`` apart along the camera's horizontal axis, both converged on the centre. The
pixel ray of column ``x`` and row ``y`` is ``d = f + X r/F + Y w/F`` with
``X = x + 0.5 - 48`` and ``Y = 47.5 - y``, so the ray parameter is the depth along the
forward axis ``f``.

Speed: in a primitive's local frame every ray-quadric coefficient is a polynomial of degree
<= 2 in (X, Y), so one primitive costs about 15-25 float32 array operations per pixel; the
polynomials are expanded around the point of each ray at the depth of the primitive's
centre (no catastrophic cancellation for thin primitives), and each primitive is only tested
inside the screen rectangle of its projected bounding box. Lighting (6 conditions) is applied
afterwards to the stored normals, so geometry is cast once per camera view.

Determinism: every per-pixel value is produced by the same elementwise float operations
whatever the batch composition, so a view renders byte-identically alone or in a batch.
"""

from __future__ import annotations

import math

import numpy as np

from .synthnorb_shapes import BOX, CYLINDER, ELLIPSOID, Shape

IMAGE_SIZE = 96
CAM_DIST = 6.0
FOCAL = 240.0  # pixels: objects stay mostly inside the central 64x64 (the paper's crop)
BASELINE = 0.36  # stereo baseline in object units (about 3.4 degrees of vergence)

# Lighting conditions: (ambient, background, [(azimuth rel. to camera, elevation, intensity)]).
LIGHTINGS: tuple[tuple[float, float, tuple[tuple[float, float, float], ...]], ...] = (
    (0.16, 0.42, ((-55.0, 40.0, 0.88),)),
    (0.16, 0.42, ((60.0, 35.0, 0.88),)),
    (0.14, 0.48, ((10.0, 80.0, 0.9),)),
    (0.14, 0.36, ((-80.0, 25.0, 0.62), (80.0, 25.0, 0.62))),
    (0.22, 0.30, ((0.0, 15.0, 0.7),)),
    (0.10, 0.52, ((150.0, 40.0, 0.7), (-35.0, 30.0, 0.45))),
)
N_LIGHTINGS = len(LIGHTINGS)

_HALF = IMAGE_SIZE / 2
_PIX = (np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5 - _HALF)  # X for columns
_PIXY = -_PIX  # Y for rows (image rows go down)
_XY32 = (_PIXY[:, None] * _PIX[None, :]).astype(np.float32)  # (H, W)


def _cos_sin(deg) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of angles in degrees via `math` (the same bits on every machine, unlike
    NumPy's CPU-dispatched SIMD loops)."""
    rad = [math.radians(float(x)) for x in np.asarray(deg, dtype=np.float64).reshape(-1)]
    shape = np.shape(deg)
    return (np.array([math.cos(r) for r in rad], dtype=np.float64).reshape(shape),
            np.array([math.sin(r) for r in rad], dtype=np.float64).reshape(shape))


def camera_frames(elev_deg: np.ndarray, az_deg: np.ndarray, cam: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Camera centre, forward, right and up vectors, each (V, 3) float64.

    ``cam`` is 0 (left) or 1 (right) camera of the stereo pair.
    """
    ce, se = _cos_sin(elev_deg)
    ca, sa = _cos_sin(az_deg)
    k = np.asarray(cam, dtype=np.float64) - 0.5
    view = np.stack([ce * ca, ce * sa, se], axis=-1)
    right0 = np.stack([-sa, ca, np.zeros_like(ca)], axis=-1)
    centre = CAM_DIST * view + (k * BASELINE)[:, None] * right0
    dist = np.sqrt(centre[:, 0] ** 2 + centre[:, 1] ** 2 + centre[:, 2] ** 2)
    fwd = -centre / dist[:, None]
    rxy = np.sqrt(fwd[:, 0] ** 2 + fwd[:, 1] ** 2)
    right = np.stack([fwd[:, 1] / rxy, -fwd[:, 0] / rxy, np.zeros_like(rxy)], axis=-1)
    up = np.stack([
        right[:, 1] * fwd[:, 2] - right[:, 2] * fwd[:, 1],
        right[:, 2] * fwd[:, 0] - right[:, 0] * fwd[:, 2],
        right[:, 0] * fwd[:, 1] - right[:, 1] * fwd[:, 0],
    ], axis=-1)
    return centre, fwd, right, up


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Explicit 3-term dot product over the last axis (fixed summation order)."""
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _local(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """m (P,3,3) applied to v (V,P,3) or (V,1,3) -> (V,P,3), explicit sums."""
    return (m[None, :, :, 0] * v[..., None, 0] + m[None, :, :, 1] * v[..., None, 1]
            + m[None, :, :, 2] * v[..., None, 2])


def _poly(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """c0 + c1*g + c2*g^2 for coefficient vectors (V,) and grid (N,) -> float32 (V, N)."""
    return (c0[:, None] + (c1[:, None] + c2[:, None] * grid[None, :]) * grid[None, :]).astype(
        np.float32)


def _lin(c0: np.ndarray, c1: np.ndarray, grid: np.ndarray) -> np.ndarray:
    return (c0[:, None] + c1[:, None] * grid[None, :]).astype(np.float32)


class _Quad:
    """Per-pixel ray-quadric coefficients a X^2.. as separable row/column polynomials + XY term.

    For local ray ``q + t d`` with ``q = g0 + X g1 + Y g2`` and ``d = h0 + X h1 + Y h2``
    (components selected by ``comps``): ``a = |d|^2``, ``hb = q.d``, ``c = |q|^2 - 1``.
    """

    def __init__(self, g0, g1, g2, h0, h1, h2, comps: list[int]) -> None:
        def dd(p, q):
            return sum(p[:, i] * q[:, i] for i in comps)

        # a = |h0 + X h1 + Y h2|^2
        self.a_x = _poly(dd(h0, h0), 2 * dd(h0, h1), dd(h1, h1), _PIX)
        self.a_y = _poly(np.zeros(len(h0)), 2 * dd(h0, h2), dd(h2, h2), _PIXY)
        self.a_xy = (2 * dd(h1, h2)).astype(np.float32)
        # hb = (g0 + X g1 + Y g2).(h0 + X h1 + Y h2); stored negated
        self.b_x = _poly(-dd(g0, h0), -(dd(g0, h1) + dd(g1, h0)), -dd(g1, h1), _PIX)
        self.b_y = _poly(np.zeros(len(h0)), -(dd(g0, h2) + dd(g2, h0)), -dd(g2, h2), _PIXY)
        self.b_xy = (-(dd(g1, h2) + dd(g2, h1))).astype(np.float32)
        # c = |g0 + X g1 + Y g2|^2 - 1
        self.c_x = _poly(dd(g0, g0) - 1.0, 2 * dd(g0, g1), dd(g1, g1), _PIX)
        self.c_y = _poly(np.zeros(len(h0)), 2 * dd(g0, g2), dd(g2, g2), _PIXY)
        self.c_xy = (2 * dd(g1, g2)).astype(np.float32)

    def roots(self, ys: slice, xs: slice, xy: np.ndarray, far: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(t_near, t_far or None, a) over the crop; NaN where the ray misses the quadric."""
        a = self.a_x[:, None, xs] + self.a_y[:, ys, None]
        a += self.a_xy[:, None, None] * xy
        nb = self.b_x[:, None, xs] + self.b_y[:, ys, None]
        nb += self.b_xy[:, None, None] * xy
        c = self.c_x[:, None, xs] + self.c_y[:, ys, None]
        c += self.c_xy[:, None, None] * xy
        disc = nb * nb
        c *= a
        disc -= c
        np.sqrt(disc, out=disc)  # NaN where disc < 0: every comparison below is then False
        t1 = (nb + disc) if far else None
        nb -= disc
        nb /= a
        if far:
            t1 /= a
        return nb, t1, a


def _slab(q0, q1, q2, d0, d1, d2, j: int, ys: slice, xs: slice):
    """Entry/exit ray parameters of the slab |q_j + t d_j| <= 1 over the crop."""
    qx = _lin(q0[:, j], q1[:, j], _PIX)
    qy = _lin(np.zeros(len(q0)), q2[:, j], _PIXY)
    dx = _lin(d0[:, j], d1[:, j], _PIX)
    dy = _lin(np.zeros(len(d0)), d2[:, j], _PIXY)
    inv = dx[:, None, xs] + dy[:, ys, None]
    np.divide(1.0, inv, out=inv)
    tm = qx[:, None, xs] + qy[:, ys, None]
    tm *= inv
    np.negative(tm, out=tm)
    np.abs(inv, out=inv)
    lo = tm - inv
    tm += inv
    return lo, tm


def _corners(shape: Shape) -> np.ndarray:
    """(P, 8, 3) corners of each primitive's oriented bounding box."""
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)],
                     dtype=np.float64)
    local = signs[None, :, :] * shape.half[:, None, :]  # (P, 8, 3)
    return shape.center[:, None, :] + np.einsum("pij,pkj->pki", shape.rot, local)


def _screen_boxes(corners: np.ndarray, centre, fwd, right, up) -> np.ndarray:
    """Conservative pixel rectangles (P, 4) = (y0, y1, x0, x1) covering all given views."""
    rel = corners[None] - centre[:, None, None, :]  # (V, P, 8, 3)
    depth = _dot(rel, fwd[:, None, None, :])
    px = FOCAL * _dot(rel, right[:, None, None, :]) / depth + (_HALF - 0.5)
    py = (_HALF - 0.5) - FOCAL * _dot(rel, up[:, None, None, :]) / depth
    x0 = np.floor(px.min(axis=(0, 2))) - 1
    x1 = np.ceil(px.max(axis=(0, 2))) + 2
    y0 = np.floor(py.min(axis=(0, 2))) - 1
    y1 = np.ceil(py.max(axis=(0, 2))) + 2
    box = np.stack([y0, y1, x0, x1], axis=1)
    return np.clip(box, 0, IMAGE_SIZE).astype(np.int64)


def cast(shape: Shape, centre: np.ndarray, fwd: np.ndarray, right: np.ndarray, up: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast ``V`` views of one shape.

    Returns depth ``(V, H, W)`` float32 (inf on the background) and the index of the
    visible primitive ``(V, H, W)`` int8 (-1 on the background).
    """
    n_views = centre.shape[0]
    m = np.transpose(shape.rot, (0, 2, 1)) / shape.half[:, :, None]  # world -> local, (P,3,3)
    rs, ws = right / FOCAL, up / FOCAL
    # Depth of each primitive's centre in each view: expand rays around that point.
    t0 = _dot(shape.center[None, :, :] - centre[:, None, :], fwd[:, None, :])  # (V, P)
    o = _local(m, centre[:, None, :] - shape.center[None, :, :])  # (V, P, 3)
    h0 = _local(m, fwd[:, None, :])
    h1 = _local(m, rs[:, None, :])
    h2 = _local(m, ws[:, None, :])
    g0 = o + t0[..., None] * h0
    g1 = t0[..., None] * h1
    g2 = t0[..., None] * h2
    t0_32 = t0.astype(np.float32)
    boxes = _screen_boxes(_corners(shape), centre, fwd, right, up)

    depth = np.full((n_views, IMAGE_SIZE, IMAGE_SIZE), np.inf, dtype=np.float32)
    prim = np.full((n_views, IMAGE_SIZE, IMAGE_SIZE), -1, dtype=np.int8)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for k in range(shape.n):
            y0, y1, x0, x1 = boxes[k]
            if y1 <= y0 or x1 <= x0:
                continue
            ys, xs = slice(y0, y1), slice(x0, x1)
            xy = _XY32[None, ys, xs]
            kind = shape.kind[k]
            q = (g0[:, k], g1[:, k], g2[:, k], h0[:, k], h1[:, k], h2[:, k])
            if kind == ELLIPSOID:
                t, _, _ = _Quad(*q, comps=[0, 1, 2]).roots(ys, xs, xy, far=False)
                hit = None
            elif kind == CYLINDER:
                t, t_far, _ = _Quad(*q, comps=[0, 1]).roots(ys, xs, xy, far=True)
                lo, hi = _slab(*q, 2, ys, xs)
                np.maximum(t, lo, out=t)
                np.minimum(t_far, hi, out=t_far)
                hit = t < t_far
            else:  # BOX
                t, t_far = _slab(*q, 0, ys, xs)
                for j in (1, 2):
                    lo, hi = _slab(*q, j, ys, xs)
                    np.maximum(t, lo, out=t)
                    np.minimum(t_far, hi, out=t_far)
                hit = t < t_far
            t += t0_32[:, k, None, None]
            d_crop = depth[:, ys, xs]
            closer = t < d_crop
            if hit is not None:
                closer &= hit
            np.copyto(d_crop, t, where=closer)
            np.copyto(prim[:, ys, xs], np.int8(k), where=closer)
    return depth, prim


def normals(shape: Shape, centre, fwd, right, up, depth: np.ndarray, prim: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Unit surface normals of the visible points.

    Returns flat indices ``(N,)`` into ``(V, H, W)`` of the object pixels and their world
    normals ``(N, 3)`` float64. Elementwise per pixel (no BLAS), hence batch-independent.
    """
    pf = prim.reshape(-1)
    flat = np.flatnonzero(pf >= 0)
    kk = pf[flat]
    v, rem = np.divmod(flat, IMAGE_SIZE * IMAGE_SIZE)
    yy, xx = np.divmod(rem, IMAGE_SIZE)
    t = depth.reshape(-1)[flat].astype(np.float64)
    px, py = _PIX[xx] / FOCAL, _PIXY[yy] / FOCAL
    # Ray direction and hit point per pixel, component by component.
    d = [fwd[v, i] + px * right[v, i] + py * up[v, i] for i in range(3)]
    p = [centre[v, i] + t * d[i] for i in range(3)]
    n = np.empty((3, len(flat)), dtype=np.float64)
    for k in range(shape.n):
        sel = np.flatnonzero(kk == k)
        if not len(sel):
            continue
        rot, half, c = shape.rot[k], shape.half[k], shape.center[k]
        q = [p[i][sel] - c[i] for i in range(3)]
        loc = [(q[0] * rot[0, j] + q[1] * rot[1, j] + q[2] * rot[2, j]) / half[j] for j in range(3)]
        if shape.kind[k] == BOX:  # the face whose local coordinate is largest in magnitude
            a = np.stack([np.abs(x) for x in loc])
            face = np.argmax(a, axis=0)
            g = [np.where(face == j, np.sign(loc[j]), 0.0) for j in range(3)]
        elif shape.kind[k] == CYLINDER:  # side or cap, whichever the point is closer to
            cap = np.abs(loc[2]) >= np.sqrt(loc[0] * loc[0] + loc[1] * loc[1])
            g = [np.where(cap, 0.0, loc[0]), np.where(cap, 0.0, loc[1]),
                 np.where(cap, np.sign(loc[2]), 0.0)]
        else:
            g = loc
        gl = [g[j] / half[j] for j in range(3)]  # implicit-function gradient, local axes
        for i in range(3):
            n[i, sel] = rot[i, 0] * gl[0] + rot[i, 1] * gl[1] + rot[i, 2] * gl[2]
    n /= np.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2])
    # Seen from outside, the normal faces the camera; guard against rim round-off.
    flip = (n[0] * d[0] + n[1] * d[1] + n[2] * d[2]) > 0
    n[:, flip] *= -1.0
    return flat, np.ascontiguousarray(n.T)


def shade(shape: Shape, az_deg: np.ndarray, flat: np.ndarray, nrm: np.ndarray, n_views: int,
          lightings: tuple[int, ...] = tuple(range(N_LIGHTINGS))) -> np.ndarray:
    """Matte shading: ``(len(lightings), V, H, W)`` uint8 images.

    Intensity = albedo * (ambient + sum_l I_l max(0, n.l)) on the object, a constant
    background elsewhere; a [1,2,1]/4 separable blur stands in for the camera's optics
    (and anti-aliases the silhouettes). Lights turn with the camera's azimuth, so the
    normals are rotated into that frame once: n.(Rz(az) l) = (Rz(-az) n).l.
    """
    v = flat // (IMAGE_SIZE * IMAGE_SIZE)
    ca, sa = _cos_sin(az_deg)
    ca, sa = ca[v], sa[v]
    nx = (ca * nrm[:, 0] + sa * nrm[:, 1]).astype(np.float32)
    ny = (ca * nrm[:, 1] - sa * nrm[:, 0]).astype(np.float32)
    nz = nrm[:, 2].astype(np.float32)
    out = np.empty((len(lightings), n_views, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    img = np.empty(n_views * IMAGE_SIZE * IMAGE_SIZE, dtype=np.float32)
    for li, cond in enumerate(lightings):
        amb, bg, lights = LIGHTINGS[cond]
        val = np.full(len(flat), amb, dtype=np.float32)
        for laz, lel, inten in lights:
            e, la = math.radians(lel), math.radians(laz)
            lx, ly, lz = (np.float32(x) for x in (math.cos(e) * math.cos(la),
                                                   math.cos(e) * math.sin(la), math.sin(e)))
            lam = nx * lx + ny * ly + nz * lz
            np.maximum(lam, np.float32(0.0), out=lam)
            lam *= np.float32(inten)
            val += lam
        val *= np.float32(shape.albedo)
        img.fill(bg)
        img[flat] = val
        out[li] = _quantise(_blur(img.reshape(n_views, IMAGE_SIZE, IMAGE_SIZE)))
    return out


def _blur(img: np.ndarray) -> np.ndarray:
    """[1,2,1]/4 along rows then columns with edge replication; img (V, H, W) float32."""
    quarter, half = np.float32(0.25), np.float32(0.5)
    h = np.empty_like(img)  # left + right neighbours
    np.add(img[:, :, :-2], img[:, :, 2:], out=h[:, :, 1:-1])
    np.add(img[:, :, 0], img[:, :, 1], out=h[:, :, 0])
    np.add(img[:, :, -2], img[:, :, -1], out=h[:, :, -1])
    h *= quarter
    h += img * half
    out = np.empty_like(h)  # upper + lower neighbours
    np.add(h[:, :-2], h[:, 2:], out=out[:, 1:-1])
    np.add(h[:, 0], h[:, 1], out=out[:, 0])
    np.add(h[:, -2], h[:, -1], out=out[:, -1])
    out *= quarter
    h *= half
    out += h
    return out


def _quantise(img: np.ndarray) -> np.ndarray:
    return np.clip(img * np.float32(255.0) + np.float32(0.5), 0, 255).astype(np.uint8)


def render_views(shape: Shape, elev_deg: np.ndarray, az_deg: np.ndarray, cam: np.ndarray,
                 lightings: tuple[int, ...] = tuple(range(N_LIGHTINGS)), chunk: int = 18
                 ) -> np.ndarray:
    """Render ``V`` camera views of one shape under the given lighting conditions.

    ``elev_deg``, ``az_deg``, ``cam``: (V,). Returns uint8 ``(len(lightings), V, 96, 96)``.
    Views are cast in chunks of ``chunk`` (order as given: sort views by azimuth so that a
    chunk's screen rectangles stay tight); the result does not depend on the chunking.
    """
    elev_deg, az_deg, cam = (np.asarray(x) for x in (elev_deg, az_deg, cam))
    n_views = len(elev_deg)
    out = np.empty((len(lightings), n_views, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for s in range(0, n_views, chunk):
        sl = slice(s, min(s + chunk, n_views))
        frames = camera_frames(elev_deg[sl], az_deg[sl], cam[sl])
        depth, prim = cast(shape, *frames)
        flat, nrm = normals(shape, *frames, depth, prim)
        out[:, sl] = shade(shape, az_deg[sl], flat, nrm, sl.stop - sl.start, lightings)
    return out
