"""Slow, obviously correct EM routing written straight from Procedure 1 (test oracle).

Everything is explicit loops over samples, parents (output position, type) and children
(position, type); each child's parent set is built from the receptive-field geometry, and
its assignment probabilities are normalised over exactly that set. Only the per-pair
arithmetic on 16-element pose vectors uses tensors, so autograd gives input gradients.
Shares no code with robustcaps.models.em_routing; the constants (variance floor, lambda
schedule, data normaliser) follow the module docstring there.
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


def route(children, parents, edges, iterations, final_lambda, beta_a, beta_u):
    """Procedure 1 on an explicit bipartite graph.

    children: {child: activation (scalar tensor)}; parents: list of (parent, type);
    edges: {(child, parent): vote (16,)}. Returns ({parent: mu}, {parent: logit}, {edge: R}).
    """
    parents_of: dict = {}
    children_of: dict = {}
    for (i, j) in edges:
        parents_of.setdefault(i, []).append(j)
        children_of.setdefault(j, []).append(i)
    fed = [i for i in children if i in parents_of]
    kappa = len(fed) / len(parents)
    R = {(i, j): 1.0 / len(parents_of[i]) for (i, j) in edges}
    lambdas = [final_lambda * (t + 1) / iterations for t in range(iterations)]
    types = dict(parents)
    mu, logit = {}, {}
    for t, lam in enumerate(lambdas):
        var = {}
        for j, c in parents:  # M-step, one parent at a time
            rw = {i: R[(i, j)] * children[i] for i in children_of[j]}
            mass = sum(rw.values())
            mu[j] = sum(rw[i] * edges[(i, j)] for i in children_of[j]) / (mass + MASS_EPS)
            var[j] = sum(rw[i] * (edges[(i, j)] - mu[j]) ** 2 for i in children_of[j]) / (
                mass + MASS_EPS) + VAR_FLOOR
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
            total = torch.logsumexp(torch.stack(list(terms.values())), 0)
            for j in parents_of[i]:
                R[(i, j)] = torch.exp(terms[j] - total)
    _ = types
    return mu, logit, R


def conv_caps(poses, acts, weight, beta_a, beta_u, *, kernel, stride, iterations=3,
              final_lambda=1.0, pose="matrix"):
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
        mu, logit, _ = route(children, parents, edges, iterations, final_lambda, beta_a, beta_u)
        for (y, x, c), _c in parents:
            out_p[s][y][x][c] = mu[(y, x, c)]
            out_l[s][y][x][c] = logit[(y, x, c)]
    p = torch.stack([torch.stack([torch.stack([torch.stack(r) for r in row]) for row in img])
                     for img in out_p])
    lg = torch.stack([torch.stack([torch.stack([torch.stack(r) for r in row]) for row in img])
                      for img in out_l])
    return p, lg


def class_caps(poses, acts, weight, beta_a, beta_u, coords, *, iterations=3, final_lambda=1.0,
               pose="matrix", coord_add=True):
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
                        if coord_add:  # elements (0, 3) and (1, 3) of the 4x4 vote
                            add = torch.zeros_like(vt)
                            add[3] = coords[u, v, 0]
                            add[7] = coords[u, v, 1]
                            vt = vt + add
                        edges[((u, v, dd), e)] = vt
        mu, logit, _ = route(children, parents, edges, iterations, final_lambda, beta_a, beta_u)
        out_p.append(torch.stack([mu[e] for e in range(e_types)]))
        out_l.append(torch.stack([logit[e] for e in range(e_types)]))
    return torch.stack(out_p), torch.stack(out_l)


def capsnet_forward(model, x):
    """Reference logits (N, E) of a robustcaps CapsNet, using its parameters."""
    feat = F.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias, stride=2))
    y = F.conv2d(feat, model.primary.conv.weight, model.primary.conv.bias)
    n, _, h, w = y.shape
    btypes = model.primary.types
    y = y.permute(0, 2, 3, 1)
    poses = y[..., : 16 * btypes].reshape(n, h, w, btypes, 16)
    acts = torch.sigmoid(y[..., 16 * btypes:])
    kw = dict(iterations=model.iterations, pose=model.pose)
    for layer in (model.convcaps1, model.convcaps2):
        poses, logits = conv_caps(poses, acts, layer.weight, layer.beta_a, layer.beta_u,
                                  kernel=layer.K, stride=layer.stride,
                                  final_lambda=layer.final_lambda, **kw)
        acts = torch.sigmoid(logits)
    hh, ww = x.shape[2:]
    ho, wo = poses.shape[1:3]
    # receptive-field centres of the last conv capsules, in input pixels, scaled to [0, 1]
    coords = torch.zeros(ho, wo, 2, dtype=x.dtype)
    for r in range(ho):
        for c in range(wo):
            coords[r, c, 0] = (8 + 4 * r + 0.5) / hh
            coords[r, c, 1] = (8 + 4 * c + 0.5) / ww
    cl = model.classcaps
    _, logits = class_caps(poses, acts, cl.weight, cl.beta_a, cl.beta_u, coords,
                           final_lambda=cl.final_lambda, coord_add=model.coord_add, **kw)
    return logits
