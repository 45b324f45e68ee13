"""Packed rows (cu_seqlens) under context parallelism: the documents re-laid across the group.

On one device a Block runs its mixer on a packed batch's documents re-laid one per row
(ops/varlen.DocumentLayout, a few length buckets). Under CP rank r holds the contiguous shard
[o_r, o_r + L_r) of every packed row, and a document may start and end inside a shard or span
several. Rather than teach each memory strategy, halo and the MAC ring to reset at document
starts, the ranks re-lay the documents together:

  * every rank builds the same DocumentLayout of the WHOLE rows (cu_seqlens and the gathered
    shard lengths are known everywhere): per bucket, document rows [n_b, T_b];
  * each bucket's document rows are split over the group like any sequence (shard_bounds on
    the memory's chunk grid when the bucket is long enough, else per token; padded to at least
    P tokens so every rank holds one);
  * one all-to-all moves every token from the rank holding it in the packed row to the rank
    holding it in the document row; the CP mixer runs unchanged on each bucket (each document
    is a sequence from position 0 sharded over the group: memory from W^0, halos and MAC
    segments within the document, RoPE from 0, as on one device); a second all-to-all brings
    the outputs back.

Exact for every strategy and mixer because it is the CP path of ordinary sequences; padding
sits after a document's end, so causality keeps it out. Cost per Block and step: two
all-to-alls of the mixer's input and output (forward and again backward; (P-1)/P of the
B L_r D elements cross ranks), on top of the strategy's own traffic, and the buckets' padding
(as on one device, plus up to P-1 tokens per bucket).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from titans_scale.ops.varlen import DocumentLayout, Documents

from .comm import CPComm
from .shard import ShardInfo, shard_bounds


class _Plan:
    """Where each token goes, for one (rows, shard lengths) of one packed batch, on this rank."""

    def __init__(self, layout: DocumentLayout, info: ShardInfo, multiple: int):
        B, L, P, me = layout.batch, layout.length, info.size, info.rank
        pad = B * L                                             # the layout's padding index
        ends = torch.tensor([info.offset(r + 1) for r in range(P)])
        self.shapes: list[tuple[int, int]] = []                 # this rank's [n_b, len] per bucket
        need = [[] for _ in range(P)]                           # flat indices each rank's buckets hold
        for bucket in layout.buckets:
            index = bucket.index.cpu()
            n, T = index.shape
            m = multiple if -(-T // multiple) >= P else 1
            T = max(T, P)
            index = torch.cat([index, index.new_full((n, T - index.shape[1]), pad)], dim=1)
            for r, (a, b) in enumerate(shard_bounds(T, P, m)):
                need[r].append(index[:, a:b].flatten())
                if r == me:
                    self.shapes.append((n, b - a))
        need = [torch.cat(ts) for ts in need]
        owner = [torch.where(g < pad, torch.searchsorted(ends, g % L, right=True), -1) for g in need]
        # receive: my layout's tokens grouped by the rank that holds them (in layout order)
        mine = owner[me]
        recv = [(mine == s).nonzero().flatten() for s in range(P)]
        self.recv_counts = [len(t) for t in recv]
        order = torch.cat(recv)
        self.place = torch.full((len(mine),), len(order), dtype=torch.int64)    # padding: a zero row
        self.place[order] = torch.arange(len(order))
        self.back = order                                       # my layout rows to return, by rank
        # send: the tokens I hold that rank r's layout wants, as rows of my [B * L_r] shard
        a, Lr = info.offset(), info.length
        sends = [need[r][owner[r] == me] for r in range(P)]
        self.send_counts = [len(t) for t in sends]
        g = torch.cat(sends)
        self.send = (g // L) * Lr + (g % L - a)
        self.unsend = torch.empty(B * Lr, dtype=torch.int64)
        self.unsend[self.send] = torch.arange(len(g))

    def to(self, device) -> "_Plan":
        for name in ("place", "back", "send", "unsend"):
            setattr(self, name, getattr(self, name).to(device))
        return self


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
            layout = DocumentLayout(self.cu_seqlens, batch, info.total, self.buckets)
            self._plans[key] = _Plan(layout, info, self.multiple).to(device)
        return self._plans[key]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """fn on x's documents (x: this rank's shard [B, ..., L_r at dim, ...] of the packed rows)."""
        comm = self.comm
        comm.begin(x)
        try:
            plan = self._plan(x.shape[0], ShardInfo.gather(comm, x.shape[dim]), x.device)
            xs = x.movedim(dim, 1)
            flat = xs.reshape(-1, *xs.shape[2:])
            with comm.scope("documents"):
                got = _exchange(comm, flat.index_select(0, plan.send), plan.send_counts, plan.recv_counts)
            got = torch.cat([got, got.new_zeros(1, *got.shape[1:])]).index_select(0, plan.place)
            parts = got.split([n * t for n, t in plan.shapes])
            outs = [fn(p.view(n, t, *p.shape[1:]).movedim(1, dim)).movedim(dim, 1)
                    for p, (n, t) in zip(parts, plan.shapes)]
            out = torch.cat([o.reshape(-1, *o.shape[2:]) for o in outs]).index_select(0, plan.back)
            with comm.scope("documents"):
                out = _exchange(comm, out, plan.recv_counts, plan.send_counts)
            out = out.index_select(0, plan.unsend)
            out = out.view(xs.shape[0], xs.shape[1], *out.shape[1:]).movedim(1, dim)
        except BaseException:
            comm.abort()
            raise
        return comm.end(out)


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
