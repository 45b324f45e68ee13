"""impl="fused": the chunk loops of the Triton kernels written as batched PyTorch matmuls,
with the hand-written backward of ops/scan_function.py (the CPU fast path).

Against impl="chunked" (autograd through chunk_step) it records no graph per chunk and
keeps one (W, S) per chunk for backward instead of every per-token intermediate, so it
runs fewer, larger ops and its activation memory is O(L/C |W|). The formulas are those of
kernels/memory_fwd.py and kernels/memory_bwd.py with whole tiles (no blocking); each is
checked against the float64 per-token reference (tests/ops/test_fused_scan.py).

Per chunk, q and k share one matmul with W1 (stacked as [q; k], built once per call).
Depth 1 and 2; deeper memories use impl="chunked". The normalised residual memory
(norm = (ln_weight, ln_bias)) changes only the head of f, f = x + w LN(g) + b on top of
g = g_W(x): _head and _head_backward below, whose formulas are derived there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mlp import _INV_SQRT2PI, LN_EPS
from .scan_function import ScanConfig, scan_with_backend
from .state import MemoryState


def _gelu_grad2(h: torch.Tensor) -> torch.Tensor:
    """d^2/dh^2 of the exact (erf) GELU: phi(h) (2 - h^2)."""
    hh = h * h
    return torch.exp(hh * -0.5).mul_(_INV_SQRT2PI).mul_(hh.neg_().add_(2.0))


def _times_gelu_grad(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """g * gelu'(h) in one vectorised pass (the exact GELU's own backward kernel)."""
    return torch.ops.aten.gelu_backward(g, h)


def _stacked(q, k, c0: int, n: int, C: int) -> torch.Tensor:
    """[q_c; k_c] for chunks c0..c0+n-1: [BH, n, 2C, d], one copy per call."""
    BH, _, d = q.shape
    rows = slice(c0 * C, (c0 + n) * C)
    return torch.cat([q[:, rows].view(BH, n, C, d), k[:, rows].view(BH, n, C, d)], dim=2)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """<x_b, y_b> for every batch row: [BH, ...] x2 -> [BH]."""
    return (x * y).flatten(1).sum(1)


class TorchBackend:
    """The ScanBackend of ops/scan_function.py in PyTorch ops, batched over (batch, head)."""

    @staticmethod
    def new(shape, device, dtype) -> torch.Tensor:
        return torch.empty(shape, device=device, dtype=dtype)

    @staticmethod
    def forward(cfg, q, k, v, coefs, ws, ss, saved_w, saved_s, y=None, tok_chunk0=0, norm=None):
        cs, cw, P, A, Q = coefs
        n, C = P.shape[1], cfg.chunk_size
        qk = _stacked(q, k, tok_chunk0, n, C)
        norm = _per_row(norm)
        for c in range(n):
            if c % cfg.save_stride == 0:
                for dst, src in zip(saved_w + saved_s, ws + ss):
                    dst[:, c // cfg.save_stride] = src
            rows = slice((tok_chunk0 + c) * C, (tok_chunk0 + c + 1) * C)
            qkc, kc, vc = qk[:, c], k[:, rows], v[:, rows]
            if cfg.depth == 1:
                out, err, _ = _head(qkc @ ws[0], qkc, vc, False, norm)
                factors = [(kc, err)]
            else:
                h = qkc @ ws[0]
                z = F.gelu(h)
                out, err, _ = _head(z @ ws[1], qkc, vc, True, norm)
                gh = _times_gelu_grad(err @ ws[1].transpose(1, 2), h[:, C:])   # right_1
                factors = [(kc, gh), (z[:, C:], err)]
            if y is not None:
                y[:, rows] = out
            csc, cwc = cs[:, c * C:(c + 1) * C, None], cw[:, c * C:(c + 1) * C, None]
            p, a, qq = P[:, c, None, None], A[:, c, None, None], Q[:, c, None, None]
            for (left, right), w, s in zip(factors, ws, ss):
                lt = left.transpose(1, 2)
                w.mul_(a).add_(s * qq).baddbmm_(lt, cwc * right)          # W' = A W + Q S + G_w
                s.mul_(p).baddbmm_(lt, csc * right)                        # S' = P S + G_s

    @staticmethod
    def backward(cfg, q, k, v, dy, coefs, states_w, states_s, slot0, dws, dss, dq, dk, dv, tok_chunk0,
                 norm=None, dnorm=None):
        cs, cw, P, A, Q = coefs
        n, C = P.shape[1], cfg.chunk_size
        norm = _per_row(norm)
        dcoefs = [torch.empty_like(t) for t in coefs]
        qk = _stacked(q, k, tok_chunk0, n, C)
        step = _bwd_linear if cfg.depth == 1 else _bwd_mlp2
        for c in reversed(range(n)):
            rows = slice((tok_chunk0 + c) * C, (tok_chunk0 + c + 1) * C)
            tok = slice(c * C, (c + 1) * C)
            W = [w[:, slot0 + c] for w in states_w]
            S = [s[:, slot0 + c] for s in states_s]
            csc, cwc = cs[:, tok, None], cw[:, tok, None]
            dqc, dkc, dvc, dcs, dcw, dWc = step(qk[:, c], k[:, rows], v[:, rows], dy[:, rows], csc, cwc, W, dws, dss,
                                                norm, dnorm)
            dq[:, rows], dk[:, rows], dv[:, rows] = dqc, dkc, dvc
            dcoefs[0][:, tok], dcoefs[1][:, tok] = dcs, dcw
            dcoefs[2][:, c] = sum(_dot(ds, s) for ds, s in zip(dss, S))
            dcoefs[3][:, c] = sum(_dot(dw, w) for dw, w in zip(dws, W))
            dcoefs[4][:, c] = sum(_dot(dw, s) for dw, s in zip(dws, S))
            # the chunk-end state S' = P S + G_s, W' = A W + Q S + G_w, carried back to its start
            p, a, qq = P[:, c, None, None], A[:, c, None, None], Q[:, c, None, None]
            for dw, ds in zip(dws, dss):
                ds.mul_(p).add_(dw * qq)
            for dw, dwc in zip(dws, dWc):
                dw.mul_(a).add_(dwc)
        return dcoefs


def _per_row(norm):
    """(ln_weight, ln_bias) [BH, d] -> [BH, 1, d], broadcasting over a chunk's rows."""
    return None if norm is None else tuple(p.unsqueeze(1) for p in norm)


