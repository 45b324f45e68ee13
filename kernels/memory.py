"""impl="triton": the memory scan on the fused chunk kernels, differentiable end to end.

Importing this module registers the impl with titans_scale.ops.memory. Layout of a call:

* a leading partial chunk (a stream that stopped mid-chunk) and a trailing partial chunk
  run through the PyTorch chunk_step (exact, at most two pieces per call);
* the full chunks in between run through TritonMemoryScan: the forward kernel
  (kernels/memory_fwd.py) and the backward kernel (kernels/memory_bwd.py), wrapped in one
  torch.autograd.Function, differentiable w.r.t. q, k, v, theta, eta, alpha and the
  starting state (W, S), second-order terms included.

The gates enter the kernels as the closed-form coefficients of chunked.decay_coefficients
(computed here, in blocks of chunks); backward maps their gradients back to theta, eta,
alpha with autograd on the same function, one group of chunks at a time.

Recompute (recompute_group = g): the forward kernel keeps every g-th chunk-start state;
backward reruns the forward kernel over one group (states only, no y) before its backward
kernel, so saved activations are O(L/(C g) |W|) plus one group's states.

Precision: state and accumulation are fp32; inputs may be fp32, bf16 or fp16 (cast to
fp32 on load). With fp32 inputs the kernels' dots run in IEEE fp32; with 16-bit inputs in
TF32 on tensor cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch.autograd.function import once_differentiable

from titans_scale.ops.chunked import chunk_step, decay_coefficients
from titans_scale.ops.memory import register_impl
from titans_scale.ops.recompute import check_recompute_group, chunk_groups
from titans_scale.ops.state import MemoryState

from .memory_bwd import _bwd_linear, _bwd_mlp2
from .memory_fwd import _fwd_linear, _fwd_mlp2


def _interpreted(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(fn, InterpretedFunction)


# Fixed when the kernels were defined. Triton's own @jit helpers (tl.sum, ...) are defined
# when triton is imported: if TRITON_INTERPRET=1 came later, ours are interpreted but those
# are not, and launching fails deep inside triton, so it is reported as a usage error.
INTERPRETED = _interpreted(_fwd_linear)
INTERPRETER_BROKEN = INTERPRETED and not _interpreted(triton.language.standard.sum)
POISON_OUTPUTS = False   # tests: fill kernel outputs with NaN first, so unwritten elements show
COEF_BLOCK = 256         # chunks per batch of decay_coefficients (bounds its O(C^2) temporaries)
BWD_BLOCK = 256          # chunks per backward launch when every state was saved


def _p2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))   # tl.dot wants every dim >= 16


@dataclass(frozen=True)
class KernelConfig:
    chunk_size: int
    depth: int
    d_in: int
    d_out: int
    hidden: int            # depth 2: E * d; depth 1: d_out
    save_stride: int       # 1: every chunk-start state is saved; g: every g-th (recompute)
    precision: str         # tl.dot input_precision
    block_j: int           # hidden (depth 2) / output-column (depth 1) tile

    @property
    def blocks(self) -> dict:
        return dict(BLOCK_C=_p2(self.chunk_size), **(
            dict(BLOCK_IN=_p2(self.d_in), BLOCK_OUT=self.block_j) if self.depth == 1
            else dict(BLOCK_D=_p2(self.d_in), BLOCK_J=self.block_j)))

    @property
    def dims(self) -> dict:
        if self.depth == 1:
            return dict(C=self.chunk_size, D_IN=self.d_in, D_OUT=self.d_out)
        return dict(C=self.chunk_size, D=self.d_in, HID=self.hidden)

    def shapes(self) -> list[tuple[int, int]]:
        if self.depth == 1:
            return [(self.d_in, self.d_out)]
        return [(self.d_in, self.hidden), (self.hidden, self.d_out)]


def _new(shape, device, dtype=torch.float32) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def _warps(cfg: KernelConfig) -> int:
    return 4 if cfg.depth == 1 else 8


def run_forward(cfg, q, k, v, coefs, ws, ss, saved_w, saved_s, y=None, tok_chunk0=0):
    """Forward kernel over the chunks that coefs describe. q, k, v: [BH, T, d]; ws, ss:
    running state buffers [BH, in, out] (updated in place); saved_*: [BH, slots, in, out]."""
    cs, cw, P, A, Q = coefs
    BH, n = P.shape
    args = dict(n_chunks=n, tok_chunk0=tok_chunk0, n_tok_chunks=q.shape[1] // cfg.chunk_size,
                save_stride=cfg.save_stride, n_slots=saved_w[0].shape[1], WRITE_Y=y is not None,
                PRECISION=cfg.precision, num_warps=_warps(cfg), **cfg.dims, **cfg.blocks)
    y_arg = y if y is not None else q   # never written when WRITE_Y is False
    if cfg.depth == 1:
        grid = (BH, triton.cdiv(cfg.d_out, cfg.block_j))
        _fwd_linear[grid](q, k, v, cs, cw, P, A, Q, y_arg, ws[0], ss[0], saved_w[0], saved_s[0], **args)
    else:
        _fwd_mlp2[(BH,)](q, k, v, cs, cw, P, A, Q, y_arg, *ws, *ss, *saved_w, *saved_s, **args)


def run_backward(cfg, q, k, v, dy, coefs, states_w, states_s, slot0, dws, dss, dq, dk, dv, tok_chunk0):
    """Backward kernel over the chunks that coefs describe (chunk c's start state at slot
    slot0 + c of states_*). dws, dss: gradients w.r.t. the state after the last chunk, turned
    in place into those w.r.t. the state before the first. Returns the coefficient grads."""
    cs, cw, P, A, Q = coefs
    BH, n = P.shape
    dcoefs = [_new(t.shape, t.device) for t in coefs]
    args = dict(n_chunks=n, tok_chunk0=tok_chunk0, n_tok_chunks=q.shape[1] // cfg.chunk_size,
                slot0=slot0, n_slots=states_w[0].shape[1], PRECISION=cfg.precision,
                num_warps=_warps(cfg), **cfg.dims, **cfg.blocks)
    kernel = _bwd_linear if cfg.depth == 1 else _bwd_mlp2
    kernel[(BH,)](q, k, v, dy, cs, cw, P, A, Q, *states_w, *states_s, *dws, *dss,
                  dq, dk, dv, *dcoefs, **args)
    return dcoefs


def _coefficients(theta, eta, alpha, C):
    """decay_coefficients of whole chunks: gates [BH, n*C] -> cs, cw [BH, n*C]; P, A, Q [BH, n]."""
    BH, T = theta.shape
    n = T // C
    cs, cw, P, A, Q = decay_coefficients(*(g.reshape(BH, n, C) for g in (theta, eta, alpha)))
    return cs.reshape(BH, T).contiguous(), cw.reshape(BH, T).contiguous(), P.contiguous(), A.contiguous(), Q.contiguous()


def _coefficients_blocked(theta, eta, alpha, C):
    """As _coefficients, in blocks of COEF_BLOCK chunks (no autograd)."""
    BH, T = theta.shape
    n = T // C
    out = [_new((BH, T), theta.device), _new((BH, T), theta.device)] + [_new((BH, n), theta.device) for _ in range(3)]
    for c0, c1 in chunk_groups(n, COEF_BLOCK):
        cs, cw, P, A, Q = _coefficients(*(g[:, c0 * C:c1 * C] for g in (theta, eta, alpha)), C)
        out[0][:, c0 * C:c1 * C], out[1][:, c0 * C:c1 * C] = cs, cw
        out[2][:, c0:c1], out[3][:, c0:c1], out[4][:, c0:c1] = P, A, Q
    return out


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, H, ...] -> contiguous [B*H, ...]."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


class TritonMemoryScan(torch.autograd.Function):
    """Full chunks only: L is a multiple of C and the state sits on a chunk boundary.

    Inputs: cfg, q, k, v [B, H, L, d], theta, eta, alpha [B, H, L] (fp32), then the
    starting weights and momenta (depth each, fp32 [B, H, in, out]).
    Outputs: y [B, H, L, d_out] (fp32), then the final weights and momenta.
    """

    @staticmethod
    def forward(ctx, cfg: KernelConfig, q, k, v, theta, eta, alpha, *state):
        B, H, L, _ = q.shape
        C, D, dev = cfg.chunk_size, cfg.depth, q.device
        n = L // C
        q3, k3, v3 = _flat(q), _flat(k), _flat(v)
        gates = [_flat(g) for g in (theta, eta, alpha)]
        with torch.no_grad():
            coefs = _coefficients_blocked(*gates, C)
        ws = [_flat(w).clone() for w in state[:D]]
        ss = [_flat(s).clone() for s in state[D:]]
        slots = triton.cdiv(n, cfg.save_stride)
        saved_w = [_new((B * H, slots, *shp), dev) for shp in cfg.shapes()]
        saved_s = [_new((B * H, slots, *shp), dev) for shp in cfg.shapes()]
        y = _new((B * H, L, cfg.d_out), dev)
        run_forward(cfg, q3, k3, v3, coefs, ws, ss, saved_w, saved_s, y=y)
        ctx.cfg, ctx.shape = cfg, (B, H)
        ctx.save_for_backward(q, k, v, theta, eta, alpha, *saved_w, *saved_s)
        out = [y.view(B, H, L, cfg.d_out)] + [w.view(B, H, *w.shape[1:]) for w in ws + ss]
        return tuple(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *d_state):
        cfg, (B, H) = ctx.cfg, ctx.shape
        q, k, v, theta, eta, alpha, *saved = ctx.saved_tensors
        D, C, dev = cfg.depth, cfg.chunk_size, q.device
        saved_w, saved_s = saved[:D], saved[D:]
        L = q.shape[2]
        n = L // C
        q3, k3, v3 = _flat(q), _flat(k), _flat(v)
        dy3 = _flat(dy.float())
        gates = [_flat(g) for g in (theta, eta, alpha)]
        dws = [_flat(g.float()) if g is not None else torch.zeros(B * H, *shp, device=dev)
               for g, shp in zip(d_state[:D], cfg.shapes())]
        dss = [_flat(g.float()) if g is not None else torch.zeros(B * H, *shp, device=dev)
               for g, shp in zip(d_state[D:], cfg.shapes())]
        dws, dss = [x.clone() for x in dws], [x.clone() for x in dss]   # updated in place
        dq, dk = _new((B * H, L, cfg.d_in), dev), _new((B * H, L, cfg.d_in), dev)
        dv = _new((B * H, L, cfg.d_out), dev)
        dgates = [_new((B * H, L), dev) for _ in range(3)]
        g = cfg.save_stride
        recompute = g > 1
        segments = chunk_groups(n, g if recompute else BWD_BLOCK)
        if recompute:
            scratch_w = [_new((B * H, min(g, n), *shp), dev) for shp in cfg.shapes()]
            scratch_s = [_new((B * H, min(g, n), *shp), dev) for shp in cfg.shapes()]
            fwd_cfg = KernelConfig(**{**cfg.__dict__, "save_stride": 1})
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
                run_forward(fwd_cfg, q3, k3, v3, flat_coefs, ws, ss, scratch_w, scratch_s, tok_chunk0=c0)
                states_w, states_s, slot0 = scratch_w, scratch_s, 0
            else:
                states_w, states_s, slot0 = saved_w, saved_s, c0
            dcoefs = run_backward(cfg, q3, k3, v3, dy3, flat_coefs, states_w, states_s, slot0,
                                  dws, dss, dq, dk, dv, tok_chunk0=c0)
            grads = torch.autograd.grad(coefs, seg_gates, dcoefs)
            for dst, src in zip(dgates, grads):
                dst[:, tok] = src
        view = lambda x, like: x.view(like.shape).to(like.dtype)  # noqa: E731
        return (None, view(dq, q), view(dk, k), view(dv, v),
                *(view(dg, gt) for dg, gt in zip(dgates, (theta, eta, alpha))),
                *(x.view(B, H, *x.shape[1:]) for x in dws + dss))


def unsupported(q: torch.Tensor, state: MemoryState) -> str | None:
    """Why impl='triton' cannot run these inputs (None when it can)."""
    if INTERPRETER_BROKEN:
        return ("impl='triton' under TRITON_INTERPRET=1 needs the variable set before triton is first "
                "imported (something imported triton earlier); export it before starting Python")
    if not (q.is_cuda or INTERPRETED):
        return ("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is first "
                f"imported to run on the CPU (got {q.device} tensors); use impl='chunked' on the CPU")
    if state.depth > 2:
        return f"impl='triton' has kernels for memory depth 1 and 2, got depth {state.depth}; use impl='chunked'"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"impl='triton' computes in fp32 from fp32/bf16/fp16 inputs, got {q.dtype}; use impl='chunked'"
    return None


def kernel_config(q, v, state: MemoryState, recompute_group) -> KernelConfig:
    d, d_out = q.shape[-1], v.shape[-1]
    hidden = state.weights[0].shape[-1] if state.depth == 2 else d_out
    # untuned (no GPU was at hand): depth 2 keeps ~20 [C, tile] fp32 tiles live in backward
    tile = 32 if (INTERPRETED or state.depth == 2) else 64
    return KernelConfig(
        chunk_size=state.chunk_size, depth=state.depth, d_in=d, d_out=d_out, hidden=hidden,
        save_stride=max(1, check_recompute_group(recompute_group)),
        precision="ieee" if q.dtype == torch.float32 else "tf32",
        block_j=min(tile, _p2(hidden)))


def triton_scan(q, k, v, theta, eta, alpha, state: MemoryState, recompute_group: int | None = None):
    """The registered impl: PyTorch for partial chunks at either end, kernels in between."""
    C, L, pos, D = state.chunk_size, q.shape[2], state.position, state.depth
    f32 = lambda x, a, b: x[:, :, a:b].float()  # noqa: E731
    w_c, w, s = list(state.chunk_start), list(state.weights), list(state.momentum)
    ys, t = [], 0
    if pos > 0:                      # finish the chunk a stream stopped in
        n = min(C - pos, L)
        gates = [f32(x, 0, n) for x in (theta, eta, alpha)]
        y, w, s = chunk_step(w_c, w, s, f32(q, 0, n), f32(k, 0, n), f32(v, 0, n), decay_coefficients(*gates))
        ys.append(y)
        t, pos = n, (pos + n) % C
        if pos == 0:
            w_c = w
    n_full = (L - t) // C
    if n_full > 0:
        b = t + n_full * C
        cfg = kernel_config(q, v, state, recompute_group)
        out = TritonMemoryScan.apply(cfg, q[:, :, t:b], k[:, :, t:b], v[:, :, t:b],
                                     *(f32(x, t, b) for x in (theta, eta, alpha)), *w, *s)
        ys.append(out[0])
        w, s = list(out[1:1 + D]), list(out[1 + D:])
        w_c, t = w, b
    if t < L:                        # a trailing partial chunk
        gates = [f32(x, t, L) for x in (theta, eta, alpha)]
        y, w, s = chunk_step(w_c, w, s, f32(q, t, L), f32(k, t, L), f32(v, t, L), decay_coefficients(*gates))
        ys.append(y)
        pos = L - t
    y = torch.cat(ys, dim=2) if ys else q.new_zeros(q.shape[:3] + (v.shape[-1],), dtype=torch.float32)
    return y, MemoryState(w_c, w, s, pos, C)


register_impl("triton", triton_scan, native_dtype=True, unsupported=unsupported)
