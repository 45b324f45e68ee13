"""Forward Triton kernels of the memory scan: one fused step per chunk, looped over chunks.

One program owns one (batch, head) and walks its chunks in order. For chunk c with
chunk-start state (W_c, S_c) it computes (DESIGN.md section 3, closed form in
titans_scale/ops/chunked.py):

    y        = f_{W_c}(q)                                   retrieval
    u_i      = left_i^T right_i                             per-token gradient factors at W_c
    S_{c+1}  = P S_c + left^T (c_s * right)
    W_{c+1}  = A W_c + Q S_c + left^T (c_w * right)

The gate coefficients (c_s, c_w per token; P, A, Q per chunk) come from the host
(chunked.decay_coefficients), so the kernels hold only matmuls and GELUs. Memory layouts
(all contiguous, fp32 unless noted):

    q, k, v, y   [BH, T, d]          any float dtype in, cast to fp32 on load; chunk c of the
                                     launch is tokens (tok_chunk0 + c) * C ...
    cs, cw       [BH, n * C]         coefficients of the launch's n chunks
    P, A, Q      [BH, n]
    W_l, S_l     [BH, in, out]       the running state: read at the start, overwritten
                                     with the state after the last chunk
    saved W_l/S_l [BH, slots, in, out] chunk c's start state lands in slot c // save_stride
                                     when c % save_stride == 0 (recompute keeps 1 in g)

Depth 1 (f(k) = k W): a program owns (bh, one tile of output columns); columns are
independent, so the state tile stays in registers for the whole sequence. Depth 2
(f(k) = k + gelu(k W1) W2): a program owns one bh; the hidden units are walked in tiles
of BLOCK_J twice per chunk (prediction error first, then the update tile by tile) with
the state kept in the global W/S buffers.

The normalised residual memory (NORM, DESIGN.md section 3): f(k) = k + w LN(g(k)) + b with
g the linear map or the MLP without its skip, w, b = ln_weight, ln_bias [BH, d] (fp32). LN
couples the d outputs of a row, so a depth-1 program then owns every output column (one
tile, BLOCK_OUT >= D_OUT); depth 2 already sums the full row of g over its hidden tiles
before using it. The per-token error factor d l_t / d g becomes the LN backward of
w (f(k) - v) (ops/mlp.py mlp_grad_factors), the retrieval q + w LN(g(q)) + b.
"""

from __future__ import annotations

import triton
import triton.language as tl

_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT2PI = tl.constexpr(0.3989422804014327)
LN_EPS = tl.constexpr(1e-5)


@triton.jit
def chunk_coefficients(cs_ptr, cw_ptr, p_ptr, a_ptr, qq_ptr, bh, n_chunks, c, rc, mc, C: tl.constexpr):
    """Chunk c's closed-form scan coefficients: per token cs, cw [C, 1] (with their flat index) and
    the chunk's P, A, Q (docs/kernels.md)."""
    cidx = bh * n_chunks * C + c * C + rc
    cs = tl.load(cs_ptr + cidx, mask=mc, other=0.0)[:, None]
    cw = tl.load(cw_ptr + cidx, mask=mc, other=0.0)[:, None]
    base = bh * n_chunks + c
    return cidx, cs, cw, tl.load(p_ptr + base), tl.load(a_ptr + base), tl.load(qq_ptr + base)


@triton.jit
def hidden_tile(j0, rd, md, HID, D, BLOCK_J: tl.constexpr):
    """Masks and offsets of hidden tile [j0, j0 + BLOCK_J) in W1 [D, HID] (its columns) and
    W2 [HID, D] (its rows): (mask1, mask2, offsets1, offsets2)."""
    rj = j0 + tl.arange(0, BLOCK_J)
    mj = rj < HID
    mask1, mask2 = md[:, None] & mj[None, :], mj[:, None] & md[None, :]
    return mask1, mask2, rd[:, None] * HID + rj[None, :], rj[:, None] * D + rd[None, :]


