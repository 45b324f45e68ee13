"""Halo exchange: the tokens just before a rank's shard, from the ranks before it.

Local operators that look back a fixed distance need, on rank r, the last n tokens before
its shard: the causal conv (n = kernel - 1 rows), the sliding window (n = window - 1
normalised inputs, from which the rank recomputes K/V at their own positions), a segment
that straddles a shard boundary (n = offset mod segment_len).

``prefix_halo`` sends each rank's last n tokens to the next rank. When a shard is shorter
than n the halo must reach further back, so the exchange repeats: in round i every rank
forwards the last n tokens of (what it received || its own shard). The number of rounds is
worked out from the shard lengths, identically on every rank; one round in the common case.
Each round is a differentiable shift (comm.shift): backward sends the halo's gradient back.
Bytes per rank: rounds * n * (bytes per token), independent of the sequence length.

``gather_prefix`` (full causal attention only) all-gathers every shard: O(L) bytes.
"""

from __future__ import annotations

import torch

from .comm import CPComm
from .shard import ShardInfo


def _rounds(lengths: tuple[int, ...], n: int) -> list[list[int]]:
    """Per round, the number of tokens each rank sends (its running tail length)."""
    tails = [min(n, L) for L in lengths]                     # round 1: own last tokens
    plan = [tails]
    want = [min(n, sum(lengths[:r])) for r in range(len(lengths))]
    while [0] + tails[:-1] != want:
        recv = [0] + tails[:-1]
        tails = [min(n, h + L) for h, L in zip(recv, lengths)]
        plan.append(tails)
    return plan


def prefix_halo(x: torch.Tensor, n: int, comm: CPComm, info: ShardInfo, dim: int = 1) -> torch.Tensor:
    """The min(n, offset) tokens (along `dim`) that precede this rank's shard of x."""
    shape = list(x.shape)
    shape[dim] = 0
    if n <= 0 or comm.size == 1:
        return x.new_zeros(shape)
    length = x.shape[dim]
    halo = x.new_zeros(shape)
    for tails in _rounds(info.lengths, n):
        own = torch.cat([halo, x], dim=dim)
        send = own.narrow(dim, own.shape[dim] - tails[comm.rank], tails[comm.rank])
        shape[dim] = tails[comm.rank - 1] if comm.rank > 0 else 0
        halo = comm.shift(send, tuple(shape))
    assert halo.shape[dim] == min(n, info.offset()) and length == info.length
    return halo


def gather_prefix(x: torch.Tensor, comm: CPComm, info: ShardInfo, dim: int = 1) -> torch.Tensor:
    """Everything before this rank's shard (all earlier shards, concatenated along dim)."""
    if comm.size == 1:
        return x.narrow(dim, 0, 0)
    pad = max(info.lengths) - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(*x.shape[:dim], pad, *x.shape[dim + 1:])], dim=dim)
    every = comm.all_gather(padded)                                  # [P, ...]
    # rank 0 still reads (zero tokens of) the gathered tensor, so every rank runs its backward
    parts = [every[r].narrow(dim, 0, info.lengths[r] if r < comm.rank else 0) for r in range(comm.rank + 1)]
    return torch.cat(parts, dim=dim)
