"""Slow, obviously correct EM routing written straight from Procedure 1 (test oracle).

Everything is explicit loops over samples, parents (output position, type) and children
(position, type); each child's parent set is built from the receptive-field geometry, and
its assignment probabilities are normalised over exactly that set. Only the per-pair
arithmetic on 16-element pose vectors uses tensors, so autograd gives input gradients.
Shares no code with robustcaps.models.em_routing; the constants (variance floor, lambda
schedule, data normaliser) follow the module docstring there.

Routing preset ``authors`` (the released code, google-research capsule_em/em_layers.py):
``per_type`` normalises a child's assignments over the parents of each type separately,
``initial`` picks the first assignment, ``lambdas``/``var_floor``/``kappa`` replace the
defaults; ``capsnet_forward`` reads the preset off the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

VAR_FLOOR = 1e-4
MASS_EPS = 1e-8


def vote(m: torch.Tensor, w: torch.Tensor, pose: str) -> torch.Tensor:
    """One vote (16,) from a child pose m (16,) and a transform w (4,4) or (16,16)."""
    if pose == "matrix":
        return (m.reshape(4, 4) @ w).reshape(16)
    return w @ m


def route(children, parents, edges, iterations, final_lambda, beta_a, beta_u, *,
          per_type=False, initial="parents", lambdas=None, var_floor=VAR_FLOOR, kappa=None,
          hold=None, smooth=1.0):
    """Procedure 1 on an explicit bipartite graph.

    children: {child: activation (scalar tensor)}; parents: list of (parent, type);
    edges: {(child, parent): vote (16,)}. Returns ({parent: mu}, {parent: logit}, {edge: R}).
    per_type: each child's E-step normaliser runs over its parents of one type at a time;
    initial: "parents" 1/|parents(i)|, "types" 1/(number of types), "windows"
    1/|parents(i) of one type|; lambdas: explicit schedule (default: the linear ramp);
    kappa: data normaliser (default: children fed / parents); hold: "all" makes every
    M-step read the assignments as constants (detached: BPDA), "last" only the final one;
    smooth: each parent's centre is smooth * (weighted mean) + (1 - smooth) * (its previous
    centre, 0 before the first M-step), the variance and the E-step taken about it.
    """
    parents_of: dict = {}
    children_of: dict = {}
    for (i, j) in edges:
        parents_of.setdefault(i, []).append(j)
        children_of.setdefault(j, []).append(i)
    fed = [i for i in children if i in parents_of]
    if kappa is None:
        kappa = len(fed) / len(parents)
    types = dict(parents)
    n_types = len(set(types.values()))
    first = {"parents": lambda i: 1.0 / len(parents_of[i]),
             "types": lambda i: 1.0 / n_types,
             "windows": lambda i: n_types / len(parents_of[i])}[initial]
    R = {(i, j): first(i) for (i, j) in edges}
    if lambdas is None:
        lambdas = [final_lambda * (t + 1) / iterations for t in range(iterations)]
    mu, logit = {}, {}
    centre = {j: 0.0 for j, _ in parents}
    for t, lam in enumerate(lambdas):
        var = {}
        if hold == "all" or (hold == "last" and t == len(lambdas) - 1):
            R = {e: r.detach() if torch.is_tensor(r) else r for e, r in R.items()}
        for j, c in parents:  # M-step, one parent at a time
            rw = {i: R[(i, j)] * children[i] for i in children_of[j]}
            mass = sum(rw.values())
            mean = sum(rw[i] * edges[(i, j)] for i in children_of[j]) / (mass + MASS_EPS)
            mu[j] = centre[j] = smooth * mean + (1 - smooth) * centre[j]
            var[j] = sum(rw[i] * (edges[(i, j)] - mu[j]) ** 2 for i in children_of[j]) / (
                mass + MASS_EPS) + var_floor
            cost = ((beta_u[c] + 0.5 * torch.log(var[j])) * (mass / kappa)).sum()
            logit[j] = lam * (beta_a[c] - cost)
        if t == iterations - 1:
            break
        for i in fed:  # E-step, one child at a time, over every parent it feeds
            terms = {}
            for j in parents_of[i]:
                d = edges[(i, j)] - mu[j]
                log_p = (-0.5 * d**2 / var[j] - 0.5 * torch.log(2 * math.pi * var[j])).sum()
                terms[j] = F.logsigmoid(logit[j]) + log_p
            # the parents competing for child i: all of them, or those of one type
            groups = ([[j for j in parents_of[i] if types[j] == c] for c in set(types.values())]
                      if per_type else [parents_of[i]])
            for group in groups:
                if not group:
                    continue
                total = torch.logsumexp(torch.stack([terms[j] for j in group]), 0)
                for j in group:
                    R[(i, j)] = torch.exp(terms[j] - total)
    return mu, logit, R


def conv_caps(poses, acts, weight, beta_a, beta_u, *, kernel, stride, iterations=3,
              final_lambda=1.0, pose="matrix", **route_kw):
    """poses (N, H, W, B, 16), acts (N, H, W, B), weight (K*K*B, C, ...) with slot
    j = (ky*K + kx)*B + b. Returns poses (N, Ho, Wo, C, 16), logits (N, Ho, Wo, C)."""
    n, h, w, b, _ = poses.shape
    c_types = weight.shape[1]
    ho, wo = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    out_p = [[[[None] * c_types for _ in range(wo)] for _ in range(ho)] for _ in range(n)]
    out_l = [[[[None] * c_types for _ in range(wo)] for _ in range(ho)] for _ in range(n)]
    for s in range(n):
        children = {(u, v, bb): acts[s, u, v, bb] for u in range(h) for v in range(w)
                    for bb in range(b)}
        parents = [((y, x, c), c) for y in range(ho) for x in range(wo) for c in range(c_types)]
        edges = {}
        for u in range(h):
            for v in range(w):
                # receptive-field geometry: output rows y with y*stride <= u < y*stride + K
                ys = [y for y in range(ho) if y * stride <= u < y * stride + kernel]
                xs = [x for x in range(wo) if x * stride <= v < x * stride + kernel]
                for y in ys:
                    for x in xs:
                        ky, kx = u - y * stride, v - x * stride
                        for bb in range(b):
                            slot = (ky * kernel + kx) * b + bb
                            for c in range(c_types):
                                edges[((u, v, bb), (y, x, c))] = vote(
                                    poses[s, u, v, bb], weight[slot, c], pose)
        mu, logit, _ = route(children, parents, edges, iterations, final_lambda, beta_a, beta_u,
                             **route_kw)
        for (y, x, c), _c in parents:
            out_p[s][y][x][c] = mu[(y, x, c)]
            out_l[s][y][x][c] = logit[(y, x, c)]
    p = torch.stack([torch.stack([torch.stack([torch.stack(r) for r in row]) for row in img])
                     for img in out_p])
    lg = torch.stack([torch.stack([torch.stack([torch.stack(r) for r in row]) for row in img])
                      for img in out_l])
    return p, lg


def class_caps(poses, acts, weight, beta_a, beta_u, coords, *, iterations=3, final_lambda=1.0,
               pose="matrix", coord_add=True, coord_elements=(3, 7), **route_kw):
    """poses (N, H, W, D, 16), acts (N, H, W, D), weight (D, E, ...), coords (H, W, 2).
    Returns poses (N, E, 16), logits (N, E)."""
    n, h, w, d, _ = poses.shape
    e_types = weight.shape[1]
    out_p, out_l = [], []
    for s in range(n):
        children = {(u, v, dd): acts[s, u, v, dd] for u in range(h) for v in range(w)
                    for dd in range(d)}
        parents = [(e, e) for e in range(e_types)]
        edges = {}
        for u in range(h):
            for v in range(w):
                for dd in range(d):
                    for e in range(e_types):
                        vt = vote(poses[s, u, v, dd], weight[dd, e], pose)
                        if coord_add:  # paper: elements (0, 3), (1, 3) of the 4x4 vote
                            add = torch.zeros_like(vt)
                            add[coord_elements[0]] = coords[u, v, 0]
                            add[coord_elements[1]] = coords[u, v, 1]
                            vt = vt + add
                        edges[((u, v, dd), e)] = vt
        mu, logit, _ = route(children, parents, edges, iterations, final_lambda, beta_a, beta_u,
                             **route_kw)
        out_p.append(torch.stack([mu[e] for e in range(e_types)]))
        out_l.append(torch.stack([logit[e] for e in range(e_types)]))
    return torch.stack(out_p), torch.stack(out_l)


def _authors_lambdas(final, iterations):
    """capsule_em/em_layers.py: beta_t = final_beta (1 - 0.95^(t+1)); doubled because the
    authors' cost sums log variances where Procedure 1 sums log sigmas (see em_routing)."""
    return [2 * final * (1 - 0.95 ** (t + 1)) for t in range(iterations)]