@triton.jit
def gelu(h):
    """Exact (erf) GELU, as torch.nn.functional.gelu."""
    return 0.5 * h * (1.0 + tl.math.erf(h * _INV_SQRT2))


@triton.jit
def gelu_grad(h):
    """d/dh gelu(h) = Phi(h) + h phi(h)."""
    return 0.5 * (1.0 + tl.math.erf(h * _INV_SQRT2)) + h * tl.exp(-0.5 * h * h) * _INV_SQRT2PI


@triton.jit
def gelu_grad2(h):
    """d^2/dh^2 gelu(h) = phi(h) (2 - h^2)."""
    return tl.exp(-0.5 * h * h) * _INV_SQRT2PI * (2.0 - h * h)


@triton.jit
def layer_norm(g, mcol, D: tl.constexpr):
    """LN over the D valid columns of each row of g (its padding columns hold 0), no affine:
    (LN(g), 1/sqrt(var + eps) [rows, 1]); 0 in the padding."""
    mean = tl.sum(g, axis=1)[:, None] / D
    centred = tl.where(mcol[None, :], g - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1)[:, None] / D + LN_EPS)
    return centred * rstd, rstd


@triton.jit
def layer_norm_backward(x, normed, rstd, mcol, D: tl.constexpr):
    """d/dg <x, LN(g)> = rstd (x - mean(x) - LN(g) mean(x LN(g))) per row (ops/mlp.py)."""
    mean = tl.sum(x, axis=1)[:, None] / D
    mean_xn = tl.sum(x * normed, axis=1)[:, None] / D
    return tl.where(mcol[None, :], rstd * (x - mean - normed * mean_xn), 0.0)


@triton.jit
def norm_read(q, g, lw, lb, mcol, D: tl.constexpr):
    """The normalised memory's retrieval q + w LN(g(q)) + b (lw, lb: [1, cols])."""
    return q + lw * layer_norm(g, mcol, D)[0] + lb


@triton.jit
def norm_error(g, k, v, lw, lb, mcol, D: tl.constexpr):
    """d l_t / d g at g = g(k) for f(k) = k + w LN(g) + b: the LN backward of w a, a = f(k) - v.
    Returns (that error, LN(g), rstd, a); the backward kernels need all four."""
    normed, rstd = layer_norm(g, mcol, D)
    a = k + lw * normed + lb - v
    return layer_norm_backward(lw * a, normed, rstd, mcol, D), normed, rstd, a


@triton.jit
def load_norm(lw_ptr, lb_ptr, bh, rcol, mcol, D: tl.constexpr):
    """ln_weight, ln_bias rows of this (batch, head) as [1, cols] (0 in the padding)."""
    lw = tl.load(lw_ptr + bh * D + rcol, mask=mcol, other=0.0)[None, :]
    lb = tl.load(lb_ptr + bh * D + rcol, mask=mcol, other=0.0)[None, :]
    return lw, lb


@triton.jit
def load_rows(ptr, bh, T, tok, rcol, mrow, mcol, WIDTH: tl.constexpr):
    """A [rows, cols] tile of a [BH, T, WIDTH] tensor, cast to fp32 (0 outside the masks)."""
    off = (bh * T + tok)[:, None] * WIDTH + rcol[None, :]
    return tl.load(ptr + off, mask=mrow[:, None] & mcol[None, :], other=0.0).to(tl.float32)