# The head of f on one chunk's stacked rows x = [q; k] [BH, 2C, d], from g = g_W(x):
#   plain:       f = g (depth 1) or x + g (depth 2, `skip`)
#   normalised:  f = x + w n + b,   n = LN(g) = (g - mean g) rstd,  rstd = (var g + eps)^-1/2
# and the inner loss's gradient at the keys, the right factor of the last layer:
#   err = d l / d g = J (w e),   e = f(k) - v,   J = d n / d g = rstd (I - 11^T/d - n n^T/d)
# (J is symmetric, so J^T x = J x = layer_norm_backward(x, n, rstd)).
#
# Backward (_head_backward). Given dy (gradient of the reads f(q)) and a = dL/d err (what the
# update sends back to the right factor: the memory's state gradients times c_s, c_w, plus
# the second layer's path), with r = w e:
#   a_r  = J a                                       dL/dr
#   de   = w a_r                                     dL/de: e = k + w n + b - v, so
#   dk  += de,  dv = -de,  db += de,  dw += a_r e + de n
#   dg_k = J (w de)                                  through n inside e
#        + d/dg <a, J(g) r> at fixed r               the second-order term, J depends on g:
#        = -(rstd/d) (<a, err> n + <r, n> a_r + <a, n> err)
#   (d rstd/dg = -rstd^2 n / d and d n/dg = J give it; it is symmetric in a and r.)
# Reads y = q + w n_q + b: dg_q = J_q (w dy), dq += dy, dw += dy n_q, db += dy.
# Plain heads: dg = [dy; a], dv = -a, and with the skip dq += dy, dk += a.
# dg then flows into g_W as in the plain memory (g = x W, or g = gelu(x W1) W2).


def _layer_norm(g: torch.Tensor):
    """LN(g) over the last dim without affine, its mean and rstd ([.., 1]): one aten kernel."""
    return torch.native_layer_norm(g, (g.shape[-1],), None, None, LN_EPS)


