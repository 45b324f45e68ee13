"""Backward Triton kernels of the memory scan: the chunk step's vector-Jacobian product.

One program owns one (batch, head) and walks the chunks of a launch in reverse. It reads
chunk c's start state (W_c, S_c) from a states buffer (saved by the forward kernel, or
recomputed per group when recompute is on) and carries the gradients (dW, dS) w.r.t. the
state at the end of chunk c in global buffers, overwriting them with the gradients at its
start. With G_s = left^T (c_s * right), G_w = left^T (c_w * right):

    dS_c   = P dS + Q dW                    dP = <dS, S_c>, dA = <dW, W_c>, dQ = <dW, S_c>
    dW_c   = A dW + (terms through y = f_{W_c}(q) and through the gradient factors at W_c)
    d left = (c_s right) dS^T + (c_w right) dW^T,   d right = c_s (left dS) + c_w (left dW)
    dc_s_i = <left_i dS, right_i>,  dc_w_i = <left_i dW, right_i>

then back through the factors to k, v and W_c: the outer gradient flows through the
inner gradient (second-order terms). Outputs per token: dq, dk, dv, dc_s, dc_w; per
chunk: dP, dA, dQ (the host maps the coefficient gradients back to theta, eta, alpha).
Layouts as in memory_fwd.py; states [BH, slots, in, out] with chunk c at slot0 + c.

The normalised memory (depth 2: NORM; depth 1: _bwd_linear_norm, which walks the state in row
tiles; f(k) = k + w LN(g) + b, g = g_W(k)). Per token, with
n = LN(g), r = 1/sqrt(var(g) + eps), J = dn/dg = r (I - 11^T/d - n n^T/d) (symmetric),
a = f(k) - v and u = w a, the error factor is err = J u (memory_fwd.norm_error). Given
de = dL/d err (what the plain kernels call derr):

    du = J de,   da = w du   ->  dk += da, dv = -da, d ln_bias += da, d ln_weight += a du + n da
    dg = J (w da) - r (mean(de err) n + mean(u n) du + mean(de n) err)

(J (w da): through n inside a; the rest: J's own dependence on g, through n and through r
with dr/dg = -r^2 n / d). dg takes the place of derr on the path through g (W_c, z, k). The
retrieval y = q + w LN(g(q)) + b sends dq += dy and, into g(q), J_q (w dy); d ln_weight +=
dy n_q, d ln_bias += dy. Sums over tokens of d ln_weight/ln_bias are added into
dlw, dlb [BH, d] at the end of the launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .memory_fwd import (
    chunk_coefficients, gelu, gelu_grad, gelu_grad2, hidden_tile, layer_norm, layer_norm_backward, load_norm,
    load_rows, norm_error,
)


@triton.jit
def _store_rows(ptr, x, bh, T, tok, rcol, mrow, mcol, WIDTH: tl.constexpr):
    tl.store(ptr + (bh * T + tok)[:, None] * WIDTH + rcol[None, :], x, mask=mrow[:, None] & mcol[None, :])


@triton.jit
def norm_error_backward(derr, err, normed, rstd, a, lw, mcol, D: tl.constexpr):
    """dL/dg and dL/da from dL/d err for err = J (w a) (the module docstring), and du."""
    du = layer_norm_backward(derr, normed, rstd, mcol, D)
    da = lw * du
    mean_de = tl.sum(derr * err, axis=1)[:, None] / D
    mean_un = tl.sum(lw * a * normed, axis=1)[:, None] / D
    mean_dn = tl.sum(derr * normed, axis=1)[:, None] / D
    second = mean_de * normed + mean_un * du + mean_dn * err
    return layer_norm_backward(lw * da, normed, rstd, mcol, D) - rstd * second, da, du


@triton.jit
def _add_row(ptr, x, bh, rcol, mcol, D: tl.constexpr):
    """ptr[bh, :] += x (one program owns the row)."""
    off = bh * D + rcol
    tl.store(ptr + off, tl.load(ptr + off, mask=mcol, other=0.0) + x, mask=mcol)


@triton.jit
def _bwd_linear(
    q_ptr, k_ptr, v_ptr, dy_ptr, cs_ptr, cw_ptr, p_ptr, a_ptr, qq_ptr,
    sw_ptr, ss_ptr, dw_ptr, ds_ptr, lw_ptr, lb_ptr,
    dq_ptr, dk_ptr, dv_ptr, dcs_ptr, dcw_ptr, dp_ptr, da_ptr, dqq_ptr, dlw_ptr, dlb_ptr,
    n_chunks, tok_chunk0, n_tok_chunks, slot0, n_slots,
    C: tl.constexpr, D_IN: tl.constexpr, D_OUT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr, PRECISION: tl.constexpr,
):
    """The plain linear memory, tiled over output columns (they are independent). lw/lb and
    dlw/dlb are not read: they keep the launch's argument list that of _bwd_linear_norm."""
    bh = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BLOCK_C)
    ri = tl.arange(0, BLOCK_IN)
    mc, mi = rc < C, ri < D_IN
    T = n_tok_chunks * C
    W_SIZE = D_IN * D_OUT
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        tok = (tok_chunk0 + c) * C + rc
        q = load_rows(q_ptr, bh, T, tok, ri, mc, mi, D_IN)
        k = load_rows(k_ptr, bh, T, tok, ri, mc, mi, D_IN)
        cidx, cs, cw, P, A, Q = chunk_coefficients(cs_ptr, cw_ptr, p_ptr, a_ptr, qq_ptr, bh, n_chunks, c, rc, mc, C)
        slot = (bh * n_slots + slot0 + c) * W_SIZE
        dq = tl.zeros((BLOCK_C, BLOCK_IN), dtype=tl.float32)
        dk = tl.zeros((BLOCK_C, BLOCK_IN), dtype=tl.float32)
        dcs = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dcw = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_p = tl.zeros((BLOCK_IN, BLOCK_OUT), dtype=tl.float32)
        acc_a = tl.zeros((BLOCK_IN, BLOCK_OUT), dtype=tl.float32)
        acc_q = tl.zeros((BLOCK_IN, BLOCK_OUT), dtype=tl.float32)
        for o0 in range(0, D_OUT, BLOCK_OUT):          # output columns are independent
            ro = o0 + tl.arange(0, BLOCK_OUT)
            mo = ro < D_OUT
            m_w = mi[:, None] & mo[None, :]
            w_off = ri[:, None] * D_OUT + ro[None, :]
            W = tl.load(sw_ptr + slot + w_off, mask=m_w, other=0.0)
            S = tl.load(ss_ptr + slot + w_off, mask=m_w, other=0.0)
            dW = tl.load(dw_ptr + bh * W_SIZE + w_off, mask=m_w, other=0.0)
            dS = tl.load(ds_ptr + bh * W_SIZE + w_off, mask=m_w, other=0.0)
            v = load_rows(v_ptr, bh, T, tok, ro, mc, mo, D_OUT)
            dy = load_rows(dy_ptr, bh, T, tok, ro, mc, mo, D_OUT)
            err = tl.dot(k, W, input_precision=PRECISION) - v
            m_s = tl.dot(k, dS, input_precision=PRECISION)
            m_w2 = tl.dot(k, dW, input_precision=PRECISION)
            derr = cs * m_s + cw * m_w2
            dcs += tl.sum(m_s * err, axis=1)
            dcw += tl.sum(m_w2 * err, axis=1)
            dk += tl.dot(cs * err, tl.trans(dS), input_precision=PRECISION)
            dk += tl.dot(cw * err, tl.trans(dW), input_precision=PRECISION)
            dk += tl.dot(derr, tl.trans(W), input_precision=PRECISION)
            dq += tl.dot(dy, tl.trans(W), input_precision=PRECISION)
            _store_rows(dv_ptr, -derr, bh, T, tok, ro, mc, mo, D_OUT)
            dWc = tl.dot(tl.trans(q), dy, input_precision=PRECISION)
            dWc += tl.dot(tl.trans(k), derr, input_precision=PRECISION)
            acc_p += dS * S
            acc_a += dW * W
            acc_q += dW * S
            tl.store(dw_ptr + bh * W_SIZE + w_off, A * dW + dWc, mask=m_w)
            tl.store(ds_ptr + bh * W_SIZE + w_off, P * dS + Q * dW, mask=m_w)
        _store_rows(dq_ptr, dq, bh, T, tok, ri, mc, mi, D_IN)
        _store_rows(dk_ptr, dk, bh, T, tok, ri, mc, mi, D_IN)
        tl.store(dcs_ptr + cidx, dcs, mask=mc)
        tl.store(dcw_ptr + cidx, dcw, mask=mc)
        tl.store(dp_ptr + bh * n_chunks + c, tl.sum(tl.sum(acc_p, axis=1), axis=0))
        tl.store(da_ptr + bh * n_chunks + c, tl.sum(tl.sum(acc_a, axis=1), axis=0))
        tl.store(dqq_ptr + bh * n_chunks + c, tl.sum(tl.sum(acc_q, axis=1), axis=0))
        tl.debug_barrier()