@triton.jit
def _fwd_linear(
    q_ptr, k_ptr, v_ptr, cs_ptr, cw_ptr, p_ptr, a_ptr, qq_ptr,
    y_ptr, w_ptr, s_ptr, sw_ptr, ss_ptr, lw_ptr, lb_ptr,
    n_chunks, tok_chunk0, n_tok_chunks, save_stride, n_slots,
    C: tl.constexpr, D_IN: tl.constexpr, D_OUT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr,
    WRITE_Y: tl.constexpr, NORM: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BLOCK_C)
    ri = tl.arange(0, BLOCK_IN)
    ro = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    mc, mi, mo = rc < C, ri < D_IN, ro < D_OUT
    T = n_tok_chunks * C
    if NORM:        # LN couples a row's outputs: one tile holds them all (and f adds k: d_in = d_out)
        tl.static_assert(BLOCK_OUT == BLOCK_IN)
        lw, lb = load_norm(lw_ptr, lb_ptr, bh, ro, mo, D_OUT)
    m_w = mi[:, None] & mo[None, :]
    w_off = ri[:, None] * D_OUT + ro[None, :]
    W = tl.load(w_ptr + bh * D_IN * D_OUT + w_off, mask=m_w, other=0.0)
    S = tl.load(s_ptr + bh * D_IN * D_OUT + w_off, mask=m_w, other=0.0)
    for c in range(n_chunks):
        if c % save_stride == 0:
            slot = (bh * n_slots + c // save_stride) * D_IN * D_OUT
            tl.store(sw_ptr + slot + w_off, W, mask=m_w)
            tl.store(ss_ptr + slot + w_off, S, mask=m_w)
        tok = (tok_chunk0 + c) * C + rc
        k = load_rows(k_ptr, bh, T, tok, ri, mc, mi, D_IN)
        v = load_rows(v_ptr, bh, T, tok, ro, mc, mo, D_OUT)
        if WRITE_Y:
            q = load_rows(q_ptr, bh, T, tok, ri, mc, mi, D_IN)
            y = tl.dot(q, W, input_precision=PRECISION)
            if NORM:
                y = norm_read(q, y, lw, lb, mo, D_OUT)
            tl.store(y_ptr + (bh * T + tok)[:, None] * D_OUT + ro[None, :], y, mask=mc[:, None] & mo[None, :])
        _, cs, cw, P, A, Q = chunk_coefficients(cs_ptr, cw_ptr, p_ptr, a_ptr, qq_ptr, bh, n_chunks, c, rc, mc, C)
        if NORM:
            err = norm_error(tl.dot(k, W, input_precision=PRECISION), k, v, lw, lb, mo, D_OUT)[0]
        else:
            err = tl.dot(k, W, input_precision=PRECISION) - v      # grad of l_t w.r.t. f
        kt = tl.trans(k)
        W_new = A * W + Q * S + tl.dot(kt, cw * err, input_precision=PRECISION)
        S = P * S + tl.dot(kt, cs * err, input_precision=PRECISION)
        W = W_new
    tl.store(w_ptr + bh * D_IN * D_OUT + w_off, W, mask=m_w)
    tl.store(s_ptr + bh * D_IN * D_OUT + w_off, S, mask=m_w)


@triton.jit
def _fwd_mlp2(
    q_ptr, k_ptr, v_ptr, cs_ptr, cw_ptr, p_ptr, a_ptr, qq_ptr,
    y_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr, sw1_ptr, sw2_ptr, ss1_ptr, ss2_ptr, lw_ptr, lb_ptr,
    n_chunks, tok_chunk0, n_tok_chunks, save_stride, n_slots,
    C: tl.constexpr, D: tl.constexpr, HID: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
    WRITE_Y: tl.constexpr, NORM: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BLOCK_C)
    rd = tl.arange(0, BLOCK_D)
    mc, md = rc < C, rd < D
    T = n_tok_chunks * C
    m_x = mc[:, None] & md[None, :]
    W_SIZE = D * HID
    if NORM:
        lw, lb = load_norm(lw_ptr, lb_ptr, bh, rd, md, D)
    for c in range(n_chunks):
        tok = (tok_chunk0 + c) * C + rc
        k = load_rows(k_ptr, bh, T, tok, rd, mc, md, D)
        v = load_rows(v_ptr, bh, T, tok, rd, mc, md, D)
        # pass 1: retrieval and the prediction error, both at W_c (sums over hidden tiles)
        pred = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
        if WRITE_Y:
            q = load_rows(q_ptr, bh, T, tok, rd, mc, md, D)
            y = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)           # g(q)
        for j0 in range(0, HID, BLOCK_J):
            m1, m2, o1, o2 = hidden_tile(j0, rd, md, HID, D, BLOCK_J)
            off1 = bh * W_SIZE + o1                                      # W1 [D, HID], this tile's columns
            off2 = bh * W_SIZE + o2                                      # W2 [HID, D], this tile's rows
            W1 = tl.load(w1_ptr + off1, mask=m1, other=0.0)
            W2 = tl.load(w2_ptr + off2, mask=m2, other=0.0)
            zk = gelu(tl.dot(k, W1, input_precision=PRECISION))
            pred += tl.dot(zk, W2, input_precision=PRECISION)
            if WRITE_Y:
                zq = gelu(tl.dot(q, W1, input_precision=PRECISION))
                y += tl.dot(zq, W2, input_precision=PRECISION)
        if WRITE_Y:
            if NORM:
                y = norm_read(q, y, lw, lb, md, D)
            else:
                y = q + y
            tl.store(y_ptr + (bh * T + tok)[:, None] * D + rd[None, :], y, mask=m_x)
        if NORM:
            err = norm_error(pred, k, v, lw, lb, md, D)[0]
        else:
            err = k + pred - v                                           # d l_t / d f (skip adds k)
        _, cs, cw, P, A, Q = chunk_coefficients(cs_ptr, cw_ptr, p_ptr, a_ptr, qq_ptr, bh, n_chunks, c, rc, mc, C)
        save = c % save_stride == 0
        slot = (bh * n_slots + c // save_stride) * W_SIZE
        kt = tl.trans(k)
        tl.debug_barrier()
        # pass 2: per hidden tile, the layer gradients and the momentum / weight update
        for j0 in range(0, HID, BLOCK_J):
            m1, m2, o1, o2 = hidden_tile(j0, rd, md, HID, D, BLOCK_J)
            W1 = tl.load(w1_ptr + bh * W_SIZE + o1, mask=m1, other=0.0)
            W2 = tl.load(w2_ptr + bh * W_SIZE + o2, mask=m2, other=0.0)
            S1 = tl.load(s1_ptr + bh * W_SIZE + o1, mask=m1, other=0.0)
            S2 = tl.load(s2_ptr + bh * W_SIZE + o2, mask=m2, other=0.0)
            if save:
                tl.store(sw1_ptr + slot + o1, W1, mask=m1)
                tl.store(sw2_ptr + slot + o2, W2, mask=m2)
                tl.store(ss1_ptr + slot + o1, S1, mask=m1)
                tl.store(ss2_ptr + slot + o2, S2, mask=m2)
            hk = tl.dot(k, W1, input_precision=PRECISION)
            zt = tl.trans(gelu(hk))
            gh = tl.dot(err, tl.trans(W2), input_precision=PRECISION) * gelu_grad(hk)   # d l / d hk
            W1n = A * W1 + Q * S1 + tl.dot(kt, cw * gh, input_precision=PRECISION)
            S1n = P * S1 + tl.dot(kt, cs * gh, input_precision=PRECISION)
            W2n = A * W2 + Q * S2 + tl.dot(zt, cw * err, input_precision=PRECISION)
            S2n = P * S2 + tl.dot(zt, cs * err, input_precision=PRECISION)
            tl.store(w1_ptr + bh * W_SIZE + o1, W1n, mask=m1)
            tl.store(s1_ptr + bh * W_SIZE + o1, S1n, mask=m1)
            tl.store(w2_ptr + bh * W_SIZE + o2, W2n, mask=m2)
            tl.store(s2_ptr + bh * W_SIZE + o2, S2n, mask=m2)
        tl.debug_barrier()
