"""state_passing: a linear memory's shard update is an affine map of its start state.

For depth 1, f_W(k) = k W and u_i = k_i^T (k_i W_c - v_i). Over one piece of a chunk
(ops/chunked.py's closed form, c_s / c_w its per-token coefficients):

    S'  = P S + G_s W_c - R_s             G = K^T diag(c) K  (d x d),  R = K^T diag(c) V
    W'  = A W + Q S + G_w W_c - R_w
    W_c' = W_c, or W' when the piece ends its chunk

so the state X = [W_c; W; S] (3d x d_v, stacked) moves by X' = M X + b, with M a 3d x 3d
matrix acting on the left (every column of the d_v columns independently) and b the update
from the zero state. A shard is a sequence of pieces, so its map is affine as well. A shard
that starts on a chunk boundary has W_c = W and its map acts on (W, S) alone (2d columns);
one that starts mid-chunk needs all three blocks; both cases are handled.

Each rank finds its shard's map with ONE call of the public memory_scan: the columns act
independently, so appending k*d basis columns to the state (identity blocks in W_c, W, S,
zero values v for those columns) and running from [basis | 0] gives [M | b] as the final
state. The same run gives the retrieval's dependence on the start state: y_t = q_t W_c(t)
= (q_t M_c(t)) X + q_t b_c(t), i.e. the basis columns of y are the coefficients of X. So once
X_r, this rank's true start state, is known, y = y_basis X_r + y_zero: the "rerun from the
true start state" costs one [L_r, k d] x [k d, d_v] matmul instead of a second scan.

Then: all-gather the maps (padded to 3d x (3d + d_v) per head), compose them in rank order
(a prefix scan, O(P d^3) per head on every rank) to get X_r and the final state. Backward
is autograd through the same graph: the all-gather's adjoint is a reduce-scatter of the
maps' gradients, the "mirrored" pass. Bytes per rank and layer: (P-1) B H 3d (3d + d_v) s
forward and the same backward (s = 4 for fp32 states), independent of the sequence length.
"""

from __future__ import annotations

import torch

from titans_scale.ops.memory import memory_scan
from titans_scale.ops.state import MemoryState, state_dtype

from .comm import CPComm
from .shard import ShardInfo


def _stack(state: MemoryState) -> torch.Tensor:
    return torch.cat([state.chunk_start[0], state.weights[0], state.momentum[0]], dim=-2)


def shard_map(q, k, v, theta, eta, alpha, position: int, chunk_size: int, impl: str = "auto",
              recompute_group: int | None = None):
    """The affine map of one shard on X = [W_c; W; S]: returns (M [B, H, 3d, 3d],
    b [B, H, 3d, d_v], y_basis [B, H, L, k d], y_zero [B, H, L, d_v], k)."""
    B, H, L, d = q.shape
    dv, dt = v.shape[-1], state_dtype(q)
    nb = 3 if position else 2                           # basis blocks: (W_c, W, S) or (W = W_c, S)
    q, k, v = (t.to(dt) for t in (q, k, v))             # y_basis multiplies X: keep it in fp32
    eye = torch.eye(d, dtype=dt, device=q.device).expand(B, H, d, d)
    zero, zv = q.new_zeros(B, H, d, d, dtype=dt), q.new_zeros(B, H, d, dv, dtype=dt)
    blocks = {"c": [eye, zero, zero], "w": [zero, eye, zero], "s": [zero, zero, eye]} if nb == 3 else \
             {"c": [eye, zero], "w": [eye, zero], "s": [zero, eye]}
    init = {n: torch.cat([*b, zv], dim=-1) for n, b in blocks.items()}
    v_aug = torch.cat([v.new_zeros(B, H, L, nb * d), v], dim=-1)
    start = MemoryState([init["c"]], [init["w"]], [init["s"]], position, chunk_size)
    y, end = memory_scan(q, k, v_aug, theta, eta, alpha, start, chunk_size, impl, recompute_group=recompute_group)
    X = _stack(end)                                    # [B, H, 3d, nb d + d_v] = [M | b]
    M, b = X[..., :nb * d], X[..., nb * d:]
    if nb == 2:                                        # act on [W_c; W; S]: W_c's block is unused
        M = torch.cat([torch.zeros_like(M[..., :d]), M], dim=-1)
    return M, b, y[..., :nb * d], y[..., nb * d:], nb


def state_passing_memory_scan(q, k, v, theta, eta, alpha, state: MemoryState, comm: CPComm,
                              info: ShardInfo, impl: str = "auto", recompute_group: int | None = None):
    """Depth-1 memory over a sequence sharded across the CP group. Arguments as a2a_memory_scan."""
    C, d = state.chunk_size, q.shape[-1]
    position = (state.position + info.offset()) % C
    M, b, y_basis, y_zero, nb = shard_map(q, k, v, theta, eta, alpha, position, C, impl, recompute_group)
    every = comm.all_gather(torch.cat([M, b], dim=-1))              # [P, B, H, 3d, 3d + d_v]
    X = _stack(state).to(M.dtype)
    mine = None
    for r in range(comm.size):                                    # prefix composition
        if r == comm.rank:
            mine = X
        X = every[r][..., :3 * d] @ X + every[r][..., 3 * d:]
    coeff = mine if nb == 3 else mine[..., d:, :]                 # the blocks the basis stands for
    y = (y_basis @ coeff + y_zero).to(q.dtype)
    final = MemoryState([X[..., :d, :]], [X[..., d:2 * d, :]], [X[..., 2 * d:, :]],
                        (state.position + info.total) % C, C)
    return y, final
