"""Packed rows: where documents begin inside a batch of stream windows, and the `cu_seqlens` of the batch.

A row is a window of L + 1 consecutive tokens of a split's stream (inputs: the first L,
targets: the last L), where documents lie end to end, each ending with eos. The document starts
of a split are found once (a sorted array of stream offsets); marking them in a batch is one
`searchsorted` and a scatter, with no loop over documents.

Every row start is a document start: a document cut by a row's end goes on, as a new
document, at the start of the window that follows in the stream (another row, usually of
another step, since windows are visited in a seeded order).
"""

from __future__ import annotations

import numpy as np
import torch


def window_begins(starts: np.ndarray, length: int, doc_starts: np.ndarray) -> np.ndarray:
    """[len(starts), length] bool: True at window position i when a document starts at stream offset
    starts[b] + i (`doc_starts` sorted)."""
    starts = np.asarray(starts, dtype=np.int64)
    lo = np.searchsorted(doc_starts, starts, "left")
    hi = np.searchsorted(doc_starts, starts + length, "left")
    counts = hi - lo
    rows = np.repeat(np.arange(len(starts)), counts)
    # the ragged ranges lo[b] .. hi[b] laid end to end: index of each found document start
    found = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(lo, counts)
    out = np.zeros((len(starts), length), dtype=bool)
    out[rows, doc_starts[found] - starts[rows]] = True
    return out


def cu_seqlens(begins: torch.Tensor) -> torch.Tensor:
    """int32 document start offsets in the flattened [B, L] batch, from 0 to B * L; every row start is one."""
    b = begins.clone()
    b[:, 0] = True
    starts = torch.nonzero(b.reshape(-1)).squeeze(1)
    return torch.cat([starts, starts.new_tensor([b.numel()])]).to(torch.int32)


__all__ = ["window_begins", "cu_seqlens"]