def capsnet_forward(model, x):
    """Reference logits (N, E) of a robustcaps CapsNet, using its parameters and its
    routing preset (``model.routing``: "paper", "authors", "authors-smooth" or "pertype")."""
    preset = getattr(model, "routing", "paper")
    feat = F.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias, stride=2))
    y = F.conv2d(feat, model.primary.conv.weight, model.primary.conv.bias)
    n, _, h, w = y.shape
    btypes = model.primary.types
    y = y.permute(0, 2, 3, 1)
    poses = y[..., : 16 * btypes].reshape(n, h, w, btypes, 16)
    acts = torch.sigmoid(y[..., 16 * btypes:] - (1.0 if preset.startswith("authors") else 0.0))
    kw = dict(iterations=model.iterations, pose=model.pose)
    # authors: activation biases x 5000 in a cost of summed log variances, i.e. x 2500 in
    # Procedure 1's; sigma biases x 16 (ln 2 pi + 1) likewise halved and per element
    sa, su = (2500.0, 0.5 * (math.log(2 * math.pi) + 1)) if preset.startswith("authors") else (1.0, 1.0)
    for layer in (model.convcaps1, model.convcaps2):
        rk = {}
        if preset.startswith("authors"):
            rk = dict(per_type=True, initial="types", var_floor=5e-4, kappa=1.0,
                      lambdas=_authors_lambdas(layer.final_lambda, model.iterations),
                      smooth=0.9 if preset == "authors-smooth" else 1.0)
        elif preset == "pertype":
            rk = dict(per_type=True, initial="windows")
        n_, hh_, ww_ = poses.shape[:3]
        if preset == "pertype":  # kappa: children fed per output POSITION (C-fold mass)
            ho_ = (hh_ - layer.K) // layer.stride + 1
            wo_ = (ww_ - layer.K) // layer.stride + 1
            cov_r = len({y * layer.stride + k for y in range(ho_) for k in range(layer.K)})
            cov_c = len({x_ * layer.stride + k for x_ in range(wo_) for k in range(layer.K)})
            rk["kappa"] = cov_r * cov_c * poses.shape[3] / (ho_ * wo_)
        poses, logits = conv_caps(poses, acts, layer.weight, sa * layer.beta_a,
                                  su * layer.beta_u, kernel=layer.K, stride=layer.stride,
                                  final_lambda=layer.final_lambda, **kw, **rk)
        acts = torch.sigmoid(logits)
    hh, ww = x.shape[2:]
    ho, wo = poses.shape[1:3]
    coords = torch.zeros(ho, wo, 2, dtype=x.dtype)
    for r in range(ho):
        for c in range(wo):
            if preset.startswith("authors"):  # centre pixel minus size // 2, / 100
                coords[r, c, 0] = (8 + 4 * r - hh // 2) / 100
                coords[r, c, 1] = (8 + 4 * c - ww // 2) / 100
            else:  # receptive-field centres in input pixels, scaled to [0, 1]
                coords[r, c, 0] = (8 + 4 * r + 0.5) / hh
                coords[r, c, 1] = (8 + 4 * c + 0.5) / ww
    cl = model.classcaps
    rk = {}
    if preset.startswith("authors"):
        rk = dict(var_floor=5e-4, kappa=1.0, coord_elements=(0, 1),
                  lambdas=_authors_lambdas(cl.final_lambda / 4, model.iterations),
                  smooth=0.9 if preset == "authors-smooth" else 1.0)
    _, logits = class_caps(poses, acts, cl.weight, sa * cl.beta_a, su * cl.beta_u, coords,
                           final_lambda=cl.final_lambda, coord_add=model.coord_add, **kw, **rk)
    return logits
