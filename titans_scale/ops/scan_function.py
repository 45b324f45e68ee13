"""The memory scan with a hand-written backward, shared by impl="fused" (PyTorch loops,
ops/fused.py) and impl="triton" (ops/triton_scan.py). Only the per-chunk loops differ; a
backend supplies them.

Layout of a call (scan_with_backend):

* a leading partial chunk (a stream that stopped mid-chunk) and a trailing partial chunk
  run through chunked.chunk_step under autograd (exact, at most two pieces per call);
* the full chunks in between run through ChunkScan: the backend's forward over all chunks,
  then its backward in reverse, wrapped in one torch.autograd.Function differentiable
  w.r.t. q, k, v, theta, eta, alpha, the normalised memory's (ln_weight, ln_bias) and the
  starting state (W, S), second-order terms (the outer gradient through the inner gradient)
  included.

The gates enter the backend as the closed-form coefficients of chunked.decay_coefficients
(computed in blocks of chunks); backward maps their gradients back to theta, eta, alpha
with autograd on the same function, one block of chunks at a time.

Saved for backward: q, k, v, the gates and one (W, S) per chunk, not the per-token
intermediates autograd would keep. Recompute (recompute_group = g): forward keeps every
g-th chunk-start state; backward reruns the forward over one group (states only, no y),
so saved activations are O(L/(C g) |W|) plus one group's states.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.autograd.function import once_differentiable

from .chunked import chunk_step, decay_coefficients
from .recompute import check_recompute_group, chunk_groups
from .state import MemoryState

COEF_BLOCK = 256         # chunks per batch of decay_coefficients (bounds its O(C^2) temporaries)
BWD_BLOCK = 256          # chunks per backward call when every state was saved


@dataclass(frozen=True)
class ScanConfig:
    chunk_size: int
    depth: int             # 1 (linear) or 2
    d_in: int
    d_out: int
    hidden: int            # depth 2: E * d; depth 1: d_out
    save_stride: int       # 1: every chunk-start state is saved; g: every g-th (recompute)

    def shapes(self) -> list[tuple[int, int]]:
        if self.depth == 1:
            return [(self.d_in, self.d_out)]
        return [(self.d_in, self.hidden), (self.hidden, self.d_out)]

    @classmethod
    def of(cls, q, v, state: MemoryState, recompute_group, **extra):
        d_out = v.shape[-1]
        return cls(chunk_size=state.chunk_size, depth=state.depth, d_in=q.shape[-1], d_out=d_out,
                   hidden=state.weights[0].shape[-1] if state.depth == 2 else d_out,
                   save_stride=max(1, check_recompute_group(recompute_group)), **extra)


class ScanBackend(Protocol):
    """The per-chunk loops. Tensors are flat over (batch, head): q, k, v [BH, T, d];
    coefs (c_s, c_w [BH, n*C], P, A, Q [BH, n]) describe n chunks starting at chunk
    tok_chunk0 of q/k/v; states [BH, slots, in, out]. norm: the normalised memory's
    (ln_weight, ln_bias), each [BH, d], or None for the plain f; ChunkScan passes norm and
    dnorm only when it is on, so a backend without it keeps the signatures without them."""

    def new(self, shape, device, dtype) -> torch.Tensor:
        """An output buffer the loops overwrite completely."""

    def forward(self, cfg, q, k, v, coefs, ws, ss, saved_w, saved_s, y=None, tok_chunk0=0, norm=None) -> None:
        """Run the chunks: ws, ss (running state) are updated in place; chunk c's start
        state goes to slot c // save_stride when c % save_stride == 0; y gets the reads."""

    def backward(self, cfg, q, k, v, dy, coefs, states_w, states_s, slot0, dws, dss, dq, dk, dv,
                 tok_chunk0, norm=None, dnorm=None) -> list[torch.Tensor]:
        """Walk the chunks in reverse (chunk c's start state at slot slot0 + c): dws, dss hold
        the gradients w.r.t. the state after the last chunk and become those before the
        first; dq, dk, dv rows of these chunks are written; with norm, the gradients of
        (ln_weight, ln_bias) of these chunks are added into dnorm ([BH, d] each). Returns
        the coefficient grads."""


def _coefficients(theta, eta, alpha, C):
    """decay_coefficients of whole chunks: gates [BH, n*C] -> cs, cw [BH, n*C]; P, A, Q [BH, n]."""
    BH, T = theta.shape
    n = T // C
    cs, cw, P, A, Q = decay_coefficients(*(g.reshape(BH, n, C) for g in (theta, eta, alpha)))
    return (cs.reshape(BH, T).contiguous(), cw.reshape(BH, T).contiguous(),
            P.contiguous(), A.contiguous(), Q.contiguous())


