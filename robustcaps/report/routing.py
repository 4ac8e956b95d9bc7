"""EM routing at work in the class layer: the paper's Fig. 2 (zoomed) and Fig. B.2 (full range).

What is computed, per sample ``n``, routing iteration ``t = 1..T``, class capsule ``j`` and
child ``i`` (every capsule of the last ConvCaps layer, ``J = H*W*D`` of them):

- ``distance = || V_ij - mu_j^(t) ||_2``: the Euclidean distance, over the 16 pose elements,
  between the vote ``V_ij`` of child ``i`` for class ``j`` (Coordinate Addition included, as
  the routing sees it) and the mean ``mu_j^(t)`` of class capsule ``j`` after iteration
  ``t``'s M-step;
- ``weight = R_ij^(t)``: the assignment probability that M-step used (iteration 1: the
  uniform ``1/E``), as the Fig. 2 caption says ("each distance point is weighted by its
  assignment probability"). The child's activation ``a_i`` is NOT in the weight (the
  caption does not include it); it is written as its own column so that ``R * a``, the
  weight of the M-step itself, can be recomputed. Every child's weights sum to 1 over the
  classes, so each panel's histograms hold ``J`` in total.

The model only returns the final M-step's ``R``; the earlier iterations are re-run here by
:func:`route_prefix`, which calls the routing's own functions with the first ``t``
inverse temperatures of the model's schedule. Tested: ``t = T`` reproduces the model's
class poses, logits and ``R`` to float32 rounding (2e-5; the model's native passes round
differently, so not bit for bit), and every ``t`` matches an independent float64 loop of
Procedure 1 to 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ..errors import RobustcapsError  # noqa: E402
from ..models import em_routing as er  # noqa: E402

PAPER_ZOOM = 0.05  # Fig. 2's x-axis limit
VOTE_COLUMNS = ["sample", "true", "predicted", "iteration", "class", "class_name", "child_row",
                "child_col", "child_type", "distance", "weight", "child_activation"]
HIST_COLUMNS = ["sample", "view", "iteration", "class", "class_name", "bin_lo", "bin_hi", "weight"]


@dataclass
class RoutingTrace:
    """Class-layer routing of a batch, every iteration.

    votes (N, E, J, 16); a_in (N, J) child activations; means (T, N, E, 16); R (T, N, E, J);
    logits (T, N, E); child_shape (H, W, D) of the children (J = H*W*D, D innermost).
    """

    votes: torch.Tensor
    a_in: torch.Tensor
    means: torch.Tensor
    R: torch.Tensor
    logits: torch.Tensor
    child_shape: tuple[int, int, int]

    @property
    def distances(self) -> torch.Tensor:
        """(T, N, E, J) Euclidean distances between every vote and its class's mean."""
        return (self.votes[None] - self.means[:, :, :, None, :]).norm(dim=-1)


