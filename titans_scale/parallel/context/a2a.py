"""a2a: trade sequence shards for head shards, scan whole sequences, trade back.

Memory heads are independent, so with H heads on P ranks (H divisible by P) rank r can own
heads [r H/P, (r+1) H/P) for the WHOLE sequence: one all-to-all turns the per-rank sequence
shards of (q, k, v, theta, eta, alpha) [B, H, L_r, .] into head shards [B, H/P, L, .], the
plain single-device memory_scan runs on them (any memory depth, any impl), and a second
all-to-all sends each rank the retrieved y of its own tokens for every head. The final
state of each head lives on the rank that owns the head; one all-gather of it (O(H |W|))
gives every rank the full final state. Exact: the scan sees exactly the single-device
inputs; only where the numbers sit changes.

Bytes per rank and layer (forward; backward moves the same amounts back), P ranks,
s_x / s_g bytes per q,k,v / gate element, |S| = the state's 3 |W| elements per head:
    (P-1)/P * B H L_r (2 d + d_v) s_x  +  (P-1)/P * B H L_r 3 s_g      inputs out
    B (H/P) (L - L_r) d_v s_x                                          y back
    (P-1) B (H/P) |S| s_g                                              final state
so a2a grows linearly with the sequence length. The normalised memory's ln_weight/ln_bias
([H, d]) are sliced to the rank's heads like the state; nothing more is sent.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from titans_scale.ops.memory import memory_scan
from titans_scale.ops.state import MemoryState

from .comm import CPComm
from .shard import ShardInfo


def _seq_to_heads(x: torch.Tensor, comm: CPComm, info: ShardInfo) -> torch.Tensor:
    """[B, H, L_r, F] sequence shard -> [B, H/P, L, F] head shard (all tokens)."""
    B, H, Lr, F = x.shape
    P, Hl = comm.size, H // comm.size
    send = x.reshape(B, P, Hl, Lr, F).transpose(0, 1).reshape(-1)
    out = comm.all_to_all(send, [B * Hl * Lr * F] * P, [B * Hl * L * F for L in info.lengths])
    parts = out.split([B * Hl * L * F for L in info.lengths])
    return torch.cat([p.view(B, Hl, L, F) for p, L in zip(parts, info.lengths)], dim=2)


def _heads_to_seq(y: torch.Tensor, comm: CPComm, info: ShardInfo) -> torch.Tensor:
    """[B, H/P, L, F] head shard -> [B, H, L_r, F] this rank's tokens of every head."""
    B, Hl, _, F = y.shape
    P, Lr = comm.size, info.length
    send = torch.cat([p.reshape(-1) for p in y.split(list(info.lengths), dim=2)])
    out = comm.all_to_all(send, [B * Hl * L * F for L in info.lengths], [B * Hl * Lr * F] * P)
    return out.view(P, B, Hl, Lr, F).transpose(0, 1).reshape(B, P * Hl, Lr, F)


def _gather_heads(ts: list[torch.Tensor], comm: CPComm) -> list[torch.Tensor]:
    """Per-head-shard tensors [B, H/P, ...] -> full [B, H, ...] on every rank (one all-gather)."""
    B, Hl = ts[0].shape[:2]
    flat = torch.cat([t.reshape(B, Hl, -1) for t in ts], dim=-1)
    every = comm.all_gather(flat)                                       # [P, B, Hl, n]
    full = every.transpose(0, 1).reshape(B, comm.size * Hl, -1)
    out, i = [], 0
    for t in ts:
        n = t[0, 0].numel()
        out.append(full[..., i:i + n].reshape(B, comm.size * Hl, *t.shape[2:]))
        i += n
    return out


def a2a_memory_scan(q, k, v, theta, eta, alpha, state: MemoryState, comm: CPComm, info: ShardInfo,
                    impl: str = "auto", recompute_group: int | None = None, norm=None):
    """q, k, v [B, H, L_r, .], gates [B, H, L_r]: this rank's shard; state: the sequence's
    start state (all heads, same on every rank); norm: (ln_weight, ln_bias) [H, d] or None.
    Returns (y [B, H, L_r, d_v], final state)."""
    H, P = q.shape[1], comm.size
    gates = torch.stack([theta, eta, alpha], dim=-1)
    qkv = torch.cat([q, k, v], dim=-1)
    if gates.dtype == qkv.dtype:                          # one all-to-all when dtypes agree
        both = _seq_to_heads(torch.cat([qkv, gates], dim=-1), comm, info)
        qkv, gates = both[..., :qkv.shape[-1]], both[..., qkv.shape[-1]:]
    else:
        qkv, gates = _seq_to_heads(qkv, comm, info), _seq_to_heads(gates, comm, info)
    d = q.shape[-1]
    mine = slice(comm.rank * (H // P), (comm.rank + 1) * (H // P))
    local = pytree.tree_map(lambda w: w[:, mine], state)            # this rank's heads of the state
    ln = {} if norm is None else {"ln_weight": norm[0][mine], "ln_bias": norm[1][mine]}
    y, end = memory_scan(qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:], *gates.unbind(-1),
                         local, state.chunk_size, impl, recompute_group=recompute_group, **ln)
    y = _heads_to_seq(y, comm, info)
    return y, pytree.tree_unflatten(_gather_heads(end.tensors(), comm), pytree.tree_structure(end))
