"""A weighted blend of several sources, deterministic and resumable (`data.blend`).

Each source is its own window sequence (a `TokenLoader` over its split, seeded with the run's
seed + 7919 * its position, so a blend of one source gives the plain loader's rows). Global
batch t draws, for each of its world_size * B rows, a source i.i.d. with the normalized
weights from a generator seeded by (seed, t); the rows of source k take its next windows in
row order. The position is (batches taken, windows taken per source): `state_dict` holds it,
so a resume gives exactly the rows an uninterrupted run would, on any world size that keeps
the global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from titans_scale.data.loader import TokenLoader, check_same_stream
from titans_scale.data.tokenizer import Tokenizer
from titans_scale.errors import DataError

_SOURCE_SEED = 7919
_PICK_SALT = 0xB1E4D


class BlendLoader:
    def __init__(self, blend: Sequence[tuple[float, str | Path]], split: str, seq_len: int, batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, tokenizer: Tokenizer | None = None) -> None:
        if not blend:
            raise DataError("data.blend is empty; give [[weight, path], ...] or leave it out")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        weights = np.array([float(w) for w, _ in blend])
        if not (np.isfinite(weights).all() and (weights > 0).all()):
            raise DataError(f"data.blend weights must be finite and > 0, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.loaders = [TokenLoader(path, split, seq_len, 1, seed=seed + _SOURCE_SEED * k, tokenizer=tokenizer)
                        for k, (_, path) in enumerate(blend)]
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batches = 0                                   # global batches taken
        self.consumed = np.zeros(len(self.loaders), dtype=np.int64)   # windows taken per source

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def picks(self, batch: int) -> np.ndarray:
        """The source of each row of global batch `batch` (length world_size * B)."""
        rng = np.random.default_rng([self.seed % (1 << 64), _PICK_SALT, batch])
        return rng.choice(len(self.loaders), size=self.global_batch, p=self.weights)

    def rows(self, begins: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """This rank's next batch: [B, L + 1] tokens and (begins=True) where documents start."""
        pick = self.picks(self.batches)
        onehot = pick[:, None] == np.arange(len(self.loaders))
        earlier = np.cumsum(onehot, axis=0) - onehot       # rows of the same source before each row
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        pick, earlier = pick[mine], earlier[mine]
        data = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        marks = np.zeros(data.shape, dtype=bool) if begins else None
        for k, loader in enumerate(self.loaders):          # a loop over sources, not rows or documents
            sel = pick == k
            if sel.any():
                d, b = loader.read_windows(self.consumed[k] + earlier[sel, k], begins)
                data[sel] = d
                if marks is not None:
                    marks[sel] = b
        self.consumed += onehot.sum(axis=0)
        self.batches += 1
        return data, marks

    def __iter__(self) -> "BlendLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(self.rows()[0])
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def head(self, n: int) -> np.ndarray:
        """About `n` tokens, each source's head in proportion to its weight."""
        return np.concatenate([lo.head(max(1, round(w * n))) for w, lo in zip(self.weights, self.loaders)])

    def _identity(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "split": self.split,
                "weights": self.weights.tolist(), "sources": [lo._identity() for lo in self.loaders]}

    def state_dict(self) -> dict:
        return {"batches": self.batches, "consumed": self.consumed.tolist(), "global_batch": self.global_batch,
                **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        check_same_stream(state, self._identity(), "data.blend")
        self.batches = int(state["batches"])
        self.consumed = np.array(state["consumed"], dtype=np.int64)


__all__ = ["BlendLoader"]
