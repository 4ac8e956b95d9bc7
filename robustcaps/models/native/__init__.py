"""Native CPU passes of the EM routing, compiled from C on first use.

The routing's cost on the CPU is a handful of passes over vote-sized data per iteration.
With torch ops each pass materialises ``U = [V - c, (V - c)^2]`` or reads the slot-major
votes through a strided view; ``routing.c`` reads every vote row (16 elements, one vector)
straight from the votes and fuses the centring, squaring and reduction of a pass, so
nothing vote-sized is written except the gradient (see :mod:`robustcaps.models.em_routing`).

The library is built with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``),
``-O3 -march=native``, into ``$ROBUSTCAPS_CACHE`` (default ``~/.cache/robustcaps``) under
a name that hashes the source, the compiler, the flags and the CPU, so a shared home
directory never loads a build for another CPU. It is plain C with no Python or torch
headers: about a second to compile. Without a compiler, or with ``ROBUSTCAPS_NATIVE=0``,
:func:`library` returns None and the routing uses its torch ops (same results to
rounding). Loading runs only this package's own C source.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_DIR = Path(__file__).resolve().parent
_SOURCES = ("routing.c", "routing_body.h")
_FLAG_SETS = (["-O3", "-march=native"], ["-O3"])
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_SIGNATURES = {
    "rc_moments": [_P, _L, _L, _L, _L, _P, _L, _L, _P, _L, _P, _P, _L, _P, _I],
    "rc_estep": [_P, _L, _L, _L, _L, _P, _P, _L, _P, _P, _P, _L],
    "rc_vgrad": [_P, _L, _L, _L, _L, _L, _P, _P, _P, _P, _L, _L, _I],
    "rc_iteration": [_P, _L, _L, _L, _L, _P, _L, _L, _P, _L, _P, _L, _P, _P,
                     ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_double,
                     ctypes.c_double, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P,
                     ctypes.c_double],
    "rc_norm_type": [_P, _L, _L, _L, _L, _L, _L, _P, _L, _P, _I],
    "rc_norm_type_grad": [_P, _P, _L, _P, _L, _L, _L, _L, _L, _L, _P, _L, _P],
}


def enabled() -> bool:
    """False when ``ROBUSTCAPS_NATIVE`` is ``0``/``false``/``no``/``off``."""
    return os.environ.get("ROBUSTCAPS_NATIVE", "1").strip().lower() not in (
        "0", "false", "no", "off")


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or None
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_id() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines()
            if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(keep)))


def cache_dir() -> Path:
    root = os.environ.get("ROBUSTCAPS_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "robustcaps"


def _build(cc: str) -> Path:
    """Compile (or find the cached build of) the routing library; raises on failure."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"{cc} --version failed: {exc}") from exc
    src = b"".join((_DIR / s).read_bytes() for s in _SOURCES)
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(flags).encode(),
                                         _cpu_id().encode(), sys.platform.encode(),
                                         platform.machine().encode()])).hexdigest()[:16]
        target = cache_dir() / f"routing-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cc, *flags, "-shared", "-fPIC", "-Wno-psabi", "-o", tmp,
               str(_DIR / "routing.c"), "-lm"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if res.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders never see half a file
                return target
            errors.append(f"{' '.join(cmd)}: {res.stderr.strip()[-300:]}")
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(cmd)}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors))


def library() -> ctypes.CDLL | None:
    """The loaded routing library, or None (disabled, no compiler, or the build failed;
    the reason is in :func:`status` and was warned about once)."""
    if not enabled():
        return None
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]  # type: ignore[return-value]
        lib = None
        cc = _compiler()
        if cc is None:
            _STATE["why"] = "no C compiler found (set CC)"
        else:
            try:
                lib = ctypes.CDLL(str(_build(cc)))
                for name, args in _SIGNATURES.items():
                    for suffix in ("_f32", "_f64"):
                        fn = getattr(lib, name + suffix)
                        fn.argtypes, fn.restype = args, None
                _STATE["why"] = f"built with {cc}"
            except (OSError, RuntimeError, AttributeError) as exc:
                lib = None
                _STATE["why"] = f"build failed: {exc}"
        if lib is None:
            warnings.warn(f"robustcaps: native EM routing unavailable ({_STATE['why']}); "
                          "using torch ops (slower)", RuntimeWarning, stacklevel=2)
        _STATE["lib"] = lib
        return lib


def status() -> str:
    """One line: whether the native routing is in use, and why not."""
    if not enabled():
        return "disabled (ROBUSTCAPS_NATIVE=0)"
    lib = library()
    return ("native" if lib is not None else "torch ops") + f": {_STATE.get('why', '')}"


