"""Recompute at chunk-group boundaries: O(chunks / g) saved states instead of O(chunks).

Without recompute, backward through a memory scan of L tokens keeps every chunk-start
state (a few copies of |W| per chunk): O(L/C * |W|) per head, 3 GB at 64k tokens for
4 heads of a 64-wide, 4x-expanded 2-layer memory. With recompute_group = g the forward
keeps only the state at the start of every g-th chunk; backward reruns one group of g
chunks at a time from its saved state. Activation memory becomes
O(L/(C*g) * |W| + g * (|W| + C * d)) per head; g near sqrt(L/C) minimises it.

The chunked PyTorch path does this with torch.utils.checkpoint (use_reentrant=False) over
spans of g chunk pieces; recomputation replays the same ops on the same inputs, so the
gradients are bitwise those of the plain path. The Triton path (ops/triton_scan.py) saves
every g-th state from its forward kernel and reruns the kernel per group in backward.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .state import MemoryArgumentError


def check_recompute_group(group) -> int:
    """None or 0 turns recompute off; a positive int is chunks per saved state."""
    if group is None:
        return 0
    if isinstance(group, bool) or not isinstance(group, int) or group < 0:
        raise MemoryArgumentError(
            f"recompute_group must be None, 0 (off) or a positive number of chunks, got {group!r}")
    return group


def chunk_groups(n_chunks: int, group: int) -> list[tuple[int, int]]:
    """[c0, c1) ranges of `group` chunks (the last may be shorter)."""
    return [(c, min(c + group, n_chunks)) for c in range(0, n_chunks, group)]


def records_graph(tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def recompute_groups(pieces: list[tuple[int, int]], group, tensors) -> list[tuple[int, int]] | None:
    """Token spans [a, b) of `group` consecutive chunk pieces ((start, n) on the chunk grid),
    each to be run under checkpoint; None when recompute is off or would not save anything
    (one group, or autograd is not recording)."""
    g = check_recompute_group(group)
    if g == 0 or len(pieces) <= g or not records_graph(tensors):
        return None
    out = []
    for i in range(0, len(pieces), g):
        last = pieces[min(i + g, len(pieces)) - 1]
        out.append((pieces[i][0], last[0] + last[1]))
    return out


def run_checkpointed(fn, *args):
    """fn(*args) under activation checkpointing: backward keeps args and reruns fn."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
