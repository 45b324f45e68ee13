"""A deterministic, resumable, data-parallel token loader over prepared shards.

The split's tokens are one flat stream of N tokens. Each epoch e cuts it into
n = (N - 1) // L windows of L + 1 tokens, starting at a seeded offset in [0, N-1-n*L]
(so different epochs see different cuts), and visits them in a seeded permutation.
Epochs are laid end to end into one endless global window sequence j = 0, 1, 2, ...
that depends only on (seed, N, L).

A global batch takes the next world_size * B windows; rank r takes the r-th block of B.
So ranks get disjoint windows of one global stream, and the batches of world_size ranks
laid side by side equal one rank's batch with B * world_size. The whole position is one
integer (windows consumed), so `state_dict` / `load_state_dict` resume exactly, also with
another world size when the global batch is kept (with another global batch the stream
goes on from the same window).

The data is any source `open_source` reads (prepared shards in either layout, or a Megatron
indexed dataset prefix). `rows(begins=True)` also marks where documents start in each window
(data/packing.py), from the split's document starts found once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from titans_scale.data.packing import window_begins
from titans_scale.data.sources import open_source
from titans_scale.data.tokenizer import Tokenizer
from titans_scale.errors import DataError


def _rng(*xs: int) -> np.random.Generator:
    return np.random.default_rng([x % (1 << 64) for x in xs])


def check_same_stream(saved: dict, ours: dict, setting: str) -> None:
    """Refuse a loader state saved for another stream (its identity: `ours`) in one line."""
    for key, value in ours.items():
        if saved.get(key) != value:
            raise DataError(f"data loader state has {key}={saved.get(key)!r} but this run has {key}={value!r}; "
                            f"resume with the same {setting}, tokenizer, seed and seq_len")


class TokenLoader:
    def __init__(self, shard_dir: str | Path, split: str, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, tokenizer: Tokenizer | None = None) -> None:
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be >= 1")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        self.index = open_source(shard_dir, tokenizer)
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._stream = self.index.stream(split)
        n_tokens = len(self._stream)
        if n_tokens < seq_len + 1:
            raise DataError(f"data split '{split}' in '{shard_dir}' has {n_tokens} tokens, fewer than "
                            f"seq_len + 1 = {seq_len + 1}; lower seq_len or add data")
        self.windows_per_epoch = (n_tokens - 1) // seq_len
        self._slack = n_tokens - 1 - self.windows_per_epoch * seq_len
        self.consumed = 0  # windows of the global stream taken so far, by all ranks
        self._epochs: dict[int, tuple[int, np.ndarray]] = {}
        self._doc_starts: np.ndarray | None = None      # found on first use (packing only)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> int:
        return self.consumed // self.windows_per_epoch

    @property
    def step(self) -> int:
        return self.consumed // self.global_batch

    def _epoch_plan(self, e: int) -> tuple[int, np.ndarray]:
        if e not in self._epochs:
            rng = _rng(self.seed, e)
            offset = int(rng.integers(0, self._slack + 1))
            self._epochs = {k: v for k, v in self._epochs.items() if k >= e - 1}  # keep this and the last
            self._epochs[e] = (offset, rng.permutation(self.windows_per_epoch))
        return self._epochs[e]

    def window_starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of global windows first .. first+count-1."""
        return self.starts_of(np.arange(first, first + count, dtype=np.int64))

    def starts_of(self, j: np.ndarray) -> np.ndarray:
        """Token offsets of the global windows `j`."""
        epochs, pos = np.divmod(np.asarray(j, dtype=np.int64), self.windows_per_epoch)
        starts = np.empty(len(epochs), dtype=np.int64)
        for e in np.unique(epochs):
            offset, perm = self._epoch_plan(int(e))
            sel = epochs == e
            starts[sel] = offset + perm[pos[sel]] * self.seq_len
        return starts

    def __iter__(self) -> "TokenLoader":
        return self

    def read_windows(self, j: np.ndarray, begins: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Global windows `j` as [len(j), L + 1] int64 tokens, and (begins=True) where documents start in them."""
        starts = self.starts_of(j)
        data = np.stack([self._stream.read(int(s), self.seq_len + 1) for s in starts])
        if not begins:
            return data, None
        if self._doc_starts is None:
            self._doc_starts = self.index.doc_starts(self.split)
        return data, window_begins(starts, self.seq_len + 1, self._doc_starts)

    def rows(self, begins: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """This rank's next batch of windows (see `read_windows`)."""
        first = self.consumed + self.rank * self.batch_size
        out = self.read_windows(np.arange(first, first + self.batch_size), begins)
        self.consumed += self.global_batch
        return out

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(self.rows()[0])
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def head(self, n: int) -> np.ndarray:
        """The first `n` tokens of the split (fewer if it is shorter)."""
        return self._stream.read(0, min(n, len(self._stream)))

    def _identity(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "split": self.split,
                "tokens": len(self._stream), "tokenizer": self.index.tokenizer}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "global_batch": self.global_batch, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        check_same_stream(state, self._identity(), "data")
        # A different global batch is allowed: the stream goes on from the same window.
        self.consumed = int(state["consumed"])


__all__ = ["TokenLoader", "check_same_stream"]