def route_prefix(votes: torch.Tensor, a_in: torch.Tensor, layer: torch.nn.Module,
                 t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The class layer's routing stopped after iteration ``t``'s M-step.

    votes (N, E, J, 16), a_in (N, J). Same steps as ``em_routing_autograd`` (initial R,
    reference mean, centred moments, ``_route``) with the first ``t`` lambdas of the
    layer's schedule. Returns mu (N, E, 16), logits (N, E), R (N, E, J).
    """
    n, e, j, h = votes.shape
    v = votes.reshape(n, 1, e, j, h)
    r0 = er._initial_R(v, None)
    a = a_in.reshape(n, 1, 1, j)
    c = er._reference_mean(v, r0 * a)
    vm = v.reshape(n * e, j, h)
    dv = vm - c
    u = torch.cat((dv, dv * dv), -1)
    lambdas = er.lambda_schedule(layer.iterations, layer.final_lambda)[:t]
    mu, logits, r = er._route(vm, u, c, a, r0, layer.beta_a, layer.beta_u, lambdas, None,
                              j / e, er.VAR_FLOOR, (n, 1, e, j))
    return mu.reshape(n, e, h), logits.reshape(n, e), r.reshape(n, e, j)


def trace_routing(model: torch.nn.Module, x: torch.Tensor) -> RoutingTrace:
    """Run ``model(x, return_all=True)`` and re-run its class-layer routing per iteration."""
    layer = getattr(model, "classcaps", None)
    if layer is None or not hasattr(layer, "iterations"):
        raise RobustcapsError(f"routing inspection needs an EM-routing capsule network "
                              f"(robustcaps CapsNet), got {type(model).__name__}")
    with torch.no_grad():
        out = model(x, return_all=True)
        cls, prev = out["layers"][-1], out["layers"][-2]
        n, e, hh, ww, d = cls["R"].shape
        votes = cls["votes"].reshape(n, e, hh * ww * d, 16)
        a_in = prev["activations"].reshape(n, hh * ww * d)
        steps = [route_prefix(votes, a_in, layer, t) for t in range(1, layer.iterations + 1)]
    means, logits, r = (torch.stack(parts).cpu() for parts in zip(*steps, strict=True))
    return RoutingTrace(votes.cpu(), a_in.cpu(), means, r, logits, (hh, ww, d))  # tables: numpy


def vote_table(trace: RoutingTrace, samples: list[int], labels: list[int],
               class_names: list[str]) -> pd.DataFrame:
    """One row per (sample, iteration, class, child): :data:`VOTE_COLUMNS`.

    ``samples`` are dataset indices of the batch rows; ``predicted`` is the argmax of the
    final iteration's logits.
    """
    dist, weight = trace.distances.numpy(), trace.R.numpy()
    t_n, n, e, j = dist.shape
    hh, ww, d = trace.child_shape
    row, col, typ = np.unravel_index(np.arange(j), (hh, ww, d))
    pred = trace.logits[-1].argmax(-1).numpy()
    frames = []
    for b in range(n):
        for t in range(t_n):
            for c in range(e):
                frames.append(pd.DataFrame({
                    "sample": samples[b], "true": labels[b], "predicted": int(pred[b]),
                    "iteration": t + 1, "class": c, "class_name": class_names[c],
                    "child_row": row, "child_col": col, "child_type": typ,
                    "distance": dist[t, b, c], "weight": weight[t, b, c],
                    "child_activation": trace.a_in[b].numpy(),
                }))
    return pd.concat(frames, ignore_index=True)[VOTE_COLUMNS]


def histogram_table(votes: pd.DataFrame, edges: np.ndarray, view: str) -> pd.DataFrame:
    """Weighted histograms (:data:`HIST_COLUMNS`) of ``votes`` over ``edges`` per
    (sample, iteration, class); votes outside the edges are left out (as in Fig. 2)."""
    rows = []
    keys = ["sample", "iteration", "class", "class_name"]
    for (s, t, c, name), g in votes.groupby(keys, sort=True):
        w, _ = np.histogram(g["distance"], bins=edges, weights=g["weight"])
        rows.append(pd.DataFrame({"sample": s, "view": view, "iteration": t, "class": c,
                                  "class_name": name, "bin_lo": edges[:-1], "bin_hi": edges[1:],
                                  "weight": w}))
    return pd.concat(rows, ignore_index=True)[HIST_COLUMNS]


def summary_table(votes: pd.DataFrame, zoom: float) -> pd.DataFrame:
    """Per (sample, iteration, class): the class's total assignment weight, its weighted
    mean distance, and the weight of votes closer than ``zoom`` and than Fig. 2's 0.05."""
    below = {f"weight_below_{z:g}": votes["weight"] * (votes["distance"] < z)
             for z in sorted({PAPER_ZOOM, zoom})}
    v = votes.assign(wd=votes["distance"] * votes["weight"], **below)
    keys = ["sample", "true", "predicted", "iteration", "class", "class_name"]
    g = v.groupby(keys, sort=True)[["weight", "wd", *below]].sum().reset_index()
    g["mean_distance"] = g["wd"] / g["weight"]
    return g.drop(columns="wd")


def _label(name: str, c: int, true: int, pred: int) -> str:
    tags = [t for t, hit in (("true", c == true), ("predicted", c == pred)) if hit]
    return f"{name} ({', '.join(tags)})" if tags else name


def plot_sample(hist: pd.DataFrame, info: dict, title: str, log: bool, path: Path) -> Path:
    """One panel per iteration, a step histogram per class capsule (true class solid and
    thick, predicted class dashed and thick); ``info``: true, predicted, total (J). ``log``: Fig. B.2's independent log scale;
    otherwise Fig. 2's shared linear scale."""
    iters = sorted(hist["iteration"].unique())
    fig, axes = plt.subplots(1, len(iters), figsize=(4.6 * len(iters), 3.9), squeeze=False,
                             sharey=not log)
    colours = plt.get_cmap("tab10")
    for ax, t in zip(axes[0], iters, strict=True):
        for (c, name), g in hist[hist["iteration"] == t].groupby(["class", "class_name"]):
            hi = c in (info["true"], info["predicted"])
            ax.stairs(g["weight"].to_numpy(), np.append(g["bin_lo"].to_numpy(), g["bin_hi"].iloc[-1]),
                      color=colours(c), linewidth=2.6 if hi else 1.2,
                      linestyle="--" if c == info["predicted"] != info["true"] else "-",
                      label=_label(name, c, info["true"], info["predicted"]))
        if log:
            ax.set_yscale("log")
        shown = hist.loc[hist["iteration"] == t, "weight"].sum()
        ax.set_title(f"after routing iteration {t}\n(weight shown: {shown:.3g} of {info['total']})",
                     fontsize=10)
        ax.set_xlabel("distance of vote to class-capsule mean")
        ax.set_xlim(hist["bin_lo"].min(), hist["bin_hi"].max())
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("sum of assignment probabilities")
    axes[0, -1].legend(title="class capsule", fontsize=8, title_fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pick_sample(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, outcome: str,
                batch_size: int = 64) -> int:
    """The lowest index whose prediction is ``outcome`` ("correct" or "confused"), scanning
    in batches and stopping at the first hit (a fixed rule, so nobody picks samples)."""
    if outcome not in ("correct", "confused"):
        raise RobustcapsError(f"outcome must be 'correct' or 'confused', got {outcome!r}")
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            pred = model(x[start:start + batch_size]).argmax(-1).cpu()
            hit = (pred == y[start:start + batch_size]) == (outcome == "correct")
            if bool(hit.any()):
                return start + int(hit.nonzero()[0])
    raise RobustcapsError(f"no {outcome} sample among the {len(y)} given")


def check_indices(indices: list[int], n: int) -> list[int]:
    """``indices`` without repeats (a repeat would double its rows), all in ``0..n-1``."""
    indices = list(dict.fromkeys(int(i) for i in indices))
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise RobustcapsError(f"index {bad[0]} is outside the data (0..{n - 1})")
    return indices


@dataclass
class InspectResult:
    """Where :func:`inspect_routing` wrote its outputs, and the summary numbers."""

    figures: list[Path]
    csvs: list[Path]
    summary: pd.DataFrame


def inspect_routing(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    indices: list[int], class_names: list[str], out_dir: Path, *,
                    label: str = "", zoom: float = PAPER_ZOOM, zoom_bins: int = 25,
                    full_bins: int = 200) -> InspectResult:
    """Fig. 2 (``routing-<i>-zoom.png``, distances below ``zoom``, shared linear scale) and
    Fig. B.2 (``routing-<i>-full.png``, the full range 0..max distance, independent log
    scales) for the dataset rows ``indices`` of ``x`` (model input space), plus
    ``votes.csv``, ``histograms.csv`` and ``summary.csv``. ``label`` heads every title."""
    indices = check_indices(indices, len(y))
    trace = trace_routing(model, x[indices])
    votes = vote_table(trace, list(indices), [int(y[i]) for i in indices], class_names)
    zoom_edges = np.linspace(0.0, zoom, zoom_bins + 1)
    full_edges = np.linspace(0.0, float(votes["distance"].max()) * 1.0001, full_bins + 1)
    hist = pd.concat([histogram_table(votes, zoom_edges, "zoom"),
                      histogram_table(votes, full_edges, "full")], ignore_index=True)
    summary = summary_table(votes, zoom)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for b, i in enumerate(indices):
        info = {"true": int(y[i]), "predicted": int(trace.logits[-1, b].argmax()),
                "total": trace.R.shape[-1]}
        act = torch.sigmoid(trace.logits[-1, b])
        head = (f"{label}sample {i}: true {class_names[info['true']]}, predicted "
                f"{class_names[info['predicted']]} (activation {act[info['predicted']]:.2f})")
        for view, log in (("zoom", False), ("full", True)):
            h = hist[(hist["sample"] == i) & (hist["view"] == view)]
            what = f"distances < {zoom:g}, shared scale" if view == "zoom" else "full range, log scale"
            figures.append(plot_sample(h, info, f"{head}\n{what}", log,
                                       out_dir / f"routing-{i}-{view}.png"))
    csvs = [out_dir / "votes.csv", out_dir / "histograms.csv", out_dir / "summary.csv"]
    for frame, path in zip((votes, hist, summary), csvs, strict=True):
        frame.to_csv(path, index=False, float_format="%.6g")
    return InspectResult(figures, csvs, summary)