@triton.jit
def _bwd_linear_norm(
    q_ptr, k_ptr, v_ptr, dy_ptr, cs_ptr, cw_ptr, p_ptr, a_ptr, qq_ptr,
    sw_ptr, ss_ptr, dw_ptr, ds_ptr, lw_ptr, lb_ptr,
    dq_ptr, dk_ptr, dv_ptr, dcs_ptr, dcw_ptr, dp_ptr, da_ptr, dqq_ptr, dlw_ptr, dlb_ptr,
    n_chunks, tok_chunk0, n_tok_chunks, slot0, n_slots,
    C: tl.constexpr, D: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, PRECISION: tl.constexpr,
):
    """The normalised linear memory (d_in = d_out = D). LN couples a row's D outputs, so the
    row quantities ([C, D]: g, err, dg, ...) span every column; the state [D, D] is walked in
    tiles of BLOCK_I input rows, twice per chunk, so no more than a [BLOCK_I, D] tile of each
    state matrix is staged at once (the whole [D, D] tiles did not fit at D 128).
    Pass 1 sums the row quantities over the row tiles: g = k W, g(q) = q W, k dS, k dW. The
    LN and its backward then run on full rows. Pass 2 per row tile: the columns of dk and dq
    that the tile's rows produce (dk's skip term da comes back from dv, written as -da between
    the passes), the gradient w.r.t. W_c and the state carried back."""
    bh = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BLOCK_C)
    rd = tl.arange(0, BLOCK_D)
    mc, md = rc < C, rd < D
    T = n_tok_chunks * C
    W_SIZE = D * D
    lw, lb = load_norm(lw_ptr, lb_ptr, bh, rd, md, D)
    dlw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dlb = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        tok = (tok_chunk0 + c) * C + rc
        cidx, cs, cw, P, A, Q = chunk_coefficients(cs_ptr, cw_ptr, p_ptr, a_ptr, qq_ptr, bh, n_chunks, c, rc, mc, C)
        slot = (bh * n_slots + slot0 + c) * W_SIZE

        # pass 1: the row quantities, summed over row tiles of the state
        g = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)       # g(k) = k W_c
        gq = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)      # g(q)
        m_s = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)     # k dS
        m_w = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)     # k dW
        for i0 in range(0, D, BLOCK_I):
            rt = i0 + tl.arange(0, BLOCK_I)
            mt = rt < D
            m_t = mt[:, None] & md[None, :]
            t_off = rt[:, None] * D + rd[None, :]
            k_t = load_rows(k_ptr, bh, T, tok, rt, mc, mt, D)
            q_t = load_rows(q_ptr, bh, T, tok, rt, mc, mt, D)
            W = tl.load(sw_ptr + slot + t_off, mask=m_t, other=0.0)
            g += tl.dot(k_t, W, input_precision=PRECISION)
            gq += tl.dot(q_t, W, input_precision=PRECISION)
            m_s += tl.dot(k_t, tl.load(ds_ptr + bh * W_SIZE + t_off, mask=m_t, other=0.0), input_precision=PRECISION)
            m_w += tl.dot(k_t, tl.load(dw_ptr + bh * W_SIZE + t_off, mask=m_t, other=0.0), input_precision=PRECISION)
        k = load_rows(k_ptr, bh, T, tok, rd, mc, md, D)
        v = load_rows(v_ptr, bh, T, tok, rd, mc, md, D)
        err, normed, rstd, a = norm_error(g, k, v, lw, lb, md, D)
        derr = cs * m_s + cw * m_w
        dcs = tl.sum(m_s * err, axis=1)
        dcw = tl.sum(m_w * err, axis=1)
        dg, da, du = norm_error_backward(derr, err, normed, rstd, a, lw, md, D)
        dy = load_rows(dy_ptr, bh, T, tok, rd, mc, md, D)
        nq, rq = layer_norm(gq, md, D)
        dlw += tl.sum(a * du + normed * da + dy * nq, axis=0)
        dlb += tl.sum(da + dy, axis=0)
        dgq = layer_norm_backward(lw * dy, nq, rq, md, D)               # d L / d g(q)
        _store_rows(dv_ptr, -da, bh, T, tok, rd, mc, md, D)
        tl.debug_barrier()   # pass 2 reads -da back, in its own tiles, for dk's skip term

        # pass 2: per row tile, dk and dq's columns, d W_c and the state carried back
        acc_p = 0.0
        acc_a = 0.0
        acc_q = 0.0
        for i0 in range(0, D, BLOCK_I):
            rt = i0 + tl.arange(0, BLOCK_I)
            mt = rt < D
            m_t = mt[:, None] & md[None, :]
            t_off = rt[:, None] * D + rd[None, :]
            W = tl.load(sw_ptr + slot + t_off, mask=m_t, other=0.0)
            S = tl.load(ss_ptr + slot + t_off, mask=m_t, other=0.0)
            dW = tl.load(dw_ptr + bh * W_SIZE + t_off, mask=m_t, other=0.0)
            dS = tl.load(ds_ptr + bh * W_SIZE + t_off, mask=m_t, other=0.0)
            k_t = load_rows(k_ptr, bh, T, tok, rt, mc, mt, D)
            q_t = load_rows(q_ptr, bh, T, tok, rt, mc, mt, D)
            dk = cs * tl.dot(err, tl.trans(dS), input_precision=PRECISION)
            dk += cw * tl.dot(err, tl.trans(dW), input_precision=PRECISION)
            dk += tl.dot(dg, tl.trans(W), input_precision=PRECISION)
            dk -= load_rows(dv_ptr, bh, T, tok, rt, mc, mt, D)               # + da: the skip of f
            dq = load_rows(dy_ptr, bh, T, tok, rt, mc, mt, D)                # the skip of the read
            dq += tl.dot(dgq, tl.trans(W), input_precision=PRECISION)
            _store_rows(dk_ptr, dk, bh, T, tok, rt, mc, mt, D)
            _store_rows(dq_ptr, dq, bh, T, tok, rt, mc, mt, D)
            dWc = tl.dot(tl.trans(q_t), dgq, input_precision=PRECISION)
            dWc += tl.dot(tl.trans(k_t), dg, input_precision=PRECISION)
            acc_p += tl.sum(tl.sum(dS * S, axis=1), axis=0)
            acc_a += tl.sum(tl.sum(dW * W, axis=1), axis=0)
            acc_q += tl.sum(tl.sum(dW * S, axis=1), axis=0)
            tl.store(dw_ptr + bh * W_SIZE + t_off, A * dW + dWc, mask=m_t)
            tl.store(ds_ptr + bh * W_SIZE + t_off, P * dS + Q * dW, mask=m_t)
        tl.store(dcs_ptr + cidx, dcs, mask=mc)
        tl.store(dcw_ptr + cidx, dcw, mask=mc)
        tl.store(dp_ptr + bh * n_chunks + c, acc_p)
        tl.store(da_ptr + bh * n_chunks + c, acc_a)
        tl.store(dqq_ptr + bh * n_chunks + c, acc_q)
        tl.debug_barrier()
    _add_row(dlw_ptr, dlw, bh, rd, md, D)
    _add_row(dlb_ptr, dlb, bh, rd, md, D)


