"""SynthNORB object models: each instance is a handful of analytic primitives.

An object is a :class:`Shape`: ``P`` primitives, each an ellipsoid, a box or a capped
cylinder (local axis z), given by its centre ``(P, 3)``, rotation ``(P, 3, 3)`` (columns =
the primitive's local axes in object coordinates) and half-sizes ``(P, 3)``. Object
coordinates: x points to the object's front, y to its left, z up; the object stands on
z = 0 and is then centred and scaled so that its axis-aligned bounding box has half-diagonal
``OBJECT_RADIUS``.

The sizes, proportions and poses of instance ``i`` of category ``c`` are drawn from a NumPy
generator seeded by ``(seed, c, i)`` only, so an instance is the same wherever it is rendered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ELLIPSOID, BOX, CYLINDER = 0, 1, 2
CATEGORY_NAMES = ("animal", "human", "airplane", "truck", "car")
OBJECT_RADIUS = 1.0


@dataclass(frozen=True)
class Shape:
    """Primitives of one object instance (float64, object coordinates)."""

    kind: np.ndarray  # (P,) int: ELLIPSOID, BOX or CYLINDER
    center: np.ndarray  # (P, 3)
    rot: np.ndarray  # (P, 3, 3), columns = local axes
    half: np.ndarray  # (P, 3) half-sizes along the local axes
    albedo: float  # diffuse reflectance of the (uniformly painted) object

    @property
    def n(self) -> int:
        return int(self.kind.shape[0])


# Scalar maths via `math` and explicit 3-term sums (no BLAS, no SIMD transcendental loops):
# instance geometry must come out bit-identical on every machine.

def _norm(v) -> float:
    v = np.asarray(v, dtype=np.float64)
    return math.sqrt(float(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]))


def _cross(a, b) -> np.ndarray:
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _mm(a: np.ndarray, b) -> np.ndarray:
    """a (3,3) times b (3,3) or (3,), explicit sums."""
    b = np.asarray(b, dtype=np.float64)
    if b.ndim == 1:
        return np.array([a[i, 0] * b[0] + a[i, 1] * b[1] + a[i, 2] * b[2] for i in range(3)])
    return np.array([[a[i, 0] * b[0, j] + a[i, 1] * b[1, j] + a[i, 2] * b[2, j] for j in range(3)]
                     for i in range(3)])


def _rot_z(deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_y(deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_x(deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _frame_z(direction: np.ndarray) -> np.ndarray:
    """A rotation whose third column (local z) is ``direction`` (normalised)."""
    z = np.asarray(direction, dtype=np.float64)
    z = z / _norm(z)
    helper = np.array([0.0, 0.0, 1.0]) if abs(z[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    x = _cross(helper, z)
    x /= _norm(x)
    y = _cross(z, x)
    return np.stack([x, y, z], axis=1)


class _Builder:
    def __init__(self) -> None:
        self.kind: list[int] = []
        self.center: list[np.ndarray] = []
        self.rot: list[np.ndarray] = []
        self.half: list[np.ndarray] = []

    def add(self, kind: int, center, half, rot=None) -> None:
        self.kind.append(kind)
        self.center.append(np.asarray(center, dtype=np.float64))
        self.half.append(np.asarray(half, dtype=np.float64))
        self.rot.append(np.eye(3) if rot is None else np.asarray(rot, dtype=np.float64))

    def limb(self, p0, p1, radius: float, kind: int = ELLIPSOID, overlap: float = 1.15,
             radius2: float | None = None) -> None:
        """A primitive spanning segment p0-p1 (local z along it), cross-section radius."""
        p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
        d = p1 - p0
        length = _norm(d)
        r2 = radius if radius2 is None else radius2
        self.add(kind, (p0 + p1) / 2, (radius, r2, length / 2 * overlap), _frame_z(d))

    def wheel(self, center, radius: float, half_width: float) -> None:
        self.add(CYLINDER, center, (radius, radius, half_width), _rot_x(90.0))

    def build(self, albedo: float) -> Shape:
        kind = np.array(self.kind, dtype=np.int64)
        center = np.stack(self.center)
        rot = np.stack(self.rot)
        half = np.stack(self.half)
        # World-axis half-extents of each primitive (exact for boxes/ellipsoids, bound for cylinders).
        a = np.abs(rot) * half[:, None, :]  # (P, 3 world, 3 local)
        sq = a[..., 0] * a[..., 0] + a[..., 1] * a[..., 1] + a[..., 2] * a[..., 2]
        ext = np.where((kind == ELLIPSOID)[:, None], np.sqrt(sq), a[..., 0] + a[..., 1] + a[..., 2])
        lo = (center - ext).min(0)
        hi = (center + ext).max(0)
        mid = (lo + hi) / 2
        scale = OBJECT_RADIUS / _norm((hi - lo) / 2)
        return Shape(kind, (center - mid) * scale, rot, half * scale, albedo)


def _animal(rng: np.random.Generator) -> _Builder:
    b = _Builder()
    body_l = rng.uniform(0.42, 0.68)
    body_w = rng.uniform(0.15, 0.23)
    body_h = rng.uniform(0.16, 0.25)
    leg_len = rng.uniform(0.32, 0.75)
    leg_r = rng.uniform(0.045, 0.08)
    body_z = leg_len + body_h * 0.55
    b.add(ELLIPSOID, (0, 0, body_z), (body_l, body_w, body_h))
    splay = rng.uniform(0.0, 12.0)
    for sx in (1, -1):
        for sy in (1, -1):
            top = np.array([sx * body_l * 0.68, sy * body_w * 0.55, body_z])
            foot = top + np.array([sx * math.tan(math.radians(splay)) * leg_len, 0, -body_z])
            b.limb(top, foot, leg_r, overlap=1.05)
    neck_angle = math.radians(rng.uniform(15.0, 70.0))
    neck_len = rng.uniform(0.18, 0.55)
    neck_r = rng.uniform(0.06, 0.1)
    n0 = np.array([body_l * 0.78, 0, body_z + body_h * 0.25])
    n1 = n0 + neck_len * np.array([math.cos(neck_angle), 0, math.sin(neck_angle)])
    b.limb(n0, n1, neck_r, overlap=1.2)
    head_l = rng.uniform(0.13, 0.22)
    head_w = rng.uniform(0.07, 0.11)
    head_pitch = rng.uniform(-35.0, 5.0)
    hc = n1 + _mm(_rot_y(-head_pitch), [head_l * 0.6, 0, 0])
    b.add(ELLIPSOID, hc, (head_l, head_w, head_w * 1.05), _rot_y(-head_pitch))
    ear_len = rng.uniform(0.04, 0.11)
    for sy in (1, -1):
        e0 = n1 + np.array([0.0, sy * head_w * 0.6, head_w * 0.6])
        b.limb(e0, e0 + np.array([-0.02, sy * 0.02, ear_len]), head_w * 0.3, overlap=1.0,
               radius2=head_w * 0.15)
    tail_angle = math.radians(rng.uniform(-55.0, 35.0))
    tail_len = rng.uniform(0.2, 0.5)
    t0 = np.array([-body_l * 0.9, 0, body_z + body_h * 0.35])
    t1 = t0 + tail_len * np.array([-math.cos(tail_angle), 0, math.sin(tail_angle)])
    b.limb(t0, t1, rng.uniform(0.025, 0.045), overlap=1.1)
    return b


def _human(rng: np.random.Generator) -> _Builder:
    b = _Builder()
    leg_len = rng.uniform(0.8, 1.0)
    leg_r = rng.uniform(0.065, 0.09)
    hip_w = rng.uniform(0.09, 0.13)
    torso_h = rng.uniform(0.26, 0.34)
    torso_w = rng.uniform(0.16, 0.22)
    torso_d = rng.uniform(0.09, 0.13)
    stride = rng.uniform(-22.0, 22.0)
    spread = rng.uniform(0.0, 12.0)
    knee = rng.uniform(0.0, 25.0)
    pelvis_z = leg_len
    b.add(ELLIPSOID, (0, 0, pelvis_z + 0.03), (torso_d * 0.95, hip_w + leg_r, 0.12))
    for sy, sgn in ((1, 1), (-1, -1)):
        hip = np.array([0, sy * hip_w, pelvis_z])
        thigh_dir = _mm(_mm(_rot_x(-sy * spread), _rot_y(sgn * stride)), [0, 0, -1.0])
        knee_p = hip + thigh_dir * leg_len * 0.5
        shin_dir = _mm(_rot_y(-knee), thigh_dir)
        foot = knee_p + shin_dir * leg_len * 0.5
        b.limb(hip, knee_p, leg_r, overlap=1.15)
        b.limb(knee_p, foot, leg_r * 0.85, overlap=1.12)
        b.add(ELLIPSOID, foot + np.array([leg_r * 0.9, 0, leg_r * 0.2]),
              (leg_r * 1.7, leg_r * 0.85, leg_r * 0.6))
    chest_z = pelvis_z + 0.1 + torso_h
    b.add(ELLIPSOID, (0, 0, chest_z), (torso_d, torso_w, torso_h))
    head_r = rng.uniform(0.095, 0.125)
    b.add(ELLIPSOID, (0.01, 0, chest_z + torso_h + head_r * 1.15), (head_r, head_r * 0.9, head_r * 1.15))
    arm_len = rng.uniform(0.55, 0.72)
    arm_r = rng.uniform(0.05, 0.068)
    for sy in (1, -1):
        abduct = rng.uniform(8.0, 85.0)
        swing = rng.uniform(-35.0, 35.0)
        elbow = rng.uniform(0.0, 60.0)
        shoulder = np.array([0, sy * (torso_w * 0.95), chest_z + torso_h * 0.7])
        up_dir = _mm(_mm(_rot_y(swing), _rot_x(sy * abduct)), [0, 0, -1.0])
        elbow_p = shoulder + up_dir * arm_len * 0.5
        fore_dir = _mm(_rot_y(-elbow), up_dir)
        hand = elbow_p + fore_dir * arm_len * 0.5
        b.limb(shoulder, elbow_p, arm_r, overlap=1.2)
        b.limb(elbow_p, hand, arm_r * 0.85, overlap=1.15)
    return b


def _airplane(rng: np.random.Generator) -> _Builder:
    b = _Builder()
    fus_l = rng.uniform(0.85, 1.25)
    fus_r = rng.uniform(0.07, 0.15)
    z0 = 0.0
    b.add(ELLIPSOID, (0, 0, z0), (fus_l, fus_r, fus_r * rng.uniform(1.0, 1.25)))
    span = rng.uniform(0.55, 1.15)
    chord = rng.uniform(0.14, 0.36)
    sweep = rng.uniform(-5.0, 40.0)
    dihedral = rng.uniform(-4.0, 9.0)
    wing_x = rng.uniform(-0.12, 0.22)
    wing_z = rng.uniform(-0.6, 0.6) * fus_r
    thick = 0.022
    for sy in (1, -1):
        rot = _mm(_rot_z(sy * sweep), _rot_x(sy * dihedral))
        c = np.array([wing_x, 0, z0 + wing_z]) + _mm(rot, [0, sy * span / 2, 0])
        b.add(BOX, c, (chord / 2, span / 2, thick), rot)
    # Horizontal stabilisers and the vertical fin at the tail.
    tail_x = -fus_l * 0.82
    hs_span = rng.uniform(0.22, 0.38)
    hs_chord = rng.uniform(0.1, 0.17)
    for sy in (1, -1):
        rot = _rot_z(sy * (sweep + 8.0))
        c = np.array([tail_x, 0, z0 + fus_r * 0.2]) + _mm(rot, [0, sy * hs_span / 2, 0])
        b.add(BOX, c, (hs_chord / 2, hs_span / 2, thick * 0.8), rot)
    fin_h = rng.uniform(0.2, 0.34)
    fin_c = rng.uniform(0.14, 0.24)
    fin_sweep = rng.uniform(15.0, 45.0)
    rot = _rot_y(fin_sweep)
    c = np.array([tail_x + 0.03, 0, z0 + fus_r * 0.5]) + _mm(rot, [0, 0, fin_h / 2])
    b.add(BOX, c, (fin_c / 2, thick * 0.8, fin_h / 2), rot)
    engines = int(rng.choice([0, 2, 4], p=[0.3, 0.5, 0.2]))
    eng_r = rng.uniform(0.045, 0.07)
    for k in range(engines // 2):
        frac = 0.35 + 0.3 * k
        for sy in (1, -1):
            rot = _mm(_rot_z(sy * sweep), _rot_x(sy * dihedral))
            p = np.array([wing_x, 0, z0 + wing_z]) + _mm(rot, [0, sy * span * frac, 0])
            b.add(ELLIPSOID, p + np.array([chord * 0.35, 0, -eng_r - thick]),
                  (eng_r * 2.6, eng_r, eng_r))
    return b


def _truck(rng: np.random.Generator) -> _Builder:
    b = _Builder()
    wheel_r = rng.uniform(0.1, 0.15)
    width = rng.uniform(0.22, 0.3)
    cargo_l = rng.uniform(0.42, 0.75)
    cargo_h = rng.uniform(0.22, 0.38)
    cab_l = rng.uniform(0.15, 0.24)
    cab_h = rng.uniform(0.2, 0.3)
    hood = rng.uniform() < 0.5
    hood_l = rng.uniform(0.1, 0.2) if hood else 0.0
    chassis_z = wheel_r * 1.05
    gap = rng.uniform(0.02, 0.08)
    # chassis
    total = 2 * cargo_l + gap + 2 * cab_l + 2 * hood_l
    x_back = -total / 2
    b.add(BOX, (0, 0, chassis_z + 0.03), (total / 2, width * 0.8, 0.04))
    cargo_x = x_back + cargo_l
    b.add(BOX, (cargo_x, 0, chassis_z + 0.07 + cargo_h), (cargo_l, width * 1.05, cargo_h))
    cab_x = x_back + 2 * cargo_l + gap + cab_l
    b.add(BOX, (cab_x, 0, chassis_z + 0.07 + cab_h), (cab_l, width, cab_h))
    if hood:
        hh = cab_h * rng.uniform(0.4, 0.6)
        b.add(BOX, (cab_x + cab_l + hood_l, 0, chassis_z + 0.07 + hh), (hood_l, width * 0.85, hh))
    axles = [cab_x + (hood_l if hood else 0.0)]
    n_rear = 1 + int(rng.uniform() < 0.6)
    rear0 = x_back + cargo_l * 0.45
    axles += [rear0 + k * wheel_r * 2.2 for k in range(n_rear)]
    for x in axles:
        for sy in (1, -1):
            b.wheel((x, sy * (width * 0.95), wheel_r), wheel_r, 0.05)
    return b


def _car(rng: np.random.Generator) -> _Builder:
    b = _Builder()
    length = rng.uniform(0.7, 1.0)
    width = rng.uniform(0.27, 0.42)
    body_h = rng.uniform(0.08, 0.17)
    wheel_r = rng.uniform(0.1, 0.17)
    body_z = wheel_r + rng.uniform(0.0, 0.04)
    b.add(BOX, (0, 0, body_z + body_h * 0.5), (length, width, body_h))
    cab_l = rng.uniform(0.25, 0.6)
    cab_x = rng.uniform(-0.3, 0.05) * length
    cab_h = rng.uniform(0.1, 0.24)
    cab_w = width * rng.uniform(0.82, 0.92)
    top = body_z + body_h * 1.5
    b.add(BOX, (cab_x, 0, top + cab_h * 0.5), (cab_l, cab_w, cab_h * 0.5))
    # Sloping windscreen and rear window: boxes rotated about y whose top edge meets the
    # roof's edge; their lower halves are hidden inside the body.
    for sx, slope in ((1, rng.uniform(30.0, 45.0)), (-1, rng.uniform(35.0, 70.0))):
        beta = math.radians(slope)
        h = cab_h / (math.cos(beta) + math.sin(beta))
        b.add(BOX, (cab_x + sx * cab_l, 0, top), (h, cab_w, h), _rot_y(sx * slope))
    # Front and back bumpers make the silhouette car-like from the side.
    b.add(ELLIPSOID, (length * 0.98, 0, body_z + body_h * 0.3), (0.05, width * 0.95, body_h * 0.55))
    b.add(ELLIPSOID, (-length * 0.98, 0, body_z + body_h * 0.3), (0.05, width * 0.95, body_h * 0.55))
    wb = rng.uniform(0.58, 0.72) * length
    for x in (wb, -wb):
        for sy in (1, -1):
            b.wheel((x, sy * width * 0.92, wheel_r), wheel_r, 0.055)
    return b


_BUILDERS = (_animal, _human, _airplane, _truck, _car)


def make_shape(category: int, instance: int, seed: int = 0) -> Shape:
    """The primitives of instance ``instance`` (0-9) of ``category`` (0-4) for ``seed``."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5C0B, int(category), int(instance)])
    builder = _BUILDERS[category](rng)
    albedo = float(rng.uniform(0.78, 0.95))
    return builder.build(albedo)
