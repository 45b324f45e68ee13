"""Chunked memory update: matmul formulas per chunk, a Python loop over chunks only.

Inside a chunk every gradient is taken at the chunk-start weights W_c, so the token loop
of docs/design.md section 3 unrolls in closed form. With b(i, j) = prod_{i<m<=j} eta_m and
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
from .recompute import recompute_groups, run_checkpointed
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
    """Per-token coefficients of one piece of n tokens. Gates: [..., n] (e.g. [B, H, n],
    or [B, H, chunks, C] for many chunks at once).

    Returns (c_s, c_w, P, A, Q): c_s/c_w [..., n] multiply u_i in S_end / W_end;
    P, A, Q [...] multiply S_0 and W_0.
    """
    log_eta, log_keep = _log(eta), _log(1.0 - alpha)
    b = torch.exp(_segsum(log_eta))                                # [..., j, i] = b(i, j)
    a = torch.exp(_segsum(log_keep)[..., -1, :])                   # [..., j]    = a(j)
    gamma = torch.einsum("...j,...ji->...i", a, b)
    c_s = -theta * b[..., -1, :]
    c_w = -theta * gamma
    cum_eta = torch.exp(torch.cumsum(log_eta, dim=-1))             # prod_{m<=j} eta_m
    P = cum_eta[..., -1]
    A = torch.exp(log_keep.sum(-1))
    Q = (a * cum_eta).sum(-1)
    return c_s, c_w, P, A, Q


def chunk_step(w_c, w_0, s_0, q, k, v, coefficients, norm=None):
    """One piece of a chunk (up to the chunk end): retrieval with W_c and the state update.

    w_c: chunk-start weights (retrieval and gradients); w_0, s_0: running weights and momentum
    before the piece; coefficients: decay_coefficients of the piece's gates; norm: the
    normalised memory's (ln_weight, ln_bias) or None.
    Returns y [B, H, n, d_out], w_end, s_end.
    """
    n = q.shape[2]
    if len(w_c) == 1 and norm is None:          # linear memory: retrieval and error share a matmul
        both = torch.cat([q, k], dim=2) @ w_c[0]
        y, factors = both[:, :, :n], [(k, both[:, :, n:] - v)]
    else:
        y = mlp_forward(w_c, q, norm)
        factors = mlp_grad_factors(w_c, k, v, norm)
    c_s, c_w, P, A, Q = coefficients
    c_s, c_w = c_s.unsqueeze(-1), c_w.unsqueeze(-1)
    P, A, Q = P[..., None, None], A[..., None, None], Q[..., None, None]
    w_end, s_end = [], []
    for (left, right), w, s in zip(factors, w_0, s_0):
        # sum_i c_i left_i^T right_i for both coefficient sets in one matmul
        upd = left.transpose(-1, -2) @ torch.cat([c_s * right, c_w * right], dim=-1)
        upd_s, upd_w = upd.split(right.shape[-1], dim=-1)
        s_end.append(P * s + upd_s)
        w_end.append(A * w + Q * s + upd_w)
    return y, w_end, s_end


def pieces(position: int, chunk_size: int, length: int) -> list[tuple[int, int]]:
    """(start, n) of the pieces a sequence of `length` tokens splits into on the global chunk
    grid, when `position` tokens of the current chunk were already consumed."""
    out, t = [], 0
    while t < length:
        n = min(chunk_size - position, length - t)
        out.append((t, n))
        t, position = t + n, (position + n) % chunk_size
    return out


def piece_coefficients(theta, eta, alpha, spans, chunk_size):
    """decay_coefficients for every piece; the run of full chunks is computed in one batch."""
    full = [i for i, (_, n) in enumerate(spans) if n == chunk_size]
    coefs = [None] * len(spans)
    if full:
        a, nc = spans[full[0]][0], len(full)
        shape = (*theta.shape[:2], nc, chunk_size)
        body = decay_coefficients(*(g[:, :, a:a + nc * chunk_size].reshape(shape)
                                    for g in (theta, eta, alpha)))
        per_chunk = [c.unbind(2) for c in body]     # one backward node for all chunks, not one each
        for j, i in enumerate(full):
            coefs[i] = tuple(c[j] for c in per_chunk)
    for i, (a, n) in enumerate(spans):
        if coefs[i] is None:
            coefs[i] = decay_coefficients(theta[:, :, a:a + n], eta[:, :, a:a + n], alpha[:, :, a:a + n])
    return coefs


def _scan_span(q, k, v, theta, eta, alpha, w_c, w, s, pos: int, C: int, norm=None):
    """The chunk steps of one span of tokens that starts `pos` tokens into a chunk."""
    spans = pieces(pos, C, q.shape[2])
    # split (not slice): backward gathers the pieces' gradients with one cat, where a slice
    # per piece would zero-fill a full-length gradient per piece (quadratic in L)
    qs, ks, vs = (x.split([n for _, n in spans], dim=2) for x in (q, k, v))
    ys = []
    for i, coef in enumerate(piece_coefficients(theta, eta, alpha, spans, C)):
        y, w, s = chunk_step(w_c, w, s, qs[i], ks[i], vs[i], coef, norm)
        ys.append(y)
        n = spans[i][1]
        pos = (pos + n) % C
        if pos == 0:                            # the chunk is finished: W_{c+1} = W at its end
            w_c = w
    y = torch.cat(ys, dim=2) if ys else q.new_zeros(q.shape[:3] + (v.shape[-1],))
    return y, w_c, w, s


def chunked_scan(q, k, v, theta, eta, alpha, state: MemoryState, recompute_group: int | None = None,
                 norm=None):
    """recompute_group=g > 0: backward keeps one state per g chunk pieces and recomputes the
    rest (ops/recompute.py), with the same gradients."""
    C, L, pos = state.chunk_size, q.shape[2], state.position
    inputs = (q, k, v, theta, eta, alpha)
    carry = (list(state.chunk_start), list(state.weights), list(state.momentum))
    groups = recompute_groups(pieces(pos, C, L), recompute_group, [*inputs, *state.tensors()])
    if groups is None:
        y, *carry = _scan_span(*inputs, *carry, pos, C, norm)
    else:
        ys = []
        parts = [x.split([b - a for a, b in groups], dim=2) for x in inputs]
        for i, (a, _) in enumerate(groups):
            y, *carry = run_checkpointed(_scan_span, *(p[i] for p in parts), *carry, (pos + a) % C, C, norm)
            ys.append(y)
        y = torch.cat(ys, dim=2)
    return y, MemoryState(*carry, (pos + L) % C, C)
