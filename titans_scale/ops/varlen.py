"""Packed rows of variable-length documents, re-laid as one document per row.

A packed batch is B rows of L tokens holding several documents each; `cu_seqlens` (as fla
takes it) is the int32 1-D tensor of document start offsets into the flattened B*L stream,
from 0 to B*L, every row start r*L among them. `DocumentLayout` moves a packed tensor's tokens
into per-document rows (each starting at position 0, padded after its end) and back, so the
memory op and every mixer run unchanged on documents: each starts from W^0 with zero
momentum, its own chunk and segment grids, its own positions, a fresh conv window and
attention that cannot see another document. Padding sits after a document's last token,
so causality keeps it out of that document's outputs (and gradients).

Documents are grouped into buckets by length (up to the next power of two, 64 at least), each
bucket padded to its longest member: a few calls (at most log2(L) - 5), never one per document,
and padding below 2x the tokens plus 64 per short document (one bucket padded to the longest
document, buckets="one", can cost far more: bench/bench_pack.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from titans_scale.errors import DataError

MIN_BUCKET_LOG2 = 6         # documents up to 64 tokens share one bucket (pad at most 64 each)


class PackedBatchError(DataError):
    """cu_seqlens does not describe the packed batch it comes with; the message says how."""


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, length: int) -> None:
    """cu_seqlens must run 0 = c_0 < c_1 < ... < c_n = B*L and hold every row start r*L."""
    if not torch.is_tensor(cu_seqlens) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
            or cu_seqlens.dtype.is_floating_point:
        raise PackedBatchError("cu_seqlens must be a 1-D integer tensor of document starts from 0 to B*L")
    cu = cu_seqlens.to("cpu", torch.int64)
    total = batch * length
    if cu[0] != 0 or cu[-1] != total or not bool((cu[1:] > cu[:-1]).all()):
        raise PackedBatchError(f"cu_seqlens must rise strictly from 0 to B*L = {total}, got "
                               f"{cu[:4].tolist()}...{cu[-2:].tolist()}")
    rows = torch.arange(batch, dtype=torch.int64) * length
    if not bool(torch.isin(rows, cu).all()):
        raise PackedBatchError(f"cu_seqlens must hold every row start r*L (L = {length}): a document "
                               "never crosses a row")


@dataclass(frozen=True)
class _Bucket:
    index: torch.Tensor      # [n, T] flat token index of each document position (B*L: padding)
    rows: torch.Tensor       # [n] the packed row each document sits in


def row_slice(cu_seqlens: torch.Tensor, length: int, start: int, stop: int) -> torch.Tensor:
    """cu_seqlens of rows [start, stop) of a packed batch of `length`-token rows (a data-parallel
    rank's block, a micro-batch): row starts are document starts, so no document is cut."""
    keep = (cu_seqlens >= start * length) & (cu_seqlens <= stop * length)
    return cu_seqlens[keep] - start * length


class DocumentLayout:
    """The per-document layout of one packed [B, L] batch.

    split(x, dim) -> one [n_b, ..., T_b, ...] tensor per bucket (documents along dim 0, their
    tokens along `dim`); merge(parts, dim) puts them back as x was laid out; map(fn, x, dim)
    is merge([fn(p) for p in split(x, dim)], dim).
    """

    def __init__(self, cu_seqlens: torch.Tensor, batch: int, length: int,
                 buckets: Literal["pow2", "one"] = "pow2"):
        check_cu_seqlens(cu_seqlens, batch, length)
        self.batch, self.length = batch, length
        cu = cu_seqlens.to(torch.int64)
        starts, lens = cu[:-1], cu[1:] - cu[:-1]
        # One host sync per batch: the lengths decide the padded shapes.
        lens_host = lens.cpu()
        key = (torch.zeros_like(lens_host) if buckets == "one"
               else torch.ceil(torch.log2(lens_host.double())).long().clamp_min(MIN_BUCKET_LOG2))
        dev = cu.device
        self.buckets: list[_Bucket] = []
        pieces = []
        for b in torch.unique(key).tolist():
            docs = (key == b).nonzero().flatten().to(dev)
            T = int(lens_host[key == b].max())
            pos = torch.arange(T, device=dev)
            index = starts[docs, None] + pos
            index = torch.where(pos < lens[docs, None], index, batch * length)
            self.buckets.append(_Bucket(index, starts[docs] // length))
            pieces.append(index.flatten())
        # where each packed token sits in the buckets' concatenated flat rows
        flat = torch.cat(pieces)
        self._inverse = torch.empty(batch * length + 1, dtype=torch.int64, device=dev)
        self._inverse[flat] = torch.arange(flat.numel(), device=dev)
        self._inverse = self._inverse[:-1]
        self.padded_tokens = flat.numel()

    def split(self, x: torch.Tensor, dim: int) -> list[torch.Tensor]:
        """x: [B, ..., L (at dim), ...] -> per bucket [n_b, ..., T_b, ...] (zeros as padding)."""
        xs = x.movedim(dim, 1)
        rest = xs.shape[2:]
        flat = torch.cat([xs.reshape(self.batch * self.length, *rest), xs.new_zeros(1, *rest)])
        return [flat.index_select(0, b.index.flatten()).view(*b.index.shape, *rest).movedim(1, dim)
                for b in self.buckets]

    def merge(self, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        """The inverse of split: per-bucket [n_b, ..., T_b, ...] -> [B, ..., L, ...]."""
        flat = [p.movedim(dim, 1) for p in parts]
        rest = flat[0].shape[2:]
        flat = torch.cat([p.reshape(-1, *rest) for p in flat])
        return flat.index_select(0, self._inverse).view(self.batch, self.length, *rest).movedim(1, dim)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """fn run on every bucket of documents (a few calls, not one per document)."""
        return self.merge([fn(p) for p in self.split(x, dim)], dim)


class Documents:
    """cu_seqlens of one packed batch, its DocumentLayout built once per (B, L) it is used at
    (every layer of a model shares it: one host sync per batch). B and L are read off the
    tensor mapped (the mixer's batch-first input), not the residual stream, which a pipeline
    stage or sequence parallelism keeps sequence-first or split."""

    def __init__(self, cu_seqlens: torch.Tensor, buckets: Literal["pow2", "one"] = "pow2"):
        self.cu_seqlens, self.buckets = cu_seqlens, buckets
        self._layout: DocumentLayout | None = None

    def layout(self, batch: int, length: int) -> DocumentLayout:
        lay = self._layout
        if lay is None or (lay.batch, lay.length) != (batch, length):
            lay = self._layout = DocumentLayout(self.cu_seqlens, batch, length, self.buckets)
        return lay

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """fn on x's documents (x: [B, ..., L at dim, ...]), each a row of its own from position 0."""
        return self.layout(x.shape[0], x.shape[dim]).map(fn, x, dim)


__all__ = ["Documents", "DocumentLayout", "PackedBatchError", "check_cu_seqlens", "row_slice"]