def _coefficients_blocked(backend, theta, eta, alpha, C):
    """As _coefficients, in blocks of COEF_BLOCK chunks (no autograd)."""
    BH, T = theta.shape
    n = T // C
    new = lambda *shape: backend.new(shape, theta.device, theta.dtype)  # noqa: E731
    out = [new(BH, T), new(BH, T), new(BH, n), new(BH, n), new(BH, n)]
    for c0, c1 in chunk_groups(n, COEF_BLOCK):
        cs, cw, P, A, Q = _coefficients(*(g[:, c0 * C:c1 * C] for g in (theta, eta, alpha)), C)
        out[0][:, c0 * C:c1 * C], out[1][:, c0 * C:c1 * C] = cs, cw
        out[2][:, c0:c1], out[3][:, c0:c1], out[4][:, c0:c1] = P, A, Q
    return out


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, H, ...] -> contiguous [B*H, ...]."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def _state_precision(x: torch.Tensor):
    """The loops compute in the state's dtype (fp32 or float64): an enclosing autocast would
    turn their matmuls into bf16 ones that cannot accumulate into the fp32 state in place."""
    return torch.autocast(x.device.type, enabled=False)


class ChunkScan(torch.autograd.Function):
    """Full chunks only: L is a multiple of C and the state sits on a chunk boundary.

    Inputs: backend, cfg, q, k, v [B, H, L, d], theta, eta, alpha [B, H, L] (state dtype),
    ln_weight, ln_bias ([H, d], state dtype; both None for the plain memory), then the
    starting weights and momenta (depth each, [B, H, in, out]).
    Outputs: y [B, H, L, d_out] (state dtype), then the final weights and momenta.
    """

    @staticmethod
    def forward(ctx, backend, cfg: ScanConfig, q, k, v, theta, eta, alpha, ln_weight, ln_bias, *state):
        with _state_precision(q):
            return ChunkScan._forward(ctx, backend, cfg, q, k, v, theta, eta, alpha, ln_weight, ln_bias, *state)

    @staticmethod
    def _forward(ctx, backend, cfg: ScanConfig, q, k, v, theta, eta, alpha, ln_weight, ln_bias, *state):
        B, H, L, _ = q.shape
        C, D, dev, dt = cfg.chunk_size, cfg.depth, q.device, state[0].dtype
        n = L // C
        q3, k3, v3 = _flat(q), _flat(k), _flat(v)
        with torch.no_grad():
            coefs = _coefficients_blocked(backend, *(_flat(g) for g in (theta, eta, alpha)), C)
        ws = [_flat(w).clone() for w in state[:D]]
        ss = [_flat(s).clone() for s in state[D:]]
        slots = -(-n // cfg.save_stride)
        saved_w = [backend.new((B * H, slots, *shp), dev, dt) for shp in cfg.shapes()]
        saved_s = [backend.new((B * H, slots, *shp), dev, dt) for shp in cfg.shapes()]
        y = backend.new((B * H, L, cfg.d_out), dev, dt)
        norm = _norm_kwargs(ln_weight, ln_bias, B)
        backend.forward(cfg, q3, k3, v3, coefs, ws, ss, saved_w, saved_s, y=y, **norm)
        ctx.backend, ctx.cfg, ctx.shape, ctx.norm = backend, cfg, (B, H), ln_weight is not None
        ctx.save_for_backward(q, k, v, theta, eta, alpha, ln_weight, ln_bias, *saved_w, *saved_s)
        out = [y.view(B, H, L, cfg.d_out)] + [w.view(B, H, *w.shape[1:]) for w in ws + ss]
        return tuple(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *d_state):
        with _state_precision(dy):
            return ChunkScan._backward(ctx, dy, *d_state)

    @staticmethod
    def _backward(ctx, dy, *d_state):
        backend, cfg, (B, H) = ctx.backend, ctx.cfg, ctx.shape
        q, k, v, theta, eta, alpha, ln_weight, ln_bias, *saved = ctx.saved_tensors
        D, C, dev = cfg.depth, cfg.chunk_size, q.device
        saved_w, saved_s = saved[:D], saved[D:]
        dt = saved_w[0].dtype
        new = lambda *shape: backend.new(shape, dev, dt)  # noqa: E731
        L = q.shape[2]
        n = L // C
        q3, k3, v3 = _flat(q), _flat(k), _flat(v)
        dy3 = _flat(dy.to(dt))
        gates = [_flat(g) for g in (theta, eta, alpha)]
        # gradients w.r.t. the final state, updated in place into those w.r.t. the first
        dws = [_flat(g.to(dt)).clone() if g is not None else torch.zeros(B * H, *shp, device=dev, dtype=dt)
               for g, shp in zip(d_state[:D], cfg.shapes())]
        dss = [_flat(g.to(dt)).clone() if g is not None else torch.zeros(B * H, *shp, device=dev, dtype=dt)
               for g, shp in zip(d_state[D:], cfg.shapes())]
        dq, dk, dv = new(B * H, L, cfg.d_in), new(B * H, L, cfg.d_in), new(B * H, L, cfg.d_out)
        dgates = [new(B * H, L) for _ in range(3)]
        norm = _norm_kwargs(ln_weight, ln_bias, B)
        if norm:
            norm["dnorm"] = [torch.zeros(B * H, cfg.d_out, device=dev, dtype=dt) for _ in range(2)]
        fwd_norm = {"norm": norm["norm"]} if norm else {}
        g = cfg.save_stride
        recompute = g > 1
        segments = chunk_groups(n, g if recompute else BWD_BLOCK)
        if recompute:
            scratch_w = [new(B * H, min(g, n), *shp) for shp in cfg.shapes()]
            scratch_s = [new(B * H, min(g, n), *shp) for shp in cfg.shapes()]
            fwd_cfg = dataclasses.replace(cfg, save_stride=1)
        for c0, c1 in reversed(segments):
            tok = slice(c0 * C, c1 * C)
            with torch.enable_grad():
                seg_gates = [x[:, tok].detach().requires_grad_(True) for x in gates]
                coefs = _coefficients(*seg_gates, C)
            flat_coefs = [x.detach() for x in coefs]
            if recompute:   # this group's chunk-start states, from the one saved at its start
                slot = c0 // g
                ws = [w[:, slot].clone() for w in saved_w]
                ss = [s[:, slot].clone() for s in saved_s]
                backend.forward(fwd_cfg, q3, k3, v3, flat_coefs, ws, ss, scratch_w, scratch_s, tok_chunk0=c0,
                                **fwd_norm)
                states_w, states_s, slot0 = scratch_w, scratch_s, 0
            else:
                states_w, states_s, slot0 = saved_w, saved_s, c0
            dcoefs = backend.backward(cfg, q3, k3, v3, dy3, flat_coefs, states_w, states_s, slot0,
                                      dws, dss, dq, dk, dv, tok_chunk0=c0, **norm)
            grads = torch.autograd.grad(coefs, seg_gates, dcoefs)
            for dst, src in zip(dgates, grads):
                dst[:, tok] = src
        view = lambda x, like: x.view(like.shape).to(like.dtype)  # noqa: E731
        # ln_weight/ln_bias are shared by the batch: sum their per-(batch, head) gradients
        dnorm = [x.view(B, H, -1).sum(0).to(p.dtype) for x, p in zip(norm["dnorm"], (ln_weight, ln_bias))] \
            if norm else [None, None]
        return (None, None, view(dq, q), view(dk, k), view(dv, v),
                *(view(dg, gt) for dg, gt in zip(dgates, (theta, eta, alpha))), *dnorm,
                *(x.view(B, H, *x.shape[1:]) for x in dws + dss))


def _norm_kwargs(ln_weight, ln_bias, B: int) -> dict:
    """{"norm": (ln_weight, ln_bias) flat over (batch, head) [BH, d]}, or {} for the plain memory."""
    if ln_weight is None:
        return {}
    return {"norm": tuple(p.unsqueeze(0).expand(B, *p.shape).reshape(-1, p.shape[-1]) for p in (ln_weight, ln_bias))}


def scan_with_backend(backend, cfg: ScanConfig, q, k, v, theta, eta, alpha, state: MemoryState, norm=None):
    """The scan of a piece at any position: chunk_step for partial chunks at either end,
    ChunkScan over the full chunks in between. Gates and state in the state's dtype; q, k, v
    as the backend takes them; norm: (ln_weight, ln_bias) [H, d] in the state's dtype, or None."""
    C, L, pos, D = state.chunk_size, q.shape[2], state.position, state.depth
    dt = state.weights[0].dtype
    cut = lambda x, a, b: x[:, :, a:b].to(dt)  # noqa: E731
    w_c, w, s = list(state.chunk_start), list(state.weights), list(state.momentum)
    ys, t = [], 0
    if pos > 0:                      # finish the chunk a stream stopped in
        n = min(C - pos, L)
        gates = [cut(x, 0, n) for x in (theta, eta, alpha)]
        y, w, s = chunk_step(w_c, w, s, cut(q, 0, n), cut(k, 0, n), cut(v, 0, n), decay_coefficients(*gates), norm)
        ys.append(y)
        t, pos = n, (pos + n) % C
        if pos == 0:
            w_c = w
    n_full = (L - t) // C
    if n_full > 0:
        b = t + n_full * C
        out = ChunkScan.apply(backend, cfg, q[:, :, t:b], k[:, :, t:b], v[:, :, t:b],
                              *(cut(x, t, b) for x in (theta, eta, alpha)), *(norm or (None, None)), *w, *s)
        ys.append(out[0])
        w, s = list(out[1:1 + D]), list(out[1 + D:])
        w_c, t = w, b
    if t < L:                        # a trailing partial chunk
        gates = [cut(x, t, L) for x in (theta, eta, alpha)]
        y, w, s = chunk_step(w_c, w, s, cut(q, t, L), cut(k, t, L), cut(v, t, L), decay_coefficients(*gates), norm)
        ys.append(y)
        pos = L - t
    y = torch.cat(ys, dim=2) if ys else q.new_zeros(q.shape[:3] + (v.shape[-1],), dtype=dt)
    return y, MemoryState(w_c, w, s, pos, C)
