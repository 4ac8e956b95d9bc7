"""EM routing (Procedure 1 of Hinton, Sabour & Frosst, ICLR 2018) and the capsule layers.

Layout and speed
----------------
A capsule layer with ``L`` output positions, ``C`` parent capsule types and ``J`` child
slots per output position (``J = K*K*B`` for a KxK convolutional capsule layer over ``B``
child types, ``J = H*W*D`` for the class layer) routes a vote tensor of shape
``(N, L, C, J, 16)``. Routing is bound by its passes over vote-sized tensors, so it is
organised to touch them as few times as possible:

- Votes are ONE bmm per slot, ``(N*L, 16) @ kron(I_4, W)`` (16, C*16), which writes them
  slot-major ``(J, N, L, C, 16)``; the routing reads them in place through an
  ``(N, L, C, J, 16)`` view (each parent's ``(J, 16)`` block has rows ``N*L*C*16`` apart,
  which ``bmm`` accepts), so no permuted copy of the votes is made.
  :func:`em_routing_slots` goes further: it takes the child poses and the per-slot vote
  matrices and makes each sample chunk's votes just before routing it (and again in the
  backward, where the chunk's vote gradient goes straight into the pose and weight
  gradients), so neither the votes nor their gradient ever exist for the whole batch
  (capsnet's ConvCaps1: 680 MB each, page-faulted afresh on every call).
- Native passes (the CPU default, :mod:`robustcaps.models.native`): small C kernels,
  built on first use with the system compiler, read each vote row (16 elements, one
  vector) straight from the votes in either layout. One kernel call is a whole iteration
  for a block of 8 parents: the weighted moments about a reference ``c`` (with the first
  iteration's weighted mean computed in the same call), the M-step algebra below, and the
  E-step log terms, the block's votes coming from L2 for every pass after the first. So a
  forward reads the votes T times (plus the first mean) and writes nothing vote-sized;
  only the per-child E-step normaliser (a fold over parents) stays in torch, between
  iterations. The reference of every M-step after the first is the previous iteration's
  mean, and a parent whose mean still moves more than ``sqrt(RECENTRE_RATIO)`` sigma is
  recomputed about its new mean, per parent (free: there is no U to rebuild). The
  backward's products (``d rw_t = dS_t [V - c, (V - c)^2]^T``, ``dw_t = de_t [..]``) and
  the vote gradient (every product with its own ``c``) are kernels too. Without a
  compiler, on CUDA, or with ``ROBUSTCAPS_NATIVE=0`` the torch passes below run instead
  (same results to rounding; both are tested against the loop oracle).
- Torch passes, centred moments: per parent a constant reference ``c`` (the first
  M-step's mean) and ``U = [V - c, (V - c)^2]`` (m, J, 32), built once. Each M-step is
  then ONE bmm ``rw (1, J) @ U`` giving both moments (mean and variance by exact
  identities, see :func:`_route`), each E-step ONE bmm ``[d/var, -1/(2 var)] @ U^T``.
  ``U`` is rebuilt about the current means when a mean moves more than ~32 sigma from
  ``c`` (``RECENTRE_RATIO``), so float32 keeps its precision on tight clusters (tested
  against float64).
- Hand-written backward (:class:`_EMRouting`): when an input needs a gradient, the
  forward keeps per chunk the per-parent moments of every M-step and the assignments
  ``R_t`` of the later ones; the backward sweeps the iterations in reverse in closed form
  (no re-run of the forward routing, no autograd): ``d rw_t = dS_t U^T`` and
  ``dw_t = de_t U``, then ``dL/dV = dU[:16] + 2 (V - c) dU[16:]`` with ``dL/dU`` for all
  iterations as ONE bmm (torch passes; the native kernel does the same sum per vote row).
  First derivatives only (``once_differentiable``); :func:`em_routing_autograd` is the
  same computation as a plain autograd graph (used for ``torch.compile`` and as a test
  oracle).
- Chunks on the CPU: the routing runs over sample chunks, vectorised inside a chunk.
  Torch passes: as many images as keep their ``U`` within ``CPU_CHUNK_BYTES`` (6 MB, at
  least 1), so ``U`` stays in L2/L3 across the iterations. Native passes: as many as keep
  their votes within ``NATIVE_CHUNK_BYTES`` (12 MB), to amortise the per-chunk torch ops
  (the kernels block for the cache themselves). On CUDA the whole batch is one chunk.
- Threads: with ``torch.get_num_threads() > 1`` a layer's chunks run on that many Python
  threads (at most ``MAX_CHUNK_THREADS`` = 4; a pool; torch ops and the kernels release
  the GIL), each running its ops single-threaded (``CHUNK_THREADS``; False splits every
  op over torch's intra-op threads instead, which made 2 threads 0.1-0.3x of 1 on a
  loaded shared CPU). ``robustcaps bench routing --threads 1 --threads 2 [--intra-op]
  [--torch-passes]`` measures the alternatives.
- Measured (``robustcaps bench routing``, 2-core Intel Xeon KVM guest, idle, batch 32,
  3 iterations, 2 threads, forward / forward + input gradient img/s, medians of 5 and 2
  runs): native passes capsnet-small 510 / 145.5, capsnet 111 / 27.5; torch passes
  180 / 71.5 and 38.5 / 13.9 (the README has the ranges and the 1-thread figures). On
  that machine the kernels read about 4-5 G vote elements/s per core, near its memory
  bandwidth for the first pass; the remaining cost is mostly the per-chunk torch ops of
  the normaliser and the backward's per-parent algebra.
The only Python loops are over the routing iterations and the sample chunks.

Convolutional routing, as in Section 4
---------------------------------------
A child capsule feeds every parent type at every output position whose KxK receptive
field contains it. Its assignment probabilities are normalised over *all* those parents
(``R_ij = a_j p_ij / sum_k a_k p_ik`` with ``k`` running over every (position, type) the
child feeds), so border children, which feed fewer positions, receive fewer feedbacks
(corner children of a stride-1 layer: one position). The per-child normaliser is a fold
(``index_add`` over the overlapping windows) of per-slot sums over parent types, made
stable by a per-child shift (the child's largest term over all its parents, found with
``scatter_reduce`` ``amax``; the shift cancels exactly, so no gradient flows through it). The initial
assignment of Procedure 1 line 2 is ``R_ij = 1 / |parents(i)|``: uniform over the parents a
child actually feeds, i.e. ``1 / (C * number of windows containing i)``.

Constants the paper leaves open (and why these values)
------------------------------------------------------
``final_lambda = 0.01`` and the schedule ``lambda_t = final_lambda * (t + 1) / T`` for
    iteration ``t = 0..T-1``: the paper only says lambda increases on a fixed schedule. A
    linear ramp that always *ends* at the same value makes the final activations of a
    1-iteration and a 5-iteration network live on the same scale (needed for the Table 1
    ablation), while early iterations stay soft so that every parent still takes part.
    0.01 (the value public implementations use) keeps a freshly initialised network out
    of saturation: its logits are ``-lambda * mass * sum_h log sigma_h`` and deep poses are
    small (sigma ~ 0.05), which gave logits of 25-100 (all activations ~1, zero gradients)
    at lambda = 1, and mean activations 0.5-0.59 per layer at 0.01. Training can still
    reach confident outputs through beta_a and small variances (up to lambda*mass*74 nats
    with the floor below).
Data normalisation (``data_scale``): the amount of data a parent receives,
    ``sum_i R_ij a_i``, is divided by ``kappa = (number of children that feed the layer) /
    (number of parents)``, the amount every parent would receive if all children were
    active and assigned uniformly (ConvCaps1 at 32x32 input: 13*13*B/(6*6*C); ConvCaps2:
    6*6*C/(4*4*D); class layer: 4*4*D/E = 102.4 for D=32, E=5). Without it the cost term
    of the class layer is ~100x that of a 3x3 conv capsule and a single lambda cannot suit
    both. This is exactly Procedure 1 with a per-layer ``lambda / kappa`` and ``kappa *
    beta_a``; since beta_a is learned it changes the conditioning, not the model family.
    The mass still weights the cost, so parents that receive more data pay more (or gain
    more), as in Eq. 2.
``beta_a, beta_u``: one pair per output capsule *type* (shared over positions, as the
    transformation matrices are), initialised to 0, so the initial logit is
    ``-lambda * mass * sum_h log sigma_h``. ``beta_u`` enters as
    ``cost_h = (beta_u + log sigma_h) * mass`` (Procedure 1, M-step line 5).
``var_floor = 1e-4`` added to every variance ``sigma_h^2`` (so ``sigma_h >= 0.01``): a
    parent that receives one vote, or identical votes, would otherwise get a zero
    variance, an infinite log density and NaN gradients. It bounds ``1 / sigma^2 <= 1e4``,
    far below the pose scale of trained networks where it would bias the fit.
``mass_eps = 1e-8`` added to the amount of data in the mean/variance denominators: a
    parent whose children are all inactive then gets mean 0, variance ``var_floor`` and
    activation ``sigmoid(lambda * beta_a)`` instead of 0/0.
The last iteration ends after its M-step: Procedure 1's final E-step computes assignments
    nobody uses. The returned ``R`` is the assignment the final M-step used.
Log-space E-step: ``log a_j`` is ``logsigmoid`` of the parent's logit and ``log p_ij`` the
    Gaussian log density, so saturated activations and far outliers never under/overflow.
Coordinate Addition: the centre of the receptive field (in input pixels, pixel centres at
    ``+0.5``) of each last-conv-layer capsule, divided by the input height (row) and width
    (column), i.e. scaled into [0, 1], is added to vote elements ``(0, 3)`` (row) and
    ``(1, 3)`` (column), the first two elements of the right-hand column. With vector poses
    the same flat positions 3 and 7 are used (a vector pose has no columns; any two fixed
    positions are equivalent up to a permutation of the transformation's rows).
Pose ``"vector"`` (Table 1 ablation): a 16-vector pose with a full 16x16 transformation per
    (child type, parent type, kernel offset), as vector capsules use; a 4x4 matrix
    transform is the special case ``kron(I_4, W)``, so this isolates the matrix structure
    (at 16x the transformation parameters).
Weight init: transformation matrices ``N(0, 1/t)`` with ``t`` the inner dimension (4 for
    matrices, 16 for vectors), so a vote has the scale of the child pose.

Routing presets (``CapsNet(routing=...)``, ``--arch-kw routing=...``, on the model card)
----------------------------------------------------------------------------------------
``paper`` (the default; every zoo checkpoint trained before it existed): everything above,
bit for bit. ``authors``: the choices of the authors' released code (google-research,
folder ``capsule_em``; each constant checked there):

- E-step normaliser per parent type (:class:`Fold` ``per_type``): ``em_layers.py``
  ``update_conv_routing`` divides ``prior_exp`` by its sum over the overlapping patches
  for each ``output_dim`` separately, so types never compete for a child; the class layer
  (``update_em_routing``) takes a softmax over the classes, as here. The first assignment
  is ``1 / C`` (a softmax over the types of zeros), ``initial="types"``.
- Logit ``beta (masses (-sum_h log var_h - 16 (ln 2 pi + 1) sigma_bias) - 5000 act_bias)``
  (``update_conv_routing``/``update_em_routing``). That cost sums log variances where
  Procedure 1's sums log sigmas, so it is Procedure 1's logit with lambda ``2 beta``,
  ``beta_a = 2500 x`` the parameter and ``beta_u = (ln 2 pi + 1) / 2 x`` the parameter per
  pose element (the ``authors`` preset's ``lambda_scale``, ``beta_a_scale``,
  ``beta_u_scale``; the parameter sign is Procedure 1's: ``beta_a`` is minus the authors'
  activation bias). Initial values (``conv_capsule_mat``, ``connector_capsule_mat``):
  activation bias 0.5 (conv) / 1.0 (class), sigma bias 0.5 / 2.0.
- Lambda ``final_beta (1 - 0.95^(t + 1))``, ``final_beta`` 0.01 (``experiment.py`` flag),
  divided by 4 in the class layer (``connector_capsule_mat``); no kappa (raw masses).
- Variance floor ``min_var = 5e-4`` (both layer functions).
- Initial standard deviations (truncated normals, ``utils.py`` ``weight_variable``): conv1
  0.05, bias 0.1 (``simple_model.py``); primary poses 0.5, activations 3.0, no bias
  (``em_layers.py`` ``primary_caps``); conv-capsule transforms 0.3, class transforms 0.01.
- Primary activations ``sigmoid(x - 1)`` (``primary_caps``).
- Coordinate addition: the receptive-field centre's pixel offset from the image centre,
  / 100 (``simple_model.py`` ``add_convs``/``conv_pos``), on vote elements 0 and 1
  (``connector_capsule_mat`` concatenates the grid in front of zeros).

``authors-smooth``: ``authors`` plus the means smoothed as ``0.9 new + 0.1 old`` (the old
centre 0 before the first M-step), the variance and the E-step taken about the smoothed
centre (both routing functions of ``em_layers.py``); ``authors`` itself leaves it out (the
zoo's 3-iteration retraining started before it existed, and a preset's function never
changes under a checkpoint). Not in either (left as ``paper``): the mass epsilons (1e-7 conv, 1e-5 class; here 1e-8); and the
training recipe (``layers.py``: spread-loss margin ``0.2 + 0.79 sigmoid(min(10, step / 50000
- 4))``; ``utils.py``: weight decay 2e-7; Adam 3e-3 decayed 0.96 every 20k steps, batch 64),
which ``robustcaps train`` keeps as Section 5 describes.

``pertype`` (mixed): the per-type normaliser with everything else as ``paper`` (kappa
counts the C-fold mass a per-type normaliser hands out, the first assignment is uniform
over a child's windows). Which trains best: the table in :mod:`robustcaps.models.capsnet`.

Surrogates for attacks: :func:`routing_surrogate` (``"bpda"``, ``"bpda-last"``,
``"uniform"``), on any capsule network robustcaps builds.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from robustcaps.models import native

VAR_FLOOR = 1e-4
MASS_EPS = 1e-8
LOG_2PI = math.log(2.0 * math.pi)


def lambda_schedule(iterations: int, final_lambda: float = 0.01,
                    schedule: str = "linear") -> list[float]:
    """Inverse temperatures for iterations ``0..T-1``.

    ``"linear"`` (preset ``paper``): a ramp ending at ``final_lambda``;
    ``"authors"``: ``final_lambda * (1 - 0.95^(t + 1))`` (capsule_em/em_layers.py,
    ``update_conv_routing`` and ``update_em_routing``), which does not depend on T.
    """
    if schedule == "linear":
        return [final_lambda * (t + 1) / iterations for t in range(iterations)]
    if schedule == "authors":
        return [final_lambda * (1.0 - 0.95 ** (t + 1)) for t in range(iterations)]
    raise ValueError(f"schedule must be 'linear' or 'authors', got {schedule!r}")


@dataclass
class RoutingResult:
    """Output of :func:`em_routing`.

    poses: (N, L, C, 16) parent means; logits: (N, L, C) pre-sigmoid activations;
    R: (N, L, C, J) assignment probabilities used by the final M-step.
    """

    poses: torch.Tensor
    logits: torch.Tensor
    R: torch.Tensor


class Fold:
    """Which child each convolutional slot holds, for the per-child E-step normaliser.

    Slots are ``(L, KK, B)`` with ``B`` innermost; ``index`` (L*KK,) maps a slot's spatial
    part to a child position in ``[0, n_pos)``; ``count`` (L*KK,) is how many windows
    contain that child position.

    ``per_type`` (routing preset ``authors``): a child's assignments are normalised over
    the windows that contain it separately for each parent type (types never compete
    for a child; capsule_em/em_layers.py ``update_conv_routing`` sums ``prior_exp`` over
    the overlapping patches per ``output_dim``), instead of over every (window, type).
    ``initial``: Procedure 1's first assignment, ``"parents"`` ``1 / |parents(i)|``
    (paper), ``"types"`` ``1 / C`` (the authors' softmax over parent types of zeros) or
    ``"windows"`` ``1 / (number of windows containing i)`` (uniform for the per-type
    normaliser).
    """

    def __init__(self, index: torch.Tensor, n_pos: int, types: int, *, per_type: bool = False,
                 initial: str = "parents") -> None:
        if initial not in ("parents", "types", "windows"):
            raise ValueError(f"initial must be 'parents', 'types' or 'windows', got {initial!r}")
        self.index = index
        self.n_pos = n_pos
        self.types = types
        self.per_type, self.initial = per_type, initial
        counts = torch.bincount(index, minlength=n_pos)
        self.count = counts[index]
        self.n_covered = int((counts > 0).sum()) * types

    def to(self, device: torch.device) -> Fold:
        if self.index.device == device:
            return self
        new = Fold.__new__(Fold)
        new.index, new.count = self.index.to(device), self.count.to(device)
        new.n_pos, new.types, new.n_covered = self.n_pos, self.types, self.n_covered
        new.per_type, new.initial = self.per_type, self.initial
        return new


def _type_index(fold: Fold, L: int, C: int) -> torch.Tensor:
    """(L*C*KK,) index of the per-type fold: slot (l, c, kk) -> ``c * n_pos + child position``,
    so (n, L, C, J) folds per parent type with ONE index_add over its (L, C, KK) rows, in
    place, without a transposed copy. Cached on the fold per C."""
    cache = fold.__dict__.setdefault("_type_index", {})
    if C not in cache:
        pos = fold.index.reshape(L, 1, -1)
        types = torch.arange(C, device=pos.device).reshape(1, C, 1) * fold.n_pos
        cache[C] = (pos + types).reshape(-1)
    return cache[C]


def _per_type_fold(x: torch.Tensor, fold: Fold, reduce: str) -> torch.Tensor:
    """x (n, L, C, J) -> (n, L, C, J): the sum (or max) of x over the slots holding the same
    child for the same parent type, broadcast back to those slots."""
    n, L, C, J = x.shape
    b = fold.types
    idx = _type_index(fold, L, C)
    rows = x.reshape(n, -1, b)  # (n, L*C*KK, B)
    if reduce == "sum":
        acc = rows.new_zeros((n, C * fold.n_pos, b)).index_add_(1, idx, rows)
    else:
        acc = rows.new_full((n, C * fold.n_pos, b), -math.inf)
        acc.scatter_reduce_(1, idx.reshape(1, -1, 1).expand_as(rows), rows, "amax")
    return acc.index_select(1, idx).reshape(n, L, C, J)


def _child_shift(z: torch.Tensor, fold: Fold | None) -> torch.Tensor:
    """(n, L, 1, J): each child's largest term of z (n, L, C, J) over every parent it feeds
    (over the parent types at its position, then, with ``fold``, over all its slots)."""
    n, L, C, J = z.shape
    if fold is not None and fold.per_type:  # (n, L, C, J): per child and parent type
        return _per_type_fold(z, fold, "amax")
    shift = z.amax(2)  # (n, L, J)
    if fold is not None:
        b = fold.types
        s = shift.reshape(n, -1, b)  # (n, L*KK, B)
        idx = fold.index.reshape(1, -1, 1).expand_as(s)
        child = s.new_full((n, fold.n_pos, b), -math.inf).scatter_reduce_(1, idx, s, "amax")
        shift = child.index_select(1, fold.index).reshape(n, L, J)
    return shift[:, :, None, :]


def _normalise(z: torch.Tensor, fold: Fold | None) -> torch.Tensor:
    """E-step normaliser. z: (N, L, C, J) = log a_j + log p_ij -> R (N, L, C, J).

    Without ``fold`` every slot is a distinct child that feeds exactly the C parents at its
    position; with it, a child's terms are summed over every slot it occupies. Each child's
    terms are shifted by their maximum (which cancels exactly, so it carries no gradient):
    every exponent is <= 0 and each child's total is >= 1, so nothing over- or underflows.
    """
    with torch.no_grad():
        shift = _child_shift(z, fold)
    e = torch.exp(z - shift)
    return e / _fold_sum(e, fold)


def _initial_R(votes: torch.Tensor, fold: Fold | None) -> torch.Tensor:
    """Procedure 1 line 2: (1, L, 1, J) (or (1, 1, 1, J)) uniform over each child's parents
    (or as ``fold.initial`` says)."""
    _, L, C, J, _ = votes.shape
    if fold is None or fold.initial == "types":
        return votes.new_full((1, 1, 1, J), 1.0 / C)
    cnt = fold.count.to(votes.dtype).reshape(1, L, 1, -1, 1)
    per = 1.0 / cnt if fold.initial == "windows" else 1.0 / (C * cnt)
    return per.expand(1, L, 1, cnt.shape[3], fold.types).reshape(1, L, 1, J)


def _reference_mean(votes: torch.Tensor, rw0: torch.Tensor) -> torch.Tensor:
    """Reference ``c`` (m, 1, H) of the centred moments, no autograd.

    votes: (n, L, C, J, H); rw0: (n, L, 1, J) the first M-step's weights ``R_ij a_i``.
    ``c`` is that M-step's mean, so every later mean stays close to it and the moments
    about ``c`` lose no precision. The routing is mathematically independent of ``c``, so
    it is a constant for autograd.
    """
    n, L, C, J, H = votes.shape
    m = n * L * C
    with torch.no_grad():
        rw = rw0.expand(n, L, C, J).reshape(m, 1, J)
        return torch.bmm(rw, votes.reshape(m, J, H)) / (rw.sum(-1, keepdim=True) + MASS_EPS)


def _build_u(v: torch.Tensor, c: torch.Tensor, buf: torch.Tensor | None = None) -> torch.Tensor:
    """U = [v - c, (v - c)^2] (m, J, 2H) for v (m, J, H), c (m, 1, H) constant.

    Without autograd it is written into ``buf`` (or a new buffer) in two passes; under
    autograd (the ``torch.compile`` path) it is an ordinary differentiable ``cat``.
    """
    m, J, H = v.shape
    if torch.is_grad_enabled() and v.requires_grad:
        dv = v - c
        return torch.cat((dv, dv * dv), -1)
    with torch.no_grad():
        if buf is None:
            U = v.new_empty(m, J, 2 * H)
        else:
            U = buf.reshape(-1)[: m * J * 2 * H].view(m, J, 2 * H)
        torch.sub(v, c, out=U[..., :H])
        torch.mul(U[..., :H], U[..., :H], out=U[..., H:])
    return U


# Re-centre U about the current means when some parent's mean has moved more than
# sqrt(RECENTRE_RATIO) ~ 32 standard deviations (in some pose element) from the reference:
# the cancellation in the centred moments costs about eps * d^2 / var relative precision in
# var (float32: <= 1e-4 below this ratio). At random init this fires in ~1 chunk in 8.
RECENTRE_RATIO = 1000.0


def _route(
    V: torch.Tensor,
    U: torch.Tensor,
    c: torch.Tensor,
    a: torch.Tensor,
    R0: torch.Tensor,
    beta_a: torch.Tensor,
    beta_u: torch.Tensor,
    lambdas: list[float],
    fold: Fold | None,
    data_scale: float,
    var_floor: float,
    shape: tuple[int, int, int, int],
    hold: str | None = None,
    smooth: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Procedure 1 on the centred moments ``U`` (m, J, 2H) of the votes V (m, J, H) about
    the constant ``c`` (m, 1, H).

    a: (n, L, 1, J) child activations; R0: initial assignment broadcastable to (n, L, C, J);
    shape: (n, L, C, J). Every M-step is one ``bmm`` ``(1, J) @ (J, 2H)`` per parent giving
    ``S1 = sum r (V - c)`` and ``S2 = sum r (V - c)^2``; with ``d = mu - c = (S1 - eps c) /
    denom`` (``mu = sum r V / (mass + eps)``), ``sum r (V - mu)^2 = S2 - d (2 S1 - d mass)``
    exactly (clamped at 0 against rounding).
    Every E-step is one ``bmm`` ``(1, 2H) @ (2H, J)``: ``-0.5 sum_h (V - mu)^2 / var =
    [d / var, -0.5 / var] @ U^T - 0.5 sum_h d^2 / var``.
    Re-centring (float32 precision when a mean moves far from ``c``): every M-step after
    the first rebuilds U about the current means (still constants for autograd, so the
    algebra and the gradients are unchanged), branch-free for ``torch.compile``; the
    eager :func:`_forward_chunk` re-centres only past ``RECENTRE_RATIO``.
    hold: ``"all"`` uses every assignment as a constant for autograd (BPDA), ``"last"`` only
    the one the final M-step uses (see :func:`routing_surrogate`); the values are unchanged.
    Returns mu (n, L, C, H), logits (n, L, C), R (n, L, C, J) of the final M-step.
    """
    n, L, C, J = shape
    m, _, H2 = U.shape
    H = H2 // 2
    ba = beta_a.reshape(1, 1, C)
    bu = beta_u.reshape(1, 1, C)
    R = R0

    prev = torch.zeros_like(c)  # the previous centre (mean smoothing)

    def moments(rw, U, c, mass, denom):  # noqa: ANN001, ANN202
        S = torch.bmm(rw, U)  # (m, 1, 2H)
        S1, S2 = S[..., :H], S[..., H:]
        d = (S1 - MASS_EPS * c) / denom  # mu - c, mu = sum r V / denom
        if smooth != 1.0:  # the centre: smooth * mean + (1 - smooth) * previous centre
            d = smooth * d + (1.0 - smooth) * (prev - c)
        return d, (S2 - d * (2.0 * S1 - d * mass)).clamp_min(0.0) / denom + var_floor

    for t, lam in enumerate(lambdas):
        # ---- M-step: one bmm per parent for both moments
        if hold == "all" or (hold == "last" and t == len(lambdas) - 1):
            R = R.detach()
        rw = (R * a).expand(n, L, C, J).reshape(m, 1, J)  # R_ij * a_i
        mass = rw.sum(-1, keepdim=True)  # (m, 1, 1)
        denom = mass + MASS_EPS
        d, var = moments(rw, U, c, mass, denom)
        if t:  # re-centre about the means just found, then recompute
            c = (c + d).detach()
            U = _build_u(V, c, None)
            d, var = moments(rw, U, c, mass, denom)
        prev = c + d
        mu = prev.reshape(n, L, C, H)
        log_var = var.log()
        sum_log_sigma = 0.5 * log_var.sum(-1).reshape(n, L, C)
        cost = (H * bu + sum_log_sigma) * (mass.reshape(n, L, C) / data_scale)
        logits = lam * (ba - cost)
        if t == len(lambdas) - 1:
            break
        # ---- E-step: one bmm per parent, in log space
        inv = var.reciprocal()  # (m, 1, H)
        w = torch.cat((d * inv, -0.5 * inv), -1)  # (m, 1, 2H)
        e = torch.bmm(w, U.transpose(1, 2))  # (m, 1, J); 3x faster than U @ w^T on MKL
        const = -0.5 * (d * d * inv).sum(-1) - sum_log_sigma.reshape(m, 1) - 0.5 * H * LOG_2PI
        z = (e.reshape(m, J) + const).reshape(n, L, C, J) + F.logsigmoid(logits)[..., None]
        R = _normalise(z, fold)
    return mu, logits, R.expand(n, L, C, J)

# Samples routed together on the CPU (cache blocking): as many as keep the chunk's
# centred moments ``U`` (2x its votes) within CPU_CHUNK_BYTES, at least 1, so every routing
# pass stays in L2/L3 instead of streaming the whole batch from DRAM 2T-1 times
# (capsnet-small ConvCaps1: 5.3 MB per image -> 1 image, 1.03-1.08x faster than 2; the
# class layer: 0.16 MB -> the whole batch, 3-7x faster than 1 image at a time). With chunk
# threads the batch is split into at least one chunk per thread. Chosen by measurement
# (robustcaps bench routing); on CUDA the whole batch is one chunk.
CPU_CHUNK_BYTES = 6 * 2**20
# The native passes keep only a block of parents' votes in cache, whatever the chunk, so
# their chunks are sized to amortise the per-chunk torch ops instead: as many samples as
# keep the chunk's VOTES within NATIVE_CHUNK_BYTES (capsnet-small ConvCaps1: 2.6 MB per
# image -> 4 images; capsnet's 21 MB -> 1). Measured (2-core Xeon, capsnet-small, 2
# threads, forward / forward+backward img/s): 1 image 349 / 98, 2: 468 / 133, 4: 516 /
# 142, 8: 369 / 105.
NATIVE_CHUNK_BYTES = 12 * 2**20


@dataclass(frozen=True)
class _Config:
    lambdas: tuple[float, ...]
    fold: Fold | None
    data_scale: float
    var_floor: float
    chunk: int
    keep: bool = True  # False: no gradient can be asked for (grad mode off), save nothing
    native: bool = False  # passes over the votes by robustcaps.models.native
    smooth: float = 1.0  # mean smoothing: centre = smooth * mean + (1 - smooth) * previous


def _chunks(n: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def _fold_sum(x: torch.Tensor, fold: Fold | None) -> torch.Tensor:
    """Per-child sum over every parent the child feeds, broadcast back to its slots.

    x: (n, L, C, J) -> (n, L, 1, J) (sum over parent types, then, with ``fold``, over every
    slot the child occupies); with a per-type fold (n, L, C, J), the sum over the slots the
    child occupies for each parent type separately.
    """
    if fold is not None and fold.per_type:
        return _per_type_fold(x, fold, "sum")
    total = x.sum(2)  # (n, L, J)
    if fold is not None:
        n, L, J = total.shape
        b = fold.types
        t = total.reshape(n, -1, b)
        t = t.new_zeros((n, fold.n_pos, b)).index_add_(1, fold.index, t)
        total = t.index_select(1, fold.index).reshape(n, L, J)
    return total[:, :, None, :]


def _normalise_(z: torch.Tensor, fold: Fold | None, use_native: bool = False) -> torch.Tensor:
    """:func:`_normalise` in place on z (n, L, C, J) (no autograd): returns R in z's storage.
    ``use_native``: the per-type normaliser as one native kernel (three passes over z; the
    torch ops below fold C times more data than the paper's normaliser, 5x its time)."""
    if use_native and fold is not None and fold.per_type:
        return native.norm_type_(z, fold.index, fold.n_pos, fold.types)
    z.sub_(_child_shift(z, fold)).exp_()
    return z.div_(_fold_sum(z, fold))


@dataclass
class _Step:
    """What the backward needs of one M-step (and the E-step that follows it), per chunk.

    c: (m, 1, H) reference of the U it used; S: (m, 1, 2H) moments; mass: (m, 1, 1);
    d = mu - c, var: (m, 1, H); q: (m, 1, H) unclamped centred second moment;
    sls: (m, 1) 0.5 sum_h log var; logits: (n, L, C); R: (n, L, C, J) the assignment this
    M-step used (None for the constant initial one).
    """

    c: torch.Tensor
    S: torch.Tensor
    mass: torch.Tensor
    d: torch.Tensor
    var: torch.Tensor
    q: torch.Tensor
    sls: torch.Tensor
    logits: torch.Tensor
    R: torch.Tensor | None
    w: torch.Tensor | None = None  # (m, 1, 2H) E-step weights [d / var, -0.5 / var]


def _forward_chunk(votes: torch.Tensor, a_in: torch.Tensor, beta_a: torch.Tensor,
                   beta_u: torch.Tensor, cfg: _Config, buf: torch.Tensor | None,
                   steps: list[_Step] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Procedure 1 for one sample chunk, no autograd (the same algebra as :func:`_route`).

    votes: (n, L, C, J, H), a_in: (n, L, J); buf: storage for U. With ``steps`` (a list)
    every M-step's :class:`_Step` is appended for :meth:`_EMRouting.backward`.
    Returns mu (n, L, C, H), logits (n, L, C), R (n, L, C, J).
    """
    if cfg.native:
        return _forward_chunk_native(votes, a_in, beta_a, beta_u, cfg, steps)
    n, L, C, J, H = votes.shape
    m = n * L * C
    fold, lambdas, ds, floor = cfg.fold, cfg.lambdas, cfg.data_scale, cfg.var_floor
    R0 = _initial_R(votes, fold)
    a = a_in[:, :, None, :]
    V = votes.reshape(m, J, H)
    rw = (R0 * a).expand(n, L, C, J).reshape(m, 1, J)
    mass = rw.sum(-1, keepdim=True)  # (m, 1, 1)
    denom = mass + MASS_EPS
    c = torch.bmm(rw, V).div_(denom)  # (m, 1, H)
    U = _build_u(V, c, buf)
    bu_h = (H * beta_u).reshape(1, 1, C)
    ba = beta_a.reshape(1, 1, C)
    R = None
    last = len(lambdas) - 1
    sm = cfg.smooth
    prev = torch.zeros_like(c)  # the previous centre (mean smoothing)
    for t, lam in enumerate(lambdas):
        if t:
            rw = (R * a).reshape(m, 1, J)
            mass = rw.sum(-1, keepdim=True)
            denom = mass + MASS_EPS
        for attempt in range(2):
            S = torch.bmm(rw, U)  # (m, 1, 2H)
            S1 = S[..., :H]
            d = (S1 - MASS_EPS * c).div_(denom)
            if sm != 1.0:
                d = sm * d + (1.0 - sm) * (prev - c)
            q = S[..., H:] - d * (2.0 * S1 - d * mass)
            var = q.clamp_min(0.0).div_(denom).add_(floor)
            if attempt or t == 0 or not bool((d * d / var).amax() > RECENTRE_RATIO):
                break
            c = c + d
            U = _build_u(V, c, buf)
        mu = c + d
        prev = mu
        sls = 0.5 * var.log().sum(-1)  # (m, 1)
        logits = lam * (ba - (bu_h + sls.view(n, L, C)) * (mass.view(n, L, C) / ds))
        if steps is not None:
            steps.append(_Step(c, S, mass, d, var, q, sls, logits, R))
        if t == last:
            break
        inv = var.reciprocal()
        w = torch.cat((d * inv, -0.5 * inv), -1)  # (m, 1, 2H)
        if steps is not None:
            steps[-1].w = w
        e = torch.bmm(w, U.transpose(1, 2))  # (m, 1, J)
        const = -0.5 * (d * d * inv).sum(-1) - sls - 0.5 * H * LOG_2PI  # (m, 1)
        z = e.view(m, J).add_(const).view(n, L, C, J).add_(F.logsigmoid(logits)[..., None])
        R = _normalise_(z, fold, cfg.native)
    if R is None:
        R = R0.expand(n, L, C, J)
    return mu.view(n, L, C, H), logits, R


def _forward_chunk_native(votes: torch.Tensor, a_in: torch.Tensor, beta_a: torch.Tensor,
                          beta_u: torch.Tensor, cfg: _Config,
                          steps: list[_Step] | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_forward_chunk` with each iteration's M-step and E-step terms as ONE native
    pass (:func:`robustcaps.models.native.iteration`): no U; every M-step after the first is
    centred on the previous iteration's means, and a parent whose mean still moves more
    than ``sqrt(RECENTRE_RATIO)`` sigma is recomputed about its new mean (per parent)."""
    n, L, C, J, H = votes.shape
    m = n * L * C
    fold, lambdas = cfg.fold, cfg.lambdas
    R0 = _initial_R(votes, fold)
    V = votes.reshape(m, J, H)
    a_flat = a_in.reshape(n * L, J).contiguous()
    rows = (R0 * a_in[:, :, None, :]).reshape(n * L, J)  # R0 a, shared by a position's parents
    ba = beta_a.contiguous()
    buh = (H * beta_u).contiguous()
    R, c0, rdiv, A = None, None, C, None
    last = len(lambdas) - 1
    for t, lam in enumerate(lambdas):
        # c0, the previous centre, is also the one mean smoothing blends with
        o = native.iteration(V, rows, c0, rdiv=rdiv, A=A, adiv=C, C=C, beta_a=ba, buh=buh,
                             lam=lam, data_scale=cfg.data_scale, var_floor=cfg.var_floor,
                             eps=MASS_EPS, ratio=RECENTRE_RATIO, estep=t != last,
                             prev=c0, alpha=cfg.smooth)
        c, d = o["c"].view(m, 1, H), o["d"].view(m, 1, H)
        logits = o["logit"].view(n, L, C)
        if steps is not None:
            steps.append(_Step(c, o["S"].view(m, 1, 2 * H), o["mass"].view(m, 1, 1), d,
                               o["var"].view(m, 1, H), o["q"].view(m, 1, H),
                               o["sls"].view(m, 1), logits, R,
                               o["w"].view(m, 1, 2 * H) if t != last else None))
        if t == last:
            break
        R = _normalise_(o["z"].view(n, L, C, J), fold, True)
        rows, rdiv, A = R.view(m, J), 1, a_flat
        c0 = (c + d).view(m, H)
    if R is None:
        R = R0.expand(n, L, C, J)
    return (c + d).view(n, L, C, H), logits, R


def _backward_chunk(votes: torch.Tensor, a_in: torch.Tensor, beta_u: torch.Tensor,
                    cfg: _Config, steps: list[_Step], g_mu: torch.Tensor | None,
                    g_logits: torch.Tensor | None, g_R: torch.Tensor | None,
                    g_votes: torch.Tensor, g_a: torch.Tensor, g_ba: torch.Tensor,
                    g_bu: torch.Tensor, buf: torch.Tensor) -> None:
    """Reverse sweep of :func:`_forward_chunk` by hand, one chunk.

    The per-parent/per-slot algebra is differentiated in closed form; the products with
    ``U`` are ``d rw_t = dS_t @ U^T`` (M-steps) and ``dw_t = de_t @ U`` (E-steps), and
    ``dL/dU = sum_t rw_t^T dS_t + de_t^T w_t`` is ONE bmm per U (one U unless the forward
    re-centred), then ``dL/dV = dU[:H] + 2 (V - c) dU[H:]`` is written into ``g_votes``
    (n, L, C, J, H). With ``cfg.native`` the products and ``dL/dV`` (each row with its own
    ``c``) are the native kernels and no U is built. g_a (n, L, J), g_ba, g_bu (C,) are
    accumulated into.
    """
    n, L, C, J, H = votes.shape
    m = n * L * C
    fold, lambdas, ds, sm = cfg.fold, cfg.lambdas, cfg.data_scale, cfg.smooth
    V = votes.reshape(m, J, H)
    gv = g_votes.reshape(m, J, H)  # a view (same strides as votes)
    R0 = _initial_R(votes, fold)
    a = a_in[:, :, None, :]
    bu_h = (H * beta_u).reshape(1, 1, C)
    new = votes.new_zeros
    gl = g_logits if g_logits is not None else new(n, L, C)
    gd = g_mu.reshape(m, 1, H) if g_mu is not None else new(m, 1, H)
    gvar = new(m, 1, H)
    gsls = new(m, 1)
    gR = g_R
    cur_c: torch.Tensor | None = None
    U = None
    # dL/dU = left^T @ right: row k of left (m, K, J) / right (m, K, 2H) is (rw_t, dS_t)
    # for an M-step and (de_t, w_t) for an E-step, written in place as the sweep goes
    K = 2 * len(lambdas) - 1
    left = votes.new_empty(m, K, J)
    right = votes.new_empty(m, K, 2 * H)
    nat = cfg.native
    cs = votes.new_empty(m, K, H) if nat else None  # native: each row's reference c
    k = 0
    first = True
    U_buf, dU_buf = (None, None) if buf is None else (buf[0], buf[1])

    def flush() -> None:  # dV += dU[:H] + 2 (V - c) dU[H:] for the current U
        nonlocal k, first
        if not k:
            return
        dU = dU_buf[: m * J * 2 * H].view(m, J, 2 * H)
        torch.bmm(left[:, :k].transpose(1, 2), right[:, :k], out=dU)
        if first:
            torch.addcmul(dU[..., :H], U[..., :H], dU[..., H:], value=2.0, out=gv)
            first = False
        else:
            gv.add_(dU[..., :H]).addcmul_(U[..., :H], dU[..., H:], value=2.0)
        k = 0

    def use(c: torch.Tensor) -> torch.Tensor | None:
        nonlocal cur_c, U
        if nat:
            cs[:, k] = c[:, 0]
            return None
        if c is not cur_c:
            flush()
            U = _build_u(V, c, U_buf)
            cur_c = c
        return U

    for t in range(len(lambdas) - 1, -1, -1):
        st, lam = steps[t], lambdas[t]
        # ---- M-step t: logits = lam (ba - (H bu + sls) mass / ds), mu = c + d
        g_ba += lam * gl.sum((0, 1))
        g_cost = (-lam) * gl  # (n, L, C)
        mass_n = st.mass.view(n, L, C)
        g_bu += H * (g_cost * mass_n).sum((0, 1)) / ds
        gsls = gsls + (g_cost * mass_n / ds).reshape(m, 1)
        g_mass = (g_cost * (bu_h + st.sls.view(n, L, C)) / ds).reshape(m, 1, 1)
        gvar = gvar + (0.5 * gsls)[..., None] / st.var
        denom = st.mass + MASS_EPS
        qc = st.q.clamp_min(0.0)
        g_q = torch.where(st.q >= 0, gvar / denom, 0.0)
        g_den = -(gvar * qc).sum(-1, keepdim=True) / (denom * denom)
        S1, d = st.S[..., :H], st.d
        gd = gd + 2.0 * g_q * (d * st.mass - S1)
        g_mass = g_mass + (g_q * d * d).sum(-1, keepdim=True)
        if sm != 1.0:  # d = sm (S1 - eps c) / denom + (1 - sm) (previous centre - c)
            g_prev = (1.0 - sm) * gd
            gd = sm * gd
            dm = (S1 - MASS_EPS * st.c) / denom  # the weighted mean's offset
        else:
            dm = d
        g_den = g_den - (gd * dm).sum(-1, keepdim=True) / denom
        Ut = use(st.c)
        g_S = right[:, k : k + 1]  # (m, 1, 2H) = [dS1, dS2]
        torch.div(gd, denom, out=g_S[..., :H]).addcmul_(d, g_q, value=-2.0)
        g_S[..., H:] = g_q
        rw_R = st.R if st.R is not None else R0
        torch.mul(rw_R.expand(n, L, C, J), a, out=left[:, k].view(n, L, C, J))  # rw_t
        k += 1
        if nat:
            g_rw = votes.new_empty(m, J)
            native.estep(V, st.c.view(m, H), g_S.view(m, 2 * H), g_rw,
                         (g_mass + g_den).view(m))
        else:
            g_rw = torch.baddbmm(g_mass + g_den, g_S, Ut.transpose(1, 2))  # (m, 1, J)
        g_rw = g_rw.view(n, L, C, J)
        g_a += (g_rw * rw_R).sum(2)
        if t == 0:
            break
        gR_t = g_rw * a if gR is None else g_rw.mul_(a).add_(gR)
        # ---- E-step t-1: R_t = normalise(e + const + logsigmoid(logits_{t-1}))
        R_t, prev = st.R, steps[t - 1]
        Ut = use(prev.c)
        g_e = left[:, k : k + 1]  # (m, 1, J)
        if nat and fold is not None and fold.per_type:
            g_z = native.norm_type_grad(gR_t.contiguous(), R_t.contiguous(),
                                        left[:, k].view(n, L, C, J), fold.index, fold.n_pos,
                                        fold.types)
        else:
            g_z = torch.mul(gR_t - _fold_sum(gR_t * R_t, fold), R_t,
                            out=left[:, k].view(n, L, C, J))  # (n, L, C, J)
        right[:, k] = prev.w[:, 0]
        k += 1
        g_const = g_z.sum(-1)  # (n, L, C)
        gl = g_const * torch.sigmoid(-prev.logits)
        d, inv = prev.d, prev.var.reciprocal()
        g_const = g_const.reshape(m, 1, 1)
        if nat:
            g_w = votes.new_empty(m, 2 * H)
            native.moments(V, g_e.view(m, J), prev.c.view(m, H), g_w)
            g_w = g_w.view(m, 1, 2 * H)
        else:
            g_w = torch.bmm(g_e, Ut)  # (m, 1, 2H)
        g_w1, g_w2 = g_w[..., :H], g_w[..., H:]
        gd = (g_w1 - g_const * d) * inv
        if sm != 1.0:  # the previous centre c_{t-1} + d_{t-1} fed this M-step's centre
            gd = gd + g_prev
        g_inv = g_w1 * d - 0.5 * g_w2 - 0.5 * g_const * d * d
        gvar = -g_inv * inv * inv
        gsls = -g_const.reshape(m, 1)
        gR = None
    if nat:
        native.vgrad(V, left, right, cs, gv)
        return
    flush()
    if first:
        gv.zero_()


# Run a layer's sample chunks on this many threads (each running its torch ops on one
# thread) instead of splitting every small op over torch's intra-op threads; CPU only.
CHUNK_THREADS = True
_POOL: dict[tuple[int, int], ThreadPoolExecutor] = {}


# At most this many chunk threads: the Python between ops holds the GIL (~1/6 of the
# routing's time), so more threads would mostly wait; beyond it each chunk thread gets
# torch_threads // MAX_CHUNK_THREADS intra-op threads. A guard, not measured (2-core
# machine only).
MAX_CHUNK_THREADS = 4


def _n_workers(device: torch.device, n_chunks: int) -> int:
    if device.type != "cpu" or not CHUNK_THREADS:
        return 1
    return max(1, min(torch.get_num_threads(), n_chunks, MAX_CHUNK_THREADS))


def _run_chunks(chunks: list[slice], body: Callable[[int, slice, int], None],
                workers: int) -> None:
    """``body(i, chunks[i], worker)`` for every chunk; with ``workers > 1`` on that many
    threads, which take chunks in order as they finish (robust to a descheduled core),
    each with torch's intra-op threads set to ``threads // workers`` (1 up to
    ``MAX_CHUNK_THREADS`` threads; restored afterwards)."""
    if workers <= 1:
        for i, s in enumerate(chunks):
            body(i, s, 0)
        return
    key = (os.getpid(), workers)  # a forked child needs its own threads
    pool = _POOL.get(key)
    if pool is None:
        pool = _POOL[key] = ThreadPoolExecutor(workers, thread_name_prefix="em-routing")
    todo = iter(range(len(chunks)))
    lock = threading.Lock()
    failed = threading.Event()
    old = torch.get_num_threads()
    per_worker = max(1, old // workers)

    def work(w: int) -> None:
        torch.set_num_threads(per_worker)
        with torch.no_grad():  # grad mode is per thread
            while not failed.is_set():
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                try:
                    body(i, chunks[i], w)
                except BaseException:
                    failed.set()  # the other threads stop after their current chunk
                    raise

    try:
        futures = [pool.submit(work, w) for w in range(workers)]
        wait(futures)  # all threads done before any error propagates
        for f in futures:
            f.result()
    finally:
        torch.set_num_threads(old)


class _EMRouting(torch.autograd.Function):
    """EM routing with a hand-written backward (see "Layout and speed").

    Forward (no autograd) keeps, when an input needs a gradient, each chunk's per-parent
    moments and the assignments R_t of the later M-steps (:class:`_Step`); backward
    rebuilds each chunk's ``U`` once and sweeps the iterations in reverse by hand
    (:func:`_backward_chunk`), without re-running the forward routing.

    With ``wm`` (``slots=True``) the first input is not the votes but the child poses
    ``pt`` (J, N, L, 16) and each chunk's votes are ``pt[j] @ wm[j]``, made per chunk into
    a reused buffer (:func:`em_routing_slots`).
    """

    @staticmethod
    def forward(ctx, x, wm, a_in, beta_a, beta_u, cfg: _Config):  # noqa: ANN001, ANN205
        if wm is None:
            n, L, C, J, H = x.shape
        else:
            J, n, L, _ = x.shape
            C, H = wm.shape[2] // 16, 16
        mu = x.new_empty(n, L, C, H)
        logits = x.new_empty(n, L, C)
        R = x.new_empty(n, L, C, J)
        k = cfg.chunk
        chunks = _chunks(n, k)
        workers = _n_workers(x.device, len(chunks))
        bufs = [None if cfg.native else x.new_empty(k * L * C * J * 2 * H)
                for _ in range(workers)]
        vbufs = [x.new_empty(k * L * C * J * H) for _ in range(workers if wm is not None else 0)]
        # (needs_input_grad ignores grad mode: parameters under no_grad still say True)
        keep = cfg.keep and any(ctx.needs_input_grad[:5])
        saved: list[list[_Step] | None] = [None] * len(chunks)

        def body(i: int, s: slice, w: int) -> None:
            votes = x[s] if wm is None else _slot_votes(x[:, s], wm, vbufs[w])
            steps: list[_Step] | None = [] if keep else None
            mu[s], logits[s], R[s] = _forward_chunk(votes, a_in[s], beta_a, beta_u, cfg,
                                                    bufs[w], steps)
            saved[i] = steps

        _run_chunks(chunks, body, workers)
        ctx.save_for_backward(x, wm, a_in, beta_a, beta_u)
        ctx.steps = saved
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        return mu, logits, R

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mu, g_logits, g_R):  # noqa: ANN001, ANN205
        x, wm, a_in, beta_a, beta_u = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        if wm is None:
            n, L, C, J, H = x.shape
        else:
            J, n, L, P = x.shape
            C, H = wm.shape[2] // 16, 16
        # votes: same strides as votes; slots: d pt
        g_x = torch.empty_like(x) if wm is None else torch.zeros_like(x)
        g_a = torch.zeros_like(a_in)
        if g_mu is None and g_logits is None and g_R is None:
            return (g_x.zero_(), None if wm is None else torch.zeros_like(wm), g_a,
                    torch.zeros_like(beta_a), torch.zeros_like(beta_u), None)
        k = cfg.chunk
        chunks = _chunks(n, k)
        workers = _n_workers(x.device, len(chunks))
        bufs = [None if cfg.native else x.new_empty(2, k * L * C * J * 2 * H)  # U, dU
                for _ in range(workers)]
        vbufs = [x.new_empty(2, k * L * C * J * H) for _ in range(workers if wm is not None else 0)]
        # per-worker partial sums of the shared gradients
        g_ba = [torch.zeros_like(beta_a) for _ in range(workers)]
        g_bu = [torch.zeros_like(beta_u) for _ in range(workers)]
        g_wm = [torch.zeros_like(wm) for _ in range(workers)] if wm is not None else []

        def body(i: int, s: slice, w: int) -> None:
            if wm is None:
                votes, g_votes = x[s], g_x[s]
            else:
                votes = _slot_votes(x[:, s], wm, vbufs[w][0])
                g_votes = vbufs[w][1, : votes.numel()].view(J, -1, L, C, H).permute(1, 2, 3, 0, 4)
            _backward_chunk(votes, a_in[s], beta_u, cfg, ctx.steps[i],
                            None if g_mu is None else g_mu[s],
                            None if g_logits is None else g_logits[s],
                            None if g_R is None else g_R[s],
                            g_votes, g_a[s], g_ba[w], g_bu[w], bufs[w])
            if wm is not None:  # votes = pt @ wm, per slot
                gv = vbufs[w][1, : votes.numel()].view(J, -1, C * H)  # (J, n*L, C*16)
                g_x[:, s] = torch.bmm(gv, wm.transpose(1, 2)).view(J, -1, L, P)
                g_wm[w].baddbmm_(x[:, s].reshape(J, -1, P).transpose(1, 2), gv)

        _run_chunks(chunks, body, workers)
        return (g_x, sum(g_wm[1:], g_wm[0]) if wm is not None else None, g_a,
                sum(g_ba[1:], g_ba[0]), sum(g_bu[1:], g_bu[0]), None)


def _config(n: int, device: torch.device, iterations: int, final_lambda: float,
            fold: Fold | None, data_scale: float, var_floor: float, chunk: int | None,
            u_bytes: int, use_native: bool = False, schedule: str = "linear",
            smooth: float = 1.0) -> _Config:
    """u_bytes: size of one sample's ``U``; use_native: route with the native passes."""
    if chunk is None:
        if device.type == "cpu":
            if use_native:  # the votes are half of U
                chunk = max(1, NATIVE_CHUNK_BYTES // max(u_bytes // 2, 1))
            else:
                chunk = max(1, CPU_CHUNK_BYTES // max(u_bytes, 1))
            threads = min(torch.get_num_threads(), MAX_CHUNK_THREADS) if CHUNK_THREADS else 1
            chunk = min(chunk, -(-n // threads))
        else:
            chunk = n
    return _Config(tuple(lambda_schedule(iterations, final_lambda, schedule)), fold,
                   float(data_scale),
                   float(var_floor), max(1, min(int(chunk), n)), torch.is_grad_enabled(),
                   use_native, float(smooth))


def em_routing(
    votes: torch.Tensor,
    a_in: torch.Tensor,
    beta_a: torch.Tensor,
    beta_u: torch.Tensor,
    *,
    iterations: int = 3,
    final_lambda: float = 0.01,
    fold: Fold | None = None,
    data_scale: float = 1.0,
    var_floor: float = VAR_FLOOR,
    chunk: int | None = None,
    schedule: str = "linear",
    smooth: float = 1.0,
) -> RoutingResult:
    """EM routing between one pair of capsule layers (vectorised Procedure 1).

    Args:
        votes: (N, L, C, J, H) votes of the J child slots for the C parents at each of L
            positions (H = 16 pose elements). Any strides that let (N, L, C) merge into
            one dimension with unit stride along H (e.g. contiguous, or the slot-major
            layout of ConvCaps) are read in place; other layouts are copied first.
        a_in: (N, L, J) activation probability of the child in each slot.
        beta_a, beta_u: (C,) learned biases per parent type.
        fold: slot -> child map of a convolutional layer (None: each slot is its own child).
        data_scale: kappa of the module docstring (amount of data normaliser).
        chunk: samples routed together (cache blocking); None: ``CPU_CHUNK_BYTES`` on the CPU,
            the whole batch elsewhere. Results do not depend on it.
        schedule: the lambda schedule (:func:`lambda_schedule`).
        smooth: mean smoothing (routing preset ``authors-smooth``): each M-step's centre is
            ``smooth * mean + (1 - smooth) * previous centre`` (the first: ``* 0``), the
            variance and the E-step about it; 1 (the default): plain Procedure 1.

    Differentiable w.r.t. votes, a_in, beta_a, beta_u (first derivatives only).
    """
    n, L, C, J, H = votes.shape
    cfg = _config(n, votes.device, iterations, final_lambda, fold, data_scale, var_floor, chunk,
                  L * C * J * 2 * H * votes.element_size(), native.usable(votes), schedule,
                  smooth)
    st = votes.stride()
    if not (st[4] == 1 and st[1] == C * st[2] and (n == 1 or st[0] == L * st[1])):
        votes = votes.contiguous()
    mu, logits, R = _EMRouting.apply(votes, None, a_in, beta_a, beta_u, cfg)
    return RoutingResult(poses=mu, logits=logits, R=R)


def _slot_votes(p: torch.Tensor, wm: torch.Tensor, vbuf: torch.Tensor) -> torch.Tensor:
    """Votes (n, L, C, J, 16) of a chunk, slot-major in ``vbuf``, as ONE bmm
    ``(J, n*L, 16) @ (J, 16, C*16)``. p: (J, n, L, 16) child poses per slot."""
    J, n, L, P = p.shape
    C = wm.shape[2] // 16
    out = vbuf[: J * n * L * C * 16].view(J, n * L, C * 16)
    torch.bmm(p.reshape(J, n * L, P), wm, out=out)
    return out.view(J, n, L, C, 16).permute(1, 2, 3, 0, 4)


def em_routing_slots(
    pt: torch.Tensor,
    wm: torch.Tensor,
    a_in: torch.Tensor,
    beta_a: torch.Tensor,
    beta_u: torch.Tensor,
    *,
    iterations: int = 3,
    final_lambda: float = 0.01,
    fold: Fold | None = None,
    data_scale: float = 1.0,
    var_floor: float = VAR_FLOOR,
    chunk: int | None = None,
    schedule: str = "linear",
    smooth: float = 1.0,
) -> RoutingResult:
    """:func:`em_routing` of the votes ``votes[:, :, :, j] = (pt[j] @ wm[j]).view(.., C, 16)``
    without ever holding them (or their gradient) for the whole batch: each chunk's votes
    are made by one bmm just before it is routed (forward) and again in the backward,
    where the chunk's vote gradient goes straight into ``d pt`` and ``d wm``.

    Args:
        pt: (J, N, L, 16) the child pose in each slot, slot-major (as ConvCaps builds it).
        wm: (J, 16, C*16) per-slot vote matrix (``kron(I_4, W)`` for 4x4 matrix poses).
        a_in, beta_a, beta_u and the keywords: as for :func:`em_routing`.

    Differentiable w.r.t. pt, wm, a_in, beta_a, beta_u (first derivatives only).
    """
    J, n, L, _ = pt.shape
    cfg = _config(n, pt.device, iterations, final_lambda, fold, data_scale, var_floor, chunk,
                  L * wm.shape[2] * J * 2 * pt.element_size(), native.usable(pt), schedule,
                  smooth)
    mu, logits, R = _EMRouting.apply(pt, wm, a_in, beta_a, beta_u, cfg)
    return RoutingResult(poses=mu, logits=logits, R=R)


def em_routing_autograd(
    votes: torch.Tensor,
    a_in: torch.Tensor,
    beta_a: torch.Tensor,
    beta_u: torch.Tensor,
    *,
    iterations: int = 3,
    final_lambda: float = 0.01,
    fold: Fold | None = None,
    data_scale: float = 1.0,
    var_floor: float = VAR_FLOOR,
    schedule: str = "linear",
    hold: str | None = None,
    smooth: float = 1.0,
) -> RoutingResult:
    """:func:`em_routing` as one plain autograd graph over the whole batch (no custom
    backward, no chunking): what ``torch.compile`` traces. Same arguments and results.
    ``hold`` (``"all"``/``"last"``): assignments as constants for autograd (BPDA)."""
    return _route_graph(votes, a_in, beta_a, beta_u,
                        lambda_schedule(iterations, final_lambda, schedule),
                        fold, data_scale, var_floor, hold, smooth)


def _route_graph(votes: torch.Tensor, a_in: torch.Tensor, beta_a: torch.Tensor,
                 beta_u: torch.Tensor, lambdas: list[float], fold: Fold | None,
                 data_scale: float, var_floor: float, hold: str | None = None,
                 smooth: float = 1.0) -> RoutingResult:
    """:func:`_route` over the whole batch as one autograd graph, one iteration per lambda."""
    n, L, C, J, H = votes.shape
    R0 = _initial_R(votes, fold)
    a = a_in[:, :, None, :]
    c = _reference_mean(votes, (R0 * a).detach())
    V = votes.reshape(n * L * C, J, H)
    dv = V - c
    U = torch.cat((dv, dv * dv), -1)
    mu, logits, R = _route(V, U, c, a, R0, beta_a, beta_u, lambdas, fold, data_scale,
                           var_floor, (n, L, C, J), hold, smooth)
    return RoutingResult(poses=mu, logits=logits, R=R)


def em_routing_uniform(
    votes: torch.Tensor,
    a_in: torch.Tensor,
    beta_a: torch.Tensor,
    beta_u: torch.Tensor,
    *,
    iterations: int = 3,
    final_lambda: float = 0.01,
    fold: Fold | None = None,
    data_scale: float = 1.0,
    var_floor: float = VAR_FLOOR,
    schedule: str = "linear",
    smooth: float = 1.0,
) -> RoutingResult:
    """The ``"uniform"`` surrogate of :func:`em_routing` (same arguments): ONE M-step with
    the initial assignment ``R0`` (Procedure 1 line 2, or the preset's), i.e. each parent's
    pose is the activation-weighted average of its votes, and its logit
    ``lambda_T (beta_a - (H beta_u + sum_h log sigma_h) mass / data_scale)`` with the LAST
    lambda of the schedule (the scale of the true routing's output). No E-step, so it is
    smooth in the votes; an ordinary autograd graph. ``smooth`` is ignored: the uniform
    surrogate's pose is the plain weighted mean of the votes."""
    del smooth
    lam = lambda_schedule(iterations, final_lambda, schedule)[-1]
    return _route_graph(votes, a_in, beta_a, beta_u, [lam], fold, data_scale, var_floor)


# ---------------------------------------------------------------------------- surrogates
SURROGATE_MODES = ("exact", "bpda", "bpda-last", "uniform")
_SURROGATES: contextvars.ContextVar[tuple[tuple[str, frozenset[int] | None], ...]] = (
    contextvars.ContextVar("robustcaps_routing_surrogates", default=()))


def _routing_layers(layers: Iterable[nn.Module] | nn.Module | None) -> frozenset[int] | None:
    """ids of the routing layers (ConvCaps/ClassCaps) in ``layers`` (modules, or networks
    whose routing layers are all meant); None: every layer."""
    if layers is None:
        return None
    if isinstance(layers, nn.Module):
        layers = [layers]
    ids: set[int] = set()
    for mod in layers:
        found = [x for x in mod.modules() if isinstance(x, (ConvCaps, ClassCaps))]
        if not found:
            raise ValueError(f"{type(mod).__name__} holds no capsule routing layer")
        ids.update(id(x) for x in found)
    return frozenset(ids)


@contextlib.contextmanager
def routing_surrogate(mode: str = "bpda",
                      layers: Iterable[nn.Module] | nn.Module | None = None) -> Iterator[None]:
    """Route the capsule layers of any robustcaps capsule network through a surrogate
    inside the ``with`` block (for capsule-aware attacks; the default is the exact routing).

    mode:
      ``"bpda"``: the forward is the true routing (bit for bit); the backward treats every
        assignment ``R`` as a constant, so gradients flow through the votes, means,
        variances and activations of the M-steps but not through R's dependence on them.
      ``"bpda-last"``: only the assignment of the final M-step is a constant. (Without
        mean smoothing the final M-step sees the earlier iterations only through that
        assignment, so the gradient equals ``"bpda"``'s; with ``authors-smooth`` the earlier
        centres also feed the last one, and gradient flows back through them and the
        earlier assignments.)
      ``"uniform"``: each chosen layer's routing is replaced by ONE M-step with the
        uniform initial assignment (:func:`em_routing_uniform`): votes averaged with the
        child activations as weights, the activation computed from that M-step. A
        different, differentiable forward.
      ``"exact"``: the true routing (to switch chosen layers back inside an outer block).
    layers: capsule layers (``ConvCaps``/``ClassCaps`` modules), or modules containing them
      (e.g. the network: every layer); None: every capsule layer. ``CapsNet.routing_layers()``
      names them (``"conv1"``, ``"conv2"``, ``"class"``).

    Blocks nest; for each layer the innermost block that covers it decides. Thread- and
    async-safe (a ``contextvars`` variable). The surrogate forwards run the routing as one
    plain autograd graph (:func:`em_routing_autograd`), slower than the exact routing.

    Example: ``with routing_surrogate("bpda"): grad = torch.autograd.grad(loss(model(x)), x)``
    """
    if mode not in SURROGATE_MODES:
        raise ValueError(f"mode must be one of {SURROGATE_MODES}, got {mode!r}")
    token = _SURROGATES.set(_SURROGATES.get() + ((mode, _routing_layers(layers)),))
    try:
        yield
    finally:
        _SURROGATES.reset(token)


def surrogate_mode(layer: nn.Module) -> str:
    """The routing mode in force for ``layer`` (``"exact"`` outside any surrogate block)."""
    for mode, ids in reversed(_SURROGATES.get()):
        if ids is None or id(layer) in ids:
            return mode
    return "exact"


def _with_surrogate(layer: nn.Module, exact: Callable[[], RoutingResult],
                    votes: Callable[[], torch.Tensor], a_in: torch.Tensor, ba: torch.Tensor,
                    bu: torch.Tensor, kw: dict) -> RoutingResult:
    """``exact()`` (the layer's true routing) or, inside :func:`routing_surrogate`, its
    surrogate for ``layer``; ``votes()`` makes the (N, L, C, J, H) votes."""
    mode = surrogate_mode(layer)
    if mode == "exact":
        return exact()
    if mode == "uniform":
        return em_routing_uniform(votes(), a_in, ba, bu, **kw)
    with torch.no_grad():  # the true forward, values only
        true = exact()
    s = em_routing_autograd(votes(), a_in, ba, bu, hold="all" if mode == "bpda" else "last",
                            **kw)
    # value: exactly the true routing's (x + (s - s) == x); gradient: the held surrogate's

    def bpda(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + (y - y.detach())

    return RoutingResult(bpda(true.poses, s.poses), bpda(true.logits, s.logits),
                         bpda(true.R, s.R))


_COMPILED: dict[str, object] = {}


def routing_function(compiled: bool = False):
    """:func:`em_routing`, or ``torch.compile`` of :func:`em_routing_autograd` (CPU and CUDA).

    Compilation happens on the first call for each input shape (20-30 s per network on 2
    CPU cores). Since the eager routing got its centred-moments/custom-backward/chunked
    form, the compiled one is SLOWER on the CPU (capsnet-small, 1 thread, loaded machine:
    39 vs 136 img/s forward, 21 vs 41 forward+backward); it is kept as an option for
    CUDA experiments. If compiling fails (e.g. no C++ compiler, or CUDA without Triton),
    the eager function is used after one warning.
    """
    if not compiled:
        return em_routing
    if "fn" not in _COMPILED:
        compiled_fn = torch.compile(em_routing_autograd, dynamic=None)

        def safe(*args, **kwargs):
            if _COMPILED.get("failed"):
                return em_routing(*args, **kwargs)
            try:
                return compiled_fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any backend failure falls back
                import warnings

                warnings.warn(f"torch.compile of EM routing failed ({type(exc).__name__}: "
                              f"{exc}); using eager routing", stacklevel=2)
                _COMPILED["failed"] = True
                return em_routing(*args, **kwargs)

        _COMPILED["fn"] = safe
    return _COMPILED["fn"]


# ---------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class RoutingPreset:
    """The routing choices of a capsule network (``CapsNet(routing=...)``); see
    :data:`ROUTING_PRESETS` and "Routing presets" in the module docstring.

    per_type, initial: the convolutional E-step normaliser and first assignment (:class:`Fold`);
    schedule, lambda_scale, class_lambda: layer lambdas ``lambda_scale * final_lambda``
    (times ``class_lambda`` in the class layer) on :func:`lambda_schedule`'s ``schedule``;
    beta_a_scale, beta_u_scale: the routing sees ``scale * parameter``; beta_a_init,
    beta_u_init: (conv, class) initial parameter values; var_floor: added to every
    variance; data_scale: divide the mass by kappa (False: raw masses); coord: Coordinate
    Addition ``"unit"`` (centre / image size on vote elements 3, 7) or ``"authors"``
    (offset from the image centre / 100 on elements 0, 1); init: ``"paper"`` or
    ``"authors"`` weight initialisation (:meth:`CapsNet.__init__`); primary_offset: added to
    the primary capsules' activation logits; smooth: mean smoothing (:func:`em_routing`).
    """

    name: str
    per_type: bool = False
    initial: str = "parents"
    schedule: str = "linear"
    lambda_scale: float = 1.0
    class_lambda: float = 1.0
    beta_a_scale: float = 1.0
    beta_u_scale: float = 1.0
    beta_a_init: tuple[float, float] = (0.0, 0.0)
    beta_u_init: tuple[float, float] = (0.0, 0.0)
    var_floor: float = VAR_FLOOR
    data_scale: bool = True
    coord: str = "unit"
    init: str = "paper"
    primary_offset: float = 0.0
    smooth: float = 1.0


ROUTING_PRESETS: dict[str, RoutingPreset] = {
    # Procedure 1 and Section 4 as written, with the constants of this docstring.
    "paper": RoutingPreset("paper"),
    # The released code (google-research capsule_em); see "Routing presets".
    "authors": RoutingPreset(
        "authors", per_type=True, initial="types", schedule="authors", lambda_scale=2.0,
        class_lambda=0.25, beta_a_scale=2500.0, beta_u_scale=0.5 * (LOG_2PI + 1.0),
        beta_a_init=(-0.5, -1.0), beta_u_init=(0.5, 2.0), var_floor=5e-4, data_scale=False,
        coord="authors", init="authors", primary_offset=-1.0),
    # Mixed: the authors' per-type normaliser with everything else as ``paper`` (kappa
    # counts the C-fold mass a per-type normaliser hands out; first assignment uniform
    # over a child's windows).
    "pertype": RoutingPreset("pertype", per_type=True, initial="windows"),
}
# ``authors`` plus the released code's mean smoothing, centre = 0.9 mean + 0.1 previous
# centre (em_layers.py, both routing functions): a separate name, so that checkpoints
# trained with ``authors`` keep their function.
ROUTING_PRESETS["authors-smooth"] = dataclasses.replace(
    ROUTING_PRESETS["authors"], name="authors-smooth", smooth=0.9)


def routing_preset(name: str | RoutingPreset) -> RoutingPreset:
    if isinstance(name, RoutingPreset):
        return name
    if name not in ROUTING_PRESETS:
        raise ValueError(f"routing must be one of {sorted(ROUTING_PRESETS)}, got {name!r}")
    return ROUTING_PRESETS[name]


# ---------------------------------------------------------------------------- layers
def _pose_dims(pose: str) -> tuple[int, int, int]:
    """(rows, inner, cols) of one vote product: matrix (4, 4, 4), vector (1, 16, 16)."""
    if pose == "matrix":
        return 4, 4, 4
    if pose == "vector":
        return 1, 16, 16
    raise ValueError(f"pose must be 'matrix' or 'vector', got {pose!r}")


def _votes(p: torch.Tensor, w: torch.Tensor, pose: str) -> torch.Tensor:
    """Votes for every slot and parent type, slot-major.

    p: (G, n, L, 16) child poses, G groups of distinct transforms (slots);
    w: (G, C, 4, 4) (matrix: vote = M @ W) or (G, C, 16, 16) (vector: vote = W @ p).
    Returns (G, n, L, C, 16) contiguous, from ONE bmm ``(n*L, 16) @ (16, C*16)`` per slot:
    a 4x4 matrix product ``M @ W`` is ``vec(M) @ kron(I_4, W)`` (4x the multiply-adds of
    the 4x4 products, which are negligible, but every vote lands directly in its place, so
    no permuted copy of the vote tensor is ever made).
    """
    g, n, L, _ = p.shape
    out = torch.bmm(p.reshape(g, n * L, 16), _vote_matrix(w, pose))  # (G, n*L, C*16)
    return out.reshape(g, n, L, w.shape[1], 16)


def _vote_matrix(w: torch.Tensor, pose: str) -> torch.Tensor:
    """(G, 16, C*16) matrix of :func:`_votes`: ``kron(I_4, W)`` (matrix) or ``W^T`` (vector)."""
    g, c = w.shape[0], w.shape[1]
    if pose == "matrix":
        eye = torch.eye(4, dtype=w.dtype, device=w.device)
        # wm[g, (r', t), (c, r, s)] = delta(r, r') W[g, c, t, s]
        return torch.einsum("qr,gcts->gqtcrs", eye, w).reshape(g, 16, c * 16)
    return w.permute(0, 3, 1, 2).reshape(g, 16, c * 16)  # [t, (c, h)]


def _scaled_betas(layer: nn.Module, ps: RoutingPreset) -> tuple[torch.Tensor, torch.Tensor]:
    """The biases the routing sees: ``scale * parameter`` (the parameters themselves at
    scale 1, so preset ``paper`` is today's computation exactly)."""
    ba = layer.beta_a if ps.beta_a_scale == 1 else layer.beta_a * ps.beta_a_scale
    bu = layer.beta_u if ps.beta_u_scale == 1 else layer.beta_u * ps.beta_u_scale
    return ba, bu


class PrimaryCaps(nn.Module):
    """1x1 convolution: (N, A, H, W) -> poses (N, H, W, B, 16), activation logits (N, H, W, B)."""

    def __init__(self, in_channels: int, types: int, logit_offset: float = 0.0) -> None:
        super().__init__()
        self.types = types
        self.logit_offset = logit_offset  # authors: sigmoid(x - 1) (em_layers.py primary_caps)
        self.conv = nn.Conv2d(in_channels, types * 17, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        y = self.conv(x).permute(0, 2, 3, 1)  # (N, H, W, 17B)
        poses = y[..., : 16 * self.types].reshape(n, h, w, self.types, 16)
        logits = y[..., 16 * self.types :]
        if self.logit_offset:
            logits = logits + self.logit_offset
        return poses, logits


class ConvCaps(nn.Module):
    """KxK convolutional capsule layer with EM routing.

    Input: poses (N, H, W, B, 16), activations (N, H, W, B) in [0, 1].
    Output: poses (N, Ho, Wo, C, 16), activation logits (N, Ho, Wo, C), and, on request,
    votes (N, Ho, Wo, C, K, K, B, 16) and R (N, Ho, Wo, C, K, K, B).
    """

    def __init__(
        self,
        in_types: int,
        out_types: int,
        kernel: int,
        stride: int,
        *,
        iterations: int = 3,
        pose: str = "matrix",
        final_lambda: float = 0.01,
        compile_routing: bool = False,
        routing: str | RoutingPreset = "paper",
    ) -> None:
        super().__init__()
        self.compile_routing = compile_routing
        self.preset = routing_preset(routing)
        rows, inner, cols = _pose_dims(pose)
        self.B, self.C, self.K, self.stride = in_types, out_types, kernel, stride
        self.iterations, self.pose, self.final_lambda = iterations, pose, final_lambda
        shape = (kernel * kernel * in_types, out_types, 4, 4) if pose == "matrix" else (
            kernel * kernel * in_types, out_types, 16, 16)
        self.weight = nn.Parameter(torch.randn(shape) / math.sqrt(inner))
        self.beta_a = nn.Parameter(torch.full((out_types,), self.preset.beta_a_init[0]))
        self.beta_u = nn.Parameter(torch.full((out_types,), self.preset.beta_u_init[0]))
        self._folds: dict[tuple, Fold] = {}

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return (h - self.K) // self.stride + 1, (w - self.K) // self.stride + 1

    def fold(self, h: int, w: int, device: torch.device) -> Fold:
        """Slot geometry for an (h, w) child grid (cached per size and device)."""
        key = (h, w, str(device))
        if key not in self._folds:
            ho, wo = self.out_size(h, w)
            k = torch.arange(self.K)
            rows = (torch.arange(ho)[:, None] * self.stride + k)  # (Ho, K)
            cols = (torch.arange(wo)[:, None] * self.stride + k)  # (Wo, K)
            idx = rows[:, None, :, None] * w + cols[None, :, None, :]  # (Ho, Wo, K, K)
            self._folds[key] = Fold(idx.reshape(-1), h * w, self.B, per_type=self.preset.per_type,
                                    initial=self.preset.initial).to(device)
        return self._folds[key]

    def forward(
        self, poses: torch.Tensor, a: torch.Tensor, return_all: bool = False
    ) -> dict[str, torch.Tensor]:
        n, h, w, b, _ = poses.shape
        ho, wo = self.out_size(h, w)
        fold = self.fold(h, w, poses.device)
        kk = self.K * self.K
        L = ho * wo
        # Child slots, slot-major: (KK, B, N, L, 16) -> G = KK*B groups of distinct weights.
        pt = poses.reshape(n, h * w, b, 16).index_select(1, fold.index)  # (N, L*KK, B, 16)
        pt = pt.reshape(n, L, kk, b, 16).permute(2, 3, 0, 1, 4).reshape(kk * b, n, L, 16)
        a_in = a.reshape(n, h * w, b).index_select(1, fold.index).reshape(n, L, kk * b)
        ps = self.preset
        # kappa: a per-type normaliser hands out C times the mass (1 per type and child)
        kappa = fold.n_covered / (L * (1 if ps.per_type else self.C))
        kw = dict(iterations=self.iterations, final_lambda=ps.lambda_scale * self.final_lambda,
                  fold=fold, data_scale=kappa if ps.data_scale else 1.0,
                  var_floor=ps.var_floor, schedule=ps.schedule, smooth=ps.smooth)
        ba, bu = _scaled_betas(self, ps)
        votes = None

        def make_votes() -> torch.Tensor:
            # (N, L, C, J, 16) view of slot-major votes: each parent's (J, 16) block has
            # rows N*L*C*16 apart, which bmm and the routing read in place.
            nonlocal votes
            if votes is None:
                votes = _votes(pt, self.weight, self.pose).permute(1, 2, 3, 0, 4)
            return votes

        def exact() -> RoutingResult:
            if return_all or self.compile_routing:
                return routing_function(self.compile_routing)(make_votes(), a_in, ba, bu, **kw)
            # votes made per sample chunk inside the routing, never for the whole batch
            return em_routing_slots(pt, _vote_matrix(self.weight, self.pose), a_in, ba, bu,
                                    **kw)

        res = _with_surrogate(self, exact, make_votes, a_in, ba, bu, kw)
        out = {
            "poses": res.poses.reshape(n, ho, wo, self.C, 16),
            "logits": res.logits.reshape(n, ho, wo, self.C),
        }
        if return_all:
            out["votes"] = make_votes().reshape(n, ho, wo, self.C, self.K, self.K, b, 16)
            out["R"] = res.R.reshape(n, ho, wo, self.C, self.K, self.K, b)
        return out


class ClassCaps(nn.Module):
    """Class capsules: one per class, transforms shared over positions, Coordinate Addition.

    Input: poses (N, H, W, D, 16), activations (N, H, W, D), and ``coords`` (H, W, 2): the
    scaled (row, column) receptive-field centres. Output: poses (N, E, 16), logits (N, E),
    and on request votes (N, E, H, W, D, 16), R (N, E, H, W, D).
    """

    def __init__(
        self,
        in_types: int,
        num_classes: int,
        *,
        iterations: int = 3,
        pose: str = "matrix",
        coord_add: bool = True,
        final_lambda: float = 0.01,
        compile_routing: bool = False,
        routing: str | RoutingPreset = "paper",
    ) -> None:
        super().__init__()
        self.compile_routing = compile_routing
        self.preset = routing_preset(routing)
        # vote elements that receive the (row, column) coordinates
        self.coord_elements = (0, 1) if self.preset.coord == "authors" else (3, 7)
        _, inner, _ = _pose_dims(pose)
        self.D, self.E = in_types, num_classes
        self.iterations, self.pose, self.coord_add = iterations, pose, coord_add
        self.final_lambda = final_lambda
        shape = (in_types, num_classes, 4, 4) if pose == "matrix" else (
            in_types, num_classes, 16, 16)
        self.weight = nn.Parameter(torch.randn(shape) / math.sqrt(inner))
        self.beta_a = nn.Parameter(torch.full((num_classes,), self.preset.beta_a_init[1]))
        self.beta_u = nn.Parameter(torch.full((num_classes,), self.preset.beta_u_init[1]))

    def forward(
        self, poses: torch.Tensor, a: torch.Tensor, coords: torch.Tensor, return_all: bool = False
    ) -> dict[str, torch.Tensor]:
        n, h, w, d, _ = poses.shape
        hw = h * w
        pt = poses.reshape(n, hw, d, 16).permute(2, 0, 1, 3)  # (D, N, HW, 16)
        votes = _votes(pt, self.weight, self.pose)  # (D, N, HW, E, 16)
        # Route all H*W*D children to the E class capsules: L = 1, J = (HW, D).
        votes = votes.permute(1, 3, 2, 0, 4)  # (N, E, HW, D, 16)
        if self.coord_add:
            add = coords.new_zeros(hw, 1, 16)
            add[:, 0, self.coord_elements[0]] = coords.reshape(hw, 2)[:, 0]
            add[:, 0, self.coord_elements[1]] = coords.reshape(hw, 2)[:, 1]
            votes = votes + add
        votes = votes.reshape(n, 1, self.E, hw * d, 16).contiguous()
        a_in = a.reshape(n, 1, hw * d)
        ps = self.preset
        ba, bu = _scaled_betas(self, ps)
        kw = dict(iterations=self.iterations,
                  final_lambda=ps.lambda_scale * ps.class_lambda * self.final_lambda, fold=None,
                  data_scale=hw * d / self.E if ps.data_scale else 1.0, var_floor=ps.var_floor,
                  schedule=ps.schedule, smooth=ps.smooth)
        res = _with_surrogate(
            self, lambda: routing_function(self.compile_routing)(votes, a_in, ba, bu, **kw),
            lambda: votes, a_in, ba, bu, kw)
        out = {"poses": res.poses.reshape(n, self.E, 16), "logits": res.logits.reshape(n, self.E)}
        if return_all:
            out["votes"] = votes.reshape(n, self.E, h, w, d, 16)
            out["R"] = res.R.reshape(n, self.E, h, w, d)
        return out
