"""Analytical bytes each rank sends for one cp_memory_scan call (one memory layer).

Same convention as comm.py (bytes a rank puts on the wire). B batch, H memory heads (per
TP rank), d key width, d_v value width, |W| elements of one head's memory weights
(d d_v for depth 1), L_r this rank's shard, L the sequence, P ranks, s_x / s_s bytes per
input / state element. Every call also all-gathers the shard lengths: 8 (P - 1).

    a2a            fwd  (P-1)/P B H L_r (2d + d_v + 3) s_x + B H/P (L - L_r) d_v s_x + (P-1) B H/P 3|W| s_s
                   bwd  (P-1)/P B H L_r d_v s_x + B H/P (L - L_r) (2d + d_v + 3) s_x + (P-1) B H/P 3|W| s_s
    state_passing  fwd  (P-1) B H 3d (3d + d_v) s_s          bwd  the same (reduce-scatter)
    ring           fwd  [r < P-1] (B H 3|W| s_s + m * 8 * ndims)   + [r = P-1] (P-1) B H 3|W| s_s
                   bwd  [r > 0] B H 3|W| s_s                       + 2 (P-1)/P B H 3|W| s_s

state_passing and ring do not depend on L; a2a is linear in it. (a2a assumes q, k, v and
the gates share a dtype, so one all-to-all carries all of them.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryShape:
    B: int
    H: int
    d: int
    dv: int
    weights: int            # |W|: elements of one head's memory weights (sum over layers)
    ndims: int = 12         # dims of the state tensors the ring's header describes (3 * depth * 4)
    x_bytes: int = 4
    state_bytes: int = 4


def memory_bytes(strategy: str, shape: MemoryShape, lengths: list[int], rank: int,
                 micro_batches: int = 1) -> dict[str, int]:
    """{'fwd': bytes, 'bwd': bytes} rank `rank` sends for one memory layer (see the docstring)."""
    P, L, Lr = len(lengths), sum(lengths), lengths[rank]
    B, H, d, dv, W = shape.B, shape.H, shape.d, shape.dv, shape.weights
    sx, ss = shape.x_bytes, shape.state_bytes
    lengths_gather = 8 * (P - 1)
    if strategy == "a2a":
        F, Hl = 2 * d + dv + 3, H // P
        state = (P - 1) * B * Hl * 3 * W * ss
        fwd = (P - 1) * B * Hl * Lr * F * sx + B * Hl * (L - Lr) * dv * sx + state
        bwd = (P - 1) * B * Hl * Lr * dv * sx + B * Hl * (L - Lr) * F * sx + state
    elif strategy == "state_passing":
        fwd = bwd = (P - 1) * B * H * 3 * d * (3 * d + dv) * ss
    elif strategy == "ring":
        state = B * H * 3 * W * ss
        m = min(micro_batches, B * H)
        fwd = (state + m * 8 * shape.ndims if rank < P - 1 else (P - 1) * state)
        bwd = (state if rank > 0 else 0) + 2 * state * (P - 1) // P
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    return {"fwd": fwd + lengths_gather, "bwd": bwd}


def halo_bytes(n: int, lengths: list[int], rank: int, token_bytes: int) -> dict[str, int]:
    """One prefix_halo of n tokens (token_bytes each), when every shard holds >= n tokens
    (one round): forward sends n tokens on, backward sends the received ones' gradient back."""
    P = len(lengths)
    fwd = min(n, lengths[rank]) * token_bytes if rank < P - 1 else 0
    bwd = min(n, sum(lengths[:rank])) * token_bytes if rank > 0 else 0
    return {"fwd": fwd, "bwd": bwd}