def usable(t: torch.Tensor) -> bool:
    """Whether the native passes can run on tensors like ``t`` (CPU, float32/float64)."""
    return (t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
            and library() is not None)


def _fn(name: str, t: torch.Tensor):  # noqa: ANN202
    lib = library()
    assert lib is not None
    return getattr(lib, name + ("_f32" if t.dtype == torch.float32 else "_f64"))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_rows(V: torch.Tensor, *others: torch.Tensor | None) -> None:
    if V.stride(2) != 1 or V.shape[2] != 16:
        raise ValueError(f"votes must be (M, J, 16) with unit stride along 16, got "
                         f"{tuple(V.shape)} strides {V.stride()}")
    for t in others:
        if t is not None and (t.dtype != V.dtype or t.device != V.device):
            raise ValueError("native routing arguments must share the votes' dtype and device")


def moments(V: torch.Tensor, R: torch.Tensor, c: torch.Tensor | None, S: torch.Tensor, *,
            rdiv: int = 1, A: torch.Tensor | None = None, adiv: int = 1,
            mass: torch.Tensor | None = None, second: bool = True) -> None:
    """S[m] = [sum_j r (V[m,j] - c[m]), sum_j r (V[m,j] - c[m])^2] (see routing_body.h).

    V: (M, J, 16), unit stride along 16; R: 2-D, row ``m // rdiv`` weights parent m,
    unit column stride; A: (M // adiv, J) contiguous, multiplies R; c: (M, 16) contiguous or
    None; S: 2-D (M, 32) (or (M, 16) without ``second``), unit column stride; mass: (M,) contiguous or None.
    """
    M, J, _ = V.shape
    _check_rows(V, R, A, c, S, mass)
    assert R.dim() == 2 and R.shape[1] == J and R.stride(1) == 1
    assert S.dim() == 2 and S.shape[0] == M and S.stride(1) == 1
    assert c is None or c.is_contiguous()
    assert A is None or A.is_contiguous()
    assert mass is None or mass.is_contiguous()
    _fn("rc_moments", V)(V.data_ptr(), V.stride(0), V.stride(1), M, J,
                         R.data_ptr(), R.stride(0), rdiv, _ptr(A), adiv,
                         _ptr(c), S.data_ptr(), S.stride(0), _ptr(mass),
                         int(second))


def estep(V: torch.Tensor, c: torch.Tensor, w: torch.Tensor, z: torch.Tensor,
          add: torch.Tensor | None = None, add2: torch.Tensor | None = None) -> None:
    """z[m, j] = (w[m, :16] . (V[m,j] - c[m]) + w[m, 16:] . (V[m,j] - c[m])^2 + add[m])
    + add2[m].

    c: (M, 16) contiguous; w: 2-D (M, 32) and z: 2-D (M, J), unit column strides; add, add2: (M,) contiguous or None.
    """
    M, J, _ = V.shape
    _check_rows(V, c, w, z, add, add2)
    assert c.is_contiguous()
    assert w.dim() == 2 and w.shape[0] == M and w.stride(1) == 1
    assert z.dim() == 2 and z.shape == (M, J) and z.stride(1) == 1
    assert (add is None or add.is_contiguous()) and (add2 is None or add2.is_contiguous())
    _fn("rc_estep", V)(V.data_ptr(), V.stride(0), V.stride(1), M, J, c.data_ptr(),
                       w.data_ptr(), w.stride(0), _ptr(add), _ptr(add2), z.data_ptr(),
                       z.stride(0))


def vgrad(V: torch.Tensor, L: torch.Tensor, P: torch.Tensor, cs: torch.Tensor,
          G: torch.Tensor, accumulate: bool = False) -> None:
    """G[m, j] (+)= sum_k L[m,k,j] (P[m,k,:16] + 2 (V[m,j] - cs[m,k]) P[m,k,16:]).

    L: (M, K, J), P: (M, K, 32), cs: (M, K, 16) contiguous; G: (M, J, 16) like V.
    """
    M, J, _ = V.shape
    K = L.shape[1]
    _check_rows(V, L, P, cs, G)
    assert L.is_contiguous() and P.is_contiguous() and cs.is_contiguous()
    assert G.shape == V.shape and G.stride(2) == 1
    _fn("rc_vgrad", V)(V.data_ptr(), V.stride(0), V.stride(1), M, J, K, L.data_ptr(),
                       P.data_ptr(), cs.data_ptr(), G.data_ptr(), G.stride(0), G.stride(1),
                       int(accumulate))


