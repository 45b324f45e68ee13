"""FLOP and byte counts of the memory scan, per chunk and per (batch, head).

FLOPs are matmul FLOPs (2 m n k per product; elementwise work and GELUs are left out) of
the algorithm in chunked.chunk_step: retrieval y = f_{W_c}(q), the prediction error and
layer gradients at W_c, and the two coefficient-weighted sums per layer that update S and
W. Backward is twice the forward (both operands of every product need a gradient). The
kernels execute somewhat more (they recompute hidden activations instead of storing
them); these "useful" counts are what achieved-throughput fractions are quoted against.

Bytes are the global-memory traffic of the fused Triton chunk step as written in kernels/:
token tensors read/written once, coefficient arrays, the state (depth 1 keeps it in
registers, depth 2 streams it through global memory in hidden tiles) and the saved
chunk-start states (one per recompute group).
"""

from __future__ import annotations

from dataclasses import dataclass

F32 = 4


def state_numel(d: int, depth: int, expansion: int = 4, d_out: int | None = None) -> int:
    """|W|: parameters of one head's memory MLP (the momentum S has the same size)."""
    if depth == 1:
        return d * (d_out or d)
    if depth != 2:
        raise ValueError(f"depth must be 1 or 2 for these counts, got {depth}")
    return 2 * d * expansion * d


def chunk_flops_fwd(C: int, d: int, depth: int, expansion: int = 4, d_out: int | None = None) -> int:
    """Matmul FLOPs of one chunk step's forward, one (batch, head)."""
    mac = C * state_numel(d, depth, expansion, d_out)     # one pass of C tokens through all layers
    if depth == 1:
        # [q; k] W (retrieval + prediction), then k^T [c_s err, c_w err]
        return 2 * (2 * mac + 2 * mac)
    # f(q), f(k) (2 layers each), err W2^T, then per layer left^T [c_s right, c_w right]
    return 2 * (mac + mac + mac // 2 + 2 * mac)


def chunk_flops_bwd(C: int, d: int, depth: int, expansion: int = 4, d_out: int | None = None) -> int:
    """Matmul FLOPs of one chunk step's backward (gradients of both operands of every product)."""
    return 2 * chunk_flops_fwd(C, d, depth, expansion, d_out)


def chunk_bytes_fwd(C: int, d: int, depth: int, expansion: int = 4, d_out: int | None = None,
                    in_bytes: int = F32, save_stride: int = 1) -> float:
    """Global-memory bytes of one chunk of the forward kernel, one (batch, head)."""
    do = d_out or d
    w = state_numel(d, depth, expansion, d_out) * F32
    tokens = C * (2 * d + do) * in_bytes + C * do * F32            # q, k, v in; y out (fp32)
    coefs = (2 * C + 3) * F32                                      # c_s, c_w; P, A, Q
    state = 0 if depth == 1 else 5 * w                             # pass 1 reads W; pass 2 reads W, S, writes W, S
    saved = 2 * w / save_stride                                    # chunk-start (W, S), one per group
    return tokens + coefs + state + saved


def chunk_bytes_bwd(C: int, d: int, depth: int, expansion: int = 4, d_out: int | None = None,
                    in_bytes: int = F32, save_stride: int = 1) -> float:
    """Global-memory bytes of one chunk of the backward kernel, one (batch, head);
    with recompute (save_stride > 1) the forward kernel reruns once per chunk (no y)."""
    do = d_out or d
    w = state_numel(d, depth, expansion, d_out) * F32
    tokens = C * (2 * d + do) * in_bytes + C * do * F32 + C * (2 * d + do) * F32   # q,k,v,dy in; dq,dk,dv out
    coefs = 2 * (2 * C + 3) * F32                                  # coefficients in, their grads out
    if depth == 1:
        state = 2 * w + 4 * w                                      # W, S of the chunk; dW, dS read + written
    else:
        state = 3 * w + w + 4 * w + 2 * w           # W in 3 passes, S once; dW, dS read twice, written once
    total = tokens + coefs + state
    if save_stride > 1:
        rerun = chunk_bytes_fwd(C, d, depth, expansion, d_out, in_bytes, 1)
        total += rerun - C * do * F32                              # no y on the rerun
    return total


@dataclass(frozen=True)
class ScanCost:
    """Totals of one memory_scan call (forward and backward), all heads and sequences."""
    flops_fwd: float
    flops_bwd: float
    bytes_fwd: float
    bytes_bwd: float

    @property
    def flops(self) -> float:
        return self.flops_fwd + self.flops_bwd

    @property
    def bytes(self) -> float:
        return self.bytes_fwd + self.bytes_bwd


def scan_cost(L: int, C: int, d: int, heads: int, batch: int = 1, depth: int = 2, expansion: int = 4,
              in_bytes: int = F32, recompute_group: int | None = None) -> ScanCost:
    n = batch * heads * (L // C)
    g = max(1, recompute_group or 1)
    return ScanCost(
        flops_fwd=n * chunk_flops_fwd(C, d, depth, expansion),
        flops_bwd=n * chunk_flops_bwd(C, d, depth, expansion),
        bytes_fwd=n * chunk_bytes_fwd(C, d, depth, expansion, None, in_bytes, g),
        bytes_bwd=n * chunk_bytes_bwd(C, d, depth, expansion, None, in_bytes, g))