def _layer_norm_vjp(x: torch.Tensor, g: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """J x = d/dg <x, LN(g)> (mlp.layer_norm_backward) in one aten kernel. The CPU kernel reads
    mean and rstd as if contiguous (a row slice of them gives wrong values), so they are made so."""
    return torch.ops.aten.native_layer_norm_backward(x, g, (g.shape[-1],), mean.contiguous(), rstd.contiguous(),
                                                     None, None, [True, False, False])[0]


def _head(g, x, v, skip, norm):
    """f(q) for the reads and err = d l / d g at the keys, from g = g_W([q; k]) (may be changed
    in place); the third value is what _head_backward needs (None for a plain head)."""
    C = v.shape[1]
    if norm is None:
        f = g.add_(x) if skip else g
        return f[:, :C], f[:, C:] - v, None
    normed, mean, rstd = _layer_norm(g)
    f = torch.addcmul(norm[1], norm[0], normed).add_(x)
    e = f[:, C:] - v
    err = _layer_norm_vjp(norm[0] * e, g[:, C:], mean[:, C:], rstd[:, C:])
    return f[:, :C], err, (g, normed, mean, rstd, e)


def _head_backward(dy, derr, err, saved, skip, norm, dnorm):
    """The head's VJP (derivation above): dg [BH, 2C, d] = [dg_q; dg_k], the direct terms of dq
    and dk (None where there are none) and dv; adds the norm's gradients into dnorm [BH, d]."""
    if norm is None:
        return torch.cat([dy, derr], dim=1), (dy if skip else None), (derr if skip else None), -derr
    w = norm[0]
    g, normed, mean, rstd, e = saved
    C, d = dy.shape[1], dy.shape[-1]
    nq, nk, rk = normed[:, :C], normed[:, C:], rstd[:, C:]
    a_r = _layer_norm_vjp(derr, g[:, C:], mean[:, C:], rk)
    de = w * a_r
    dot = lambda x, y: (x * y).sum(-1, keepdim=True)  # noqa: E731
    second = dot(derr, err) * nk + dot(w * e, nk) * a_r + dot(derr, nk) * err
    dg = _layer_norm_vjp(w * torch.cat([dy, de], dim=1), g, mean, rstd)    # [J_q (w dy); J_k (w de)]
    dg[:, C:].sub_(second.mul_(rk / d))
    dnorm[0].add_((a_r * e + de * nk).sum(1) + (dy * nq).sum(1))
    dnorm[1].add_(de.sum(1) + dy.sum(1))
    return dg, dy, de, -de


def _bwd_linear(qkc, k, v, dy, cs, cw, W, dws, dss, norm, dnorm):
    """Chunk VJP, g(x) = x W: returns dq, dk, dv, dc_s, dc_w and [dW_c] (the terms at W_c)."""
    (Wc,), (dW,), (dS,) = W, dws, dss
    C = k.shape[1]
    if norm is None:                        # only the keys' rows: the reads need no g
        err, saved = qkc[:, C:] @ Wc - v, None
    else:
        _, err, saved = _head(qkc @ Wc, qkc, v, False, norm)
    m_s, m_w = k @ dS, k @ dW
    derr = cs * m_s + cw * m_w
    dcs, dcw = (m_s * err).sum(-1), (m_w * err).sum(-1)
    dg, dq_direct, dk_direct, dv = _head_backward(dy, derr, err, saved, False, norm, dnorm)
    dx = dg @ Wc.transpose(1, 2)                                            # [d q; d k] through g = x W
    dk = (cs * err) @ dS.transpose(1, 2) + (cw * err) @ dW.transpose(1, 2) + dx[:, C:]
    dq = dx[:, :C]
    if dk_direct is not None:
        dk, dq = dk + dk_direct, dq + dq_direct
    dWc = qkc.transpose(1, 2) @ dg                                          # q^T dg_q + k^T dg_k
    return dq, dk, dv, dcs, dcw, [dWc]


def _bwd_mlp2(qkc, k, v, dy, cs, cw, W, dws, dss, norm, dnorm):
    """Chunk VJP, g(x) = gelu(x W1) W2 (names as kernels/memory_bwd.py)."""
    (W1, W2), (dW1, dW2), (dS1, dS2) = W, dws, dss
    C = k.shape[1]
    h = qkc @ W1
    hk = h[:, C:]
    z = F.gelu(h)
    zk = z[:, C:]
    if norm is None:
        err, saved = zk @ W2 + k - v, None
    else:
        _, err, saved = _head(z @ W2, qkc, v, True, norm)
    W2t = W2.transpose(1, 2)
    e2 = err @ W2t
    gh = _times_gelu_grad(e2, hk)                                           # right_1
    m1s, m1w = k @ dS1, k @ dW1
    m2s, m2w = zk @ dS2, zk @ dW2
    dcs = (m1s * gh).sum(-1) + (m2s * err).sum(-1)
    dcw = (m1w * gh).sum(-1) + (m2w * err).sum(-1)
    dgh = cs * m1s + cw * m1w
    de2 = _times_gelu_grad(dgh, hk)
    derr = de2 @ W2 + cs * m2s + cw * m2w
    dg, dq_direct, dk_direct, dv = _head_backward(dy, derr, err, saved, True, norm, dnorm)
    dzg = dg @ W2t                                                          # through g = z W2
    # d z_k: from the layer-2 factor (left = z) and from g
    dz = (cs * err) @ dS2.transpose(1, 2) + (cw * err) @ dW2.transpose(1, 2) + dzg[:, C:]
    dhk = _times_gelu_grad(dz, hk).add_(dgh.mul_(e2).mul_(_gelu_grad2(hk)))
    dhq = _times_gelu_grad(dzg[:, :C], h[:, :C])                            # the reads' g
    dh = torch.cat([dhq, dhk], dim=1)
    dx = dh @ W1.transpose(1, 2)                                            # [d q; d k] through h = x W1
    dk = dx[:, C:] + dk_direct + (cs * gh) @ dS1.transpose(1, 2) + (cw * gh) @ dW1.transpose(1, 2)
    dq = dx[:, :C] + dq_direct
    dW1c = qkc.transpose(1, 2) @ dh
    dW2c = torch.baddbmm(de2.transpose(1, 2) @ err, z.transpose(1, 2), dg)
    return dq, dk, dv, dcs, dcw, [dW1c, dW2c]


def unsupported(q: torch.Tensor, state: MemoryState) -> str | None:
    if state.depth > 2:
        return f"impl='fused' covers memory depth 1 and 2, got depth {state.depth}; use impl='chunked'"
    return None


def fused_scan(q, k, v, theta, eta, alpha, state: MemoryState, recompute_group: int | None = None, norm=None):
    cfg = ScanConfig.of(q, v, state, recompute_group)
    return scan_with_backend(TorchBackend, cfg, q, k, v, theta, eta, alpha, state, norm)

