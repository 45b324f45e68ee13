"""Chunked memory update: matmul formulas per chunk, a Python loop over chunks only.

Inside a chunk every gradient is taken at the chunk-start weights W_c, so the token loop
of DESIGN.md section 3 unrolls in closed form. With b(i, j) = prod_{i<m<=j} eta_m and
a(j) = prod_{j<m<n} (1 - alpha_m) over the n tokens of the piece:

    S_end = P S_0 - sum_i theta_i b(i, n-1) u_i                       P = prod_m eta_m
    W_end = A W_0 + Q S_0 - sum_i theta_i gamma_i u_i                 A = prod_m (1 - alpha_m)
    gamma_i = sum_{j>=i} a(j) b(i, j),   Q = sum_j a(j) prod_{m<=j} eta_m

and each u_i is a sum of outer products (mlp_grad_factors), so both sums are one matmul
per layer. Autograd runs through all of it for the outer loss.
"""

from __future__ import annotations

import torch

from .mlp import mlp_forward, mlp_grad_factors
from .state import MemoryState


def _log(x: torch.Tensor) -> torch.Tensor:
    # Gates come from sigmoids that can round to exactly 0/1 in fp32; clamp so the log (and
    # its gradient) stays finite. The clamp only acts where the product is ~0 anyway.
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """out[..., j, i] = sum_{i<m<=j} x[..., m] for j >= i, -inf above the diagonal.

    Built from masked cumulative sums rather than differences of one cumsum, so no
    cancellation error grows with the chunk length.
    """
    n = x.shape[-1]
    xx = x.unsqueeze(-1).expand(*x.shape, n)                       # [..., m, i] = x_m
    strict = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)
    seg = torch.cumsum(xx.masked_fill(~strict, 0.0), dim=-2)
    return seg.masked_fill(~strict.logical_or(torch.eye(n, dtype=torch.bool, device=x.device)), float("-inf"))


def decay_coefficients(theta, eta, alpha):
    """Per-token coefficients of one piece of n tokens. Gates: [B, H, n].

    Returns (c_s, c_w, P, A, Q): c_s/c_w [B, H, n] multiply u_i in S_end / W_end;
    P, A, Q [B, H] multiply S_0 and W_0.
    """
    log_eta, log_keep = _log(eta), _log(1.0 - alpha)
    b = torch.exp(_segsum(log_eta))                                # [B, H, j, i] = b(i, j)
    a = torch.exp(_segsum(log_keep)[..., -1, :])                   # [B, H, j]   = a(j)
    gamma = torch.einsum("bhj,bhji->bhi", a, b)
    c_s = -theta * b[..., -1, :]
    c_w = -theta * gamma
    cum_eta = torch.exp(torch.cumsum(log_eta, dim=-1))             # prod_{m<=j} eta_m
    P = cum_eta[..., -1]
    A = torch.exp(log_keep.sum(-1))
    Q = (a * cum_eta).sum(-1)
    return c_s, c_w, P, A, Q


def chunk_step(w_c, w_0, s_0, q, k, v, theta, eta, alpha):
    """One piece of a chunk (up to the chunk end): retrieval with W_c and the state update.

    w_c: chunk-start weights (retrieval and gradients); w_0, s_0: running weights and momentum
    before the piece. Returns y [B, H, n, d_out], w_end, s_end.
    """
    n = q.shape[2]
    both = mlp_forward(w_c, torch.cat([q, k], dim=2)) if len(w_c) == 1 else None
    if both is not None:                        # linear memory: retrieval and error share a matmul
        y, pred = both[:, :, :n], both[:, :, n:]
        factors = [(k, pred - v)]
    else:
        y = mlp_forward(w_c, q)
        factors = mlp_grad_factors(w_c, k, v)
    c_s, c_w, P, A, Q = decay_coefficients(theta, eta, alpha)
    c_s, c_w = c_s.unsqueeze(-1), c_w.unsqueeze(-1)
    w_end, s_end = [], []
    for (left, right), w, s in zip(factors, w_0, s_0):
        # sum_i c_i left_i^T right_i for both coefficient sets in one matmul
        upd = left.transpose(-1, -2) @ torch.cat([c_s * right, c_w * right], dim=-1)
        upd_s, upd_w = upd.split(right.shape[-1], dim=-1)
        s_end.append(P[..., None, None] * s + upd_s)
        w_end.append(A[..., None, None] * w + Q[..., None, None] * s + upd_w)
    return y, w_end, s_end


def chunked_scan(q, k, v, theta, eta, alpha, state: MemoryState):
    C, L = state.chunk_size, q.shape[2]
    w_c, w, s, pos = list(state.chunk_start), list(state.weights), list(state.momentum), state.position
    ys, t = [], 0
    while t < L:
        n = min(C - pos, L - t)                 # up to the next boundary of the global chunk grid
        sl = slice(t, t + n)
        y, w, s = chunk_step(w_c, w, s, q[:, :, sl], k[:, :, sl], v[:, :, sl],
                             theta[:, :, sl], eta[:, :, sl], alpha[:, :, sl])
        ys.append(y)
        t, pos = t + n, pos + n
        if pos == C:
            w_c, pos = w, 0
    y = torch.cat(ys, dim=2) if ys else q.new_zeros(q.shape[:3] + (v.shape[-1],))
    return y, MemoryState(w_c, w, s, pos, C)