@triton.jit
def _bwd_mlp2(
    q_ptr, k_ptr, v_ptr, dy_ptr, cs_ptr, cw_ptr, p_ptr, a_ptr, qq_ptr,
    sw1_ptr, sw2_ptr, ss1_ptr, ss2_ptr, dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr, lw_ptr, lb_ptr,
    dq_ptr, dk_ptr, dv_ptr, dcs_ptr, dcw_ptr, dp_ptr, da_ptr, dqq_ptr, dlw_ptr, dlb_ptr,
    n_chunks, tok_chunk0, n_tok_chunks, slot0, n_slots,
    C: tl.constexpr, D: tl.constexpr, HID: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
    NORM: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BLOCK_C)
    rd = tl.arange(0, BLOCK_D)
    mc, md = rc < C, rd < D
    T = n_tok_chunks * C
    W_SIZE = D * HID
    if NORM:
        lw, lb = load_norm(lw_ptr, lb_ptr, bh, rd, md, D)
        dlw = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dlb = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        tok = (tok_chunk0 + c) * C + rc
        k = load_rows(k_ptr, bh, T, tok, rd, mc, md, D)
        v = load_rows(v_ptr, bh, T, tok, rd, mc, md, D)
        cidx, cs, cw, P, A, Q = chunk_coefficients(cs_ptr, cw_ptr, p_ptr, a_ptr, qq_ptr, bh, n_chunks, c, rc, mc, C)
        state = (bh * n_slots + slot0 + c) * W_SIZE
        kt = tl.trans(k)

        # pass A: the prediction error at W_c
        pred = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
        for j0 in range(0, HID, BLOCK_J):
            m1, m2, o1, o2 = hidden_tile(j0, rd, md, HID, D, BLOCK_J)
            W1 = tl.load(sw1_ptr + state + o1, mask=m1, other=0.0)
            W2 = tl.load(sw2_ptr + state + o2, mask=m2, other=0.0)
            pred += tl.dot(gelu(tl.dot(k, W1, input_precision=PRECISION)), W2, input_precision=PRECISION)
        if NORM:
            err, normed, rstd, a = norm_error(pred, k, v, lw, lb, md, D)
        else:
            err = k + pred - v

        # pass B: d err (needs sums over all hidden tiles) and the coefficient gradients
        derr = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
        dcs = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dcw = tl.zeros((BLOCK_C,), dtype=tl.float32)
        m2s = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)       # left_2 dS2 = z dS2
        m2w = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
        for j0 in range(0, HID, BLOCK_J):
            m1, m2, o1, o2 = hidden_tile(j0, rd, md, HID, D, BLOCK_J)
            W1 = tl.load(sw1_ptr + state + o1, mask=m1, other=0.0)
            W2 = tl.load(sw2_ptr + state + o2, mask=m2, other=0.0)
            dW1 = tl.load(dw1_ptr + bh * W_SIZE + o1, mask=m1, other=0.0)
            dS1 = tl.load(ds1_ptr + bh * W_SIZE + o1, mask=m1, other=0.0)
            dW2 = tl.load(dw2_ptr + bh * W_SIZE + o2, mask=m2, other=0.0)
            dS2 = tl.load(ds2_ptr + bh * W_SIZE + o2, mask=m2, other=0.0)
            hk = tl.dot(k, W1, input_precision=PRECISION)
            zk = gelu(hk)
            gp = gelu_grad(hk)
            gh = tl.dot(err, tl.trans(W2), input_precision=PRECISION) * gp     # right_1
            m1s = tl.dot(k, dS1, input_precision=PRECISION)
            m1w = tl.dot(k, dW1, input_precision=PRECISION)
            dcs += tl.sum(m1s * gh, axis=1)
            dcw += tl.sum(m1w * gh, axis=1)
            de2 = (cs * m1s + cw * m1w) * gp                                   # d (err W2^T)
            derr += tl.dot(de2, W2, input_precision=PRECISION)
            m2s += tl.dot(zk, dS2, input_precision=PRECISION)
            m2w += tl.dot(zk, dW2, input_precision=PRECISION)
        dcs += tl.sum(m2s * err, axis=1)
        dcw += tl.sum(m2w * err, axis=1)
        derr += cs * m2s + cw * m2w
        if NORM:   # d L / d g (the path through W_c, z and k) and d L / d a (through k, v)
            dg, da, du = norm_error_backward(derr, err, normed, rstd, a, lw, md, D)
            dlw += tl.sum(a * du + normed * da, axis=0)
            dlb += tl.sum(da, axis=0)
        else:      # err = k + g - v
            dg, da = derr, derr
        _store_rows(dv_ptr, -da, bh, T, tok, rd, mc, md, D)
        tl.debug_barrier()

        # pass C: per hidden tile, the gradients w.r.t. W_c through the update, w.r.t. k, and
        # the state carried back. Row scalings (cs, cw) act on dot outputs rather than on
        # [C, D] operands, so only k, err and dg stay staged in shared memory across tiles.
        dk = da
        acc_p = tl.zeros((BLOCK_D, BLOCK_J), dtype=tl.float32)
        acc_a = tl.zeros((BLOCK_D, BLOCK_J), dtype=tl.float32)
        acc_q = tl.zeros((BLOCK_D, BLOCK_J), dtype=tl.float32)
        for j0 in range(0, HID, BLOCK_J):
            m1, m2, o1, o2 = hidden_tile(j0, rd, md, HID, D, BLOCK_J)
            W1 = tl.load(sw1_ptr + state + o1, mask=m1, other=0.0)
            W2 = tl.load(sw2_ptr + state + o2, mask=m2, other=0.0)
            S1 = tl.load(ss1_ptr + state + o1, mask=m1, other=0.0)
            S2 = tl.load(ss2_ptr + state + o2, mask=m2, other=0.0)
            dW1 = tl.load(dw1_ptr + bh * W_SIZE + o1, mask=m1, other=0.0)
            dS1 = tl.load(ds1_ptr + bh * W_SIZE + o1, mask=m1, other=0.0)
            dW2 = tl.load(dw2_ptr + bh * W_SIZE + o2, mask=m2, other=0.0)
            dS2 = tl.load(ds2_ptr + bh * W_SIZE + o2, mask=m2, other=0.0)
            hk = tl.dot(k, W1, input_precision=PRECISION)
            zk = gelu(hk)
            gp = gelu_grad(hk)
            e2 = tl.dot(err, tl.trans(W2), input_precision=PRECISION)
            gh = e2 * gp
            dgh = cs * tl.dot(k, dS1, input_precision=PRECISION) + cw * tl.dot(k, dW1, input_precision=PRECISION)
            de2 = dgh * gp
            # d z: from the layer-2 factor (left = z) and from err = k + z W2 - v
            dz = cs * tl.dot(err, tl.trans(dS2), input_precision=PRECISION)
            dz += cw * tl.dot(err, tl.trans(dW2), input_precision=PRECISION)
            dz += tl.dot(dg, tl.trans(W2), input_precision=PRECISION)
            dhk = dz * gp + dgh * e2 * gelu_grad2(hk)
            # d k: from the layer-1 factor (left = k) and through h = k W1
            dk += cs * tl.dot(gh, tl.trans(dS1), input_precision=PRECISION)
            dk += cw * tl.dot(gh, tl.trans(dW1), input_precision=PRECISION)
            dk += tl.dot(dhk, tl.trans(W1), input_precision=PRECISION)
            dW1c = tl.dot(kt, dhk, input_precision=PRECISION)
            dW2c = tl.dot(tl.trans(zk), dg, input_precision=PRECISION)
            dW2c += tl.dot(tl.trans(de2), err, input_precision=PRECISION)
            # the chunk-end state S' = P S + G_s, W' = A W + Q S + G_w
            acc_p += dS1 * S1 + tl.trans(dS2 * S2)
            acc_a += dW1 * W1 + tl.trans(dW2 * W2)
            acc_q += dW1 * S1 + tl.trans(dW2 * S2)
            tl.store(dw1_ptr + bh * W_SIZE + o1, A * dW1 + dW1c, mask=m1)
            tl.store(ds1_ptr + bh * W_SIZE + o1, P * dS1 + Q * dW1, mask=m1)
            tl.store(dw2_ptr + bh * W_SIZE + o2, A * dW2 + dW2c, mask=m2)
            tl.store(ds2_ptr + bh * W_SIZE + o2, P * dS2 + Q * dW2, mask=m2)
        _store_rows(dk_ptr, dk, bh, T, tok, rd, mc, md, D)
        tl.debug_barrier()

        # pass D: the retrieval y = q + gelu(q W1) W2 at W_c adds to the gradients w.r.t. W_c
        # (a pass of its own, so q and dy are never staged together with k, err and derr)
        q = load_rows(q_ptr, bh, T, tok, rd, mc, md, D)
        dy = load_rows(dy_ptr, bh, T, tok, rd, mc, md, D)
        dq = dy                                                             # the skip path
        if NORM:   # y = q + w LN(g(q)) + b: one more pass for the full row of g(q)
            gq = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
            for j0 in range(0, HID, BLOCK_J):
                m1, m2, o1, o2 = hidden_tile(j0, rd, md, HID, D, BLOCK_J)
                W1 = tl.load(sw1_ptr + state + o1, mask=m1, other=0.0)
                W2 = tl.load(sw2_ptr + state + o2, mask=m2, other=0.0)
                gq += tl.dot(gelu(tl.dot(q, W1, input_precision=PRECISION)), W2, input_precision=PRECISION)
            nq, rq = layer_norm(gq, md, D)
            dlw += tl.sum(dy * nq, axis=0)
            dlb += tl.sum(dy, axis=0)
            dy = layer_norm_backward(lw * dy, nq, rq, md, D)                # d L / d g(q)
        for j0 in range(0, HID, BLOCK_J):
            m1, m2, o1, o2 = hidden_tile(j0, rd, md, HID, D, BLOCK_J)
            W1 = tl.load(sw1_ptr + state + o1, mask=m1, other=0.0)
            W2 = tl.load(sw2_ptr + state + o2, mask=m2, other=0.0)
            hq = tl.dot(q, W1, input_precision=PRECISION)
            dhq = tl.dot(dy, tl.trans(W2), input_precision=PRECISION) * gelu_grad(hq)
            dq += tl.dot(dhq, tl.trans(W1), input_precision=PRECISION)
            dW1 = tl.load(dw1_ptr + bh * W_SIZE + o1, mask=m1, other=0.0)
            dW2 = tl.load(dw2_ptr + bh * W_SIZE + o2, mask=m2, other=0.0)
            tl.store(dw1_ptr + bh * W_SIZE + o1, dW1 + tl.dot(tl.trans(q), dhq, input_precision=PRECISION), mask=m1)
            dW2 += tl.dot(tl.trans(gelu(hq)), dy, input_precision=PRECISION)
            tl.store(dw2_ptr + bh * W_SIZE + o2, dW2, mask=m2)
        _store_rows(dq_ptr, dq, bh, T, tok, rd, mc, md, D)
        tl.store(dcs_ptr + cidx, dcs, mask=mc)
        tl.store(dcw_ptr + cidx, dcw, mask=mc)
        tl.store(dp_ptr + bh * n_chunks + c, tl.sum(tl.sum(acc_p, axis=1), axis=0))
        tl.store(da_ptr + bh * n_chunks + c, tl.sum(tl.sum(acc_a, axis=1), axis=0))
        tl.store(dqq_ptr + bh * n_chunks + c, tl.sum(tl.sum(acc_q, axis=1), axis=0))
        tl.debug_barrier()
    if NORM:
        _add_row(dlw_ptr, dlw, bh, rd, md, D)
        _add_row(dlb_ptr, dlb, bh, rd, md, D)
