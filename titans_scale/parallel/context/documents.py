"""Packed rows (cu_seqlens) under context parallelism: local documents alone, the rest re-laid.

On one device a Block runs its mixer on a packed batch's documents re-laid one per row
(ops/varlen.DocumentLayout, a few length buckets). Under CP rank r holds the contiguous shard
[o_r, o_r + L_r) of every packed row, and a document may lie inside a shard or span several.
Rather than teach each memory strategy, halo and the MAC ring to reset at document starts:

  * each rank cuts its shard of every row at the document starts inside it and runs the mixer
    on those pieces as on one device (a DocumentLayout of its own, the CP modules switched to
    no transfers: CPComm.alone_). A document inside the shard is then exact, with no
    communication;
  * the documents that span shards (at most one per row and shard boundary) are re-laid across
    the group: every rank builds the same DocumentLayout of the WHOLE rows (cu_seqlens and the
    gathered shard lengths are known everywhere) and keeps those documents; each bucket's
    document rows are split over the group like any sequence (shard_bounds on the memory's
    chunk grid when the bucket is long enough, else per token; padded to at least P tokens);
    one all-to-all moves each of their tokens to the rank holding it in the document row, the
    CP mixer runs unchanged on each bucket (a sequence from position 0 sharded over the group:
    memory from W^0, halos and MAC segments within the document, RoPE from 0, as on one
    device), and a second all-to-all brings the outputs back, replacing those of the pieces.

Exact for every strategy and mixer: one device's path for local documents, the CP path of
ordinary sequences for spanning ones; padding sits after a document's end, so causality keeps
it out. Cost per Block and step: the spanning documents' tokens cross ranks twice (forward and
again backward) on top of the strategy's traffic for them; their pieces are also run locally
and discarded (at most two pieces per row and rank).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from titans_scale.ops.varlen import DocumentLayout, Documents

from .comm import CPComm
from .shard import ShardInfo, shard_bounds


class _Plan:
    """For one (rows, shard lengths) of a packed batch, on this rank: the layout of its own
    pieces (its shard of every row cut at each document start inside it), and where the tokens
    of the documents that span shards go and come back from."""

    def __init__(self, cu_seqlens: torch.Tensor, batch: int, info: ShardInfo, multiple: int, buckets, device):
        B, L, P, me = batch, info.total, info.size, info.rank
        a, Lr = info.offset(), info.length
        cu = cu_seqlens.to("cpu", torch.int64)
        col = cu[:-1] % L
        inside = (col >= a) & (col < a + Lr)
        pieces = torch.cat([torch.arange(B + 1) * Lr, (cu[:-1] // L * Lr + col - a)[inside]])
        self.local = DocumentLayout(torch.unique(pieces).to(device), B, Lr, buckets)
        # the documents whose first and last tokens lie on different ranks, bucketed by length
        # as on one device, each bucket's document rows split over the group like a sequence
        pad = B * L                                             # the layout's padding index
        ends = torch.tensor([info.offset(r + 1) for r in range(P)])
        owner = lambda g: torch.searchsorted(ends, g % L, right=True)  # noqa: E731
        self.shapes: list[tuple[int, int]] = []                 # this rank's [n_b, len] per bucket
        need = [[torch.zeros(0, dtype=torch.int64)] for _ in range(P)]   # flat indices each rank holds
        for bucket in DocumentLayout(cu, B, L, buckets).buckets:
            index = bucket.index
            real = (index < pad).sum(1)
            spans = owner(index[:, 0]) != owner(index.gather(1, real[:, None] - 1)[:, 0])
            if not bool(spans.any()):
                continue
            index, T = index[spans], int(real[spans].max())
            m = multiple if -(-T // multiple) >= P else 1
            index = torch.cat([index[:, :T], index.new_full((len(index), max(0, P - T)), pad)], dim=1)
            for r, (lo, hi) in enumerate(shard_bounds(index.shape[1], P, m)):
                need[r].append(index[:, lo:hi].flatten())
                if r == me:
                    self.shapes.append((len(index), hi - lo))
        need = [torch.cat(ts) for ts in need]
        owners = [torch.where(g < pad, owner(g), -1) for g in need]
        # receive: my layout's tokens grouped by the rank that holds them (in layout order)
        mine = owners[me]
        recv = [(mine == s).nonzero().flatten() for s in range(P)]
        self.recv_counts = [len(t) for t in recv]
        order = torch.cat(recv)
        place = torch.full((len(mine),), len(order), dtype=torch.int64)    # padding: a zero row
        place[order] = torch.arange(len(order))
        # send: the tokens I hold that rank r's layout wants, as rows of my [B * L_r] shard
        sends = [need[r][owners[r] == me] for r in range(P)]
        self.send_counts = [len(t) for t in sends]
        g = torch.cat(sends)
        send = (g // L) * Lr + (g % L - a)
        unsend = torch.full((B * Lr,), len(g), dtype=torch.int64)           # not spanning: a zero row
        unsend[send] = torch.arange(len(g))
        spanning = torch.zeros(B * Lr, dtype=torch.bool)
        spanning[send] = True
        self.place, self.back, self.send, self.unsend, self.spanning = (
            t.to(device) for t in (place, order, send, unsend, spanning))


def _exchange(comm: CPComm, rows: torch.Tensor, in_counts: list[int], out_counts: list[int]) -> torch.Tensor:
    """all_to_all of whole rows [N, *rest]: in_counts rows to each rank, out_counts from each."""
    rest = rows.shape[1:]
    width = math.prod(rest)
    out = comm.all_to_all(rows.reshape(-1), [c * width for c in in_counts], [c * width for c in out_counts])
    return out.view(-1, *rest)


class CPDocuments(Documents):
    """The documents of packed rows whose tokens are sharded over a CP group (Block's `docs`
    under CP): map(fn, x) runs fn, a CP mixer, on the documents re-laid across the group."""

    def __init__(self, docs: Documents, comm: CPComm, multiple: int):
        super().__init__(docs.cu_seqlens, docs.buckets)
        self.comm, self.multiple = comm, multiple
        self._plans: dict[tuple, _Plan] = {}

    def _plan(self, batch: int, info: ShardInfo, device) -> _Plan:
        key = (batch, info.lengths)
        if key not in self._plans:           # once per batch shape: every layer shares it
            self._plans[key] = _Plan(self.cu_seqlens, batch, info, self.multiple, self.buckets, device)
        return self._plans[key]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """fn on x's documents (x: this rank's shard [B, ..., L_r at dim, ...] of the packed rows)."""
        comm = self.comm
        comm.begin(x)
        try:
            plan = self._plan(x.shape[0], ShardInfo.gather(comm, x.shape[dim]), x.device)
            with comm.alone_():              # this rank's pieces, as on one device
                out = plan.local.map(fn, x, dim)
            if plan.shapes:                  # documents spanning shards (every rank knows if any)
                out = self._spanning(plan, fn, x, out, dim)
        except BaseException:
            comm.abort()
            raise
        return comm.end(out)

    def _spanning(self, plan: _Plan, fn, x: torch.Tensor, local: torch.Tensor, dim: int) -> torch.Tensor:
        """local with the tokens of documents that span shards replaced by fn on them re-laid
        across the group (one all-to-all there, the CP mixer on each bucket, one back)."""
        comm = self.comm
        xs = x.movedim(dim, 1)
        flat = xs.reshape(-1, *xs.shape[2:])
        with comm.scope("documents"):
            got = _exchange(comm, flat.index_select(0, plan.send), plan.send_counts, plan.recv_counts)
        got = _with_zero_row(got).index_select(0, plan.place)
        parts = got.split([n * t for n, t in plan.shapes])
        outs = [fn(p.view(n, t, *p.shape[1:]).movedim(1, dim)).movedim(dim, 1)
                for p, (n, t) in zip(parts, plan.shapes)]
        out = torch.cat([o.reshape(-1, *o.shape[2:]) for o in outs]).index_select(0, plan.back)
        with comm.scope("documents"):
            out = _exchange(comm, out, plan.recv_counts, plan.send_counts)
        out = _with_zero_row(out).index_select(0, plan.unsend)
        local = local.movedim(dim, 1)
        keep = plan.spanning.view(-1, *[1] * (out.dim() - 1))
        out = torch.where(keep, out, local.reshape(out.shape))
        return out.view(local.shape).movedim(1, dim)


def _with_zero_row(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(1, *t.shape[1:])])


class PackedRows:
    """One per CP model: the CPDocuments of the batch in flight, planned once for all its Blocks."""

    def __init__(self, comm: CPComm, multiple: int):
        self.comm, self.multiple = comm, multiple
        self._docs: Documents | None = None
        self._cp: CPDocuments | None = None

    def of(self, docs: Documents) -> CPDocuments:
        if docs is not self._docs:            # a new batch (the model makes one Documents per forward)
            self._docs, self._cp = docs, CPDocuments(docs, self.comm, self.multiple)
        return self._cp