def iteration(V: torch.Tensor, R: torch.Tensor, c0: torch.Tensor | None, *, rdiv: int,
              A: torch.Tensor | None, adiv: int, C: int, beta_a: torch.Tensor,
              buh: torch.Tensor, lam: float, data_scale: float, var_floor: float,
              eps: float, ratio: float, estep: bool, prev: torch.Tensor | None = None,
              alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """One EM iteration of M parents (see ``rc_iteration`` in routing_body.h).

    V: (M, J, 16); R: 2-D weight rows (row ``m // rdiv``); A: (M // adiv, J) contiguous
    or None; c0: (M, 16) contiguous reference or None (the weighted mean); beta_a, buh:
    (C,) contiguous, parent m has type ``m % C``. Returns c, S, mass, d, var, q, sls,
    logit and, with ``estep``, w and z (M, J). ``alpha`` != 1: mean smoothing about
    ``prev`` (M, 16) contiguous, or None for 0.
    """
    M, J, _ = V.shape
    _check_rows(V, R, A, c0, beta_a, buh)
    assert R.dim() == 2 and R.shape[1] == J and R.stride(1) == 1
    assert all(t is None or t.is_contiguous() for t in (A, c0, beta_a, buh, prev))
    new = V.new_empty
    out = {"c": new(M, 16), "S": new(M, 32), "mass": new(M), "d": new(M, 16),
           "var": new(M, 16), "q": new(M, 16), "sls": new(M), "logit": new(M)}
    if estep:
        out["w"], out["z"] = new(M, 32), new(M, J)
    o = out
    _fn("rc_iteration", V)(
        V.data_ptr(), V.stride(0), V.stride(1), M, J, R.data_ptr(), R.stride(0), rdiv,
        _ptr(A), adiv, _ptr(c0), C, beta_a.data_ptr(), buh.data_ptr(), float(lam),
        float(data_scale), float(var_floor), float(eps), float(ratio),
        *(o[k].data_ptr() for k in ("c", "S", "mass", "d", "var", "q", "sls", "logit")),
        _ptr(o.get("w")), _ptr(o.get("z")), _ptr(prev), float(alpha))
    return out


def _type_groups(z: torch.Tensor, index: torch.Tensor, B: int) -> tuple[int, int, int, int, int]:
    n, L, C, J = z.shape
    assert index.dtype == torch.int64 and index.is_contiguous() and index.numel() * B == L * J
    return n, L, C, J // B, B


def norm_type_(z: torch.Tensor, index: torch.Tensor, n_pos: int, B: int) -> torch.Tensor:
    """The per-type E-step normaliser in place (``rc_norm_type``, with torch's vectorised
    exp between its two stages): z (n, L, C, J = KK*B) with unit stride along J and rows of
    parents ``(s, l, c)`` at one stride; ``index`` (L*KK,) int64 child positions. Returns
    z, now the assignments R."""
    n, L, C, KK, B = _type_groups(z, index, B)
    assert z.stride(3) == 1 and z.stride(2) * C == z.stride(1) and (n == 1 or z.stride(0) == L * z.stride(1))
    work = z.new_empty(C * n_pos * B)
    fn = _fn("rc_norm_type", z)
    args = (z.data_ptr(), z.stride(2), n, L, C, KK, B, index.data_ptr(), n_pos, work.data_ptr())
    fn(*args, 0)
    z.exp_()
    fn(*args, 1)
    return z


def norm_type_grad(gR: torch.Tensor, R: torch.Tensor, out: torch.Tensor, index: torch.Tensor,
                   n_pos: int, B: int) -> torch.Tensor:
    """``out = R (gR - per-type fold sum of R gR)`` (``rc_norm_type_grad``): the gradient of
    the E-step terms z from that of R. gR, R contiguous (n, L, C, J); out (n, L, C, J) with
    unit stride along J and parent rows at one stride."""
    n, L, C, KK, B = _type_groups(R, index, B)
    assert gR.is_contiguous() and R.is_contiguous() and gR.shape == R.shape == out.shape
    assert out.stride(3) == 1 and out.stride(2) * C == out.stride(1) and (n == 1 or out.stride(0) == L * out.stride(1))
    _check_rows(R.new_empty(1, 1, 16), gR, out)
    work = R.new_empty(C * n_pos * B)
    _fn("rc_norm_type_grad", R)(gR.data_ptr(), R.data_ptr(), R.shape[3], out.data_ptr(),
                                out.stride(2), n, L, C, KK, B, index.data_ptr(), n_pos,
                                work.data_ptr())
    return out
