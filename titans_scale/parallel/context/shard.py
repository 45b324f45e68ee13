"""How one sequence is cut into context-parallel shards, and what each rank knows about it.

A sequence of L tokens is split into P contiguous shards, rank r holding tokens
[start_r, start_r + len_r). ``shard_bounds(L, P, multiple)`` is the split the framework uses:
the sequence is cut into units of ``multiple`` tokens (the last unit may be shorter); every
rank gets floor(units / P) whole units and the first (units mod P) ranks one more, so shard
lengths differ by at most one unit and only the last shard can end on a partial unit.
``multiple`` = the chunk size keeps every shard boundary on the memory's chunk grid (the
state-passing maps then act on (W, S) only), the MAC segment length keeps MAC segments whole.

The CP ops accept any split with non-empty shards: each call all-gathers the local lengths
(8 bytes per rank), so tests also use splits that cut chunks and segments anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from titans_scale.config import CPStrategy
from titans_scale.errors import ConfigError


class CPConfigError(ConfigError):
    """A context-parallel layout or strategy that cannot run; the message says why and the fix."""


STRATEGIES = tuple(s for s in get_args(CPStrategy) if s != "auto")   # the exact strategies; "auto" picks one


def shard_bounds(length: int, cp: int, multiple: int = 1) -> list[tuple[int, int]]:
    """[(start, stop)] of each rank's shard (see the module docstring)."""
    if cp < 1 or multiple < 1:
        raise CPConfigError(f"shard_bounds: cp={cp} and multiple={multiple} must be >= 1")
    units = -(-length // multiple)
    if units < cp:
        raise CPConfigError(
            f"sequence length {length} gives {units} unit(s) of {multiple} tokens, fewer than "
            f"cp={cp} ranks; use a longer sequence or a smaller context-parallel size")
    base, extra = divmod(units, cp)
    bounds, start = [], 0
    for r in range(cp):
        stop = min(length, start + (base + (r < extra)) * multiple)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass(frozen=True)
class ShardInfo:
    """Every rank's shard length (gathered), so each rank knows every offset."""

    lengths: tuple[int, ...]
    rank: int

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def offset(self, r: int | None = None) -> int:
        return sum(self.lengths[: self.rank if r is None else r])

    @property
    def length(self) -> int:
        return self.lengths[self.rank]

    @classmethod
    def gather(cls, comm, local_length: int) -> "ShardInfo":
        lengths = tuple(comm.all_gather_ints(local_length))
        if min(lengths) < 1:
            raise CPConfigError(
                f"context-parallel shard lengths {list(lengths)}: every rank needs at least one "
                "token; split with titans_scale.parallel.context.shard_bounds")
        return cls(lengths, comm.rank)
