"""Where a loader's tokens come from: data prepared here (a folder with index.json, in the shards
or the indexed layout) or a Megatron-LM / GPT-NeoX indexed dataset made elsewhere (a prefix).

Both give, per split, the token stream (`stream`) and where its documents start (`doc_starts`,
for packing).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from titans_scale.data.corpus import DEFAULT_VAL_FRACTION
from titans_scale.data.indexed import document_starts, open_indexed, tokens_of
from titans_scale.data.shards import INDEX_NAME, ShardIndex, TokenStream, open_shards
from titans_scale.data.tokenizer import Tokenizer
from titans_scale.errors import DataError

_ID_CHECK_TOKENS = 1 << 20  # ids checked against the vocabulary when a dataset records no tokenizer


class IndexedSource:
    """A Megatron indexed dataset made elsewhere (`prefix.bin` + `prefix.idx`), read through
    megatron-core's `IndexedDataset`. Its last `val_fraction` of documents (at least one when
    it has two) are the val split, a contiguous tail as Megatron's own `--split` makes it. It
    records no tokenizer: the dtype's range and the first ids are checked against the vocabulary."""

    def __init__(self, prefix: str, vocab_size: int | None = None,
                 val_fraction: float = DEFAULT_VAL_FRACTION) -> None:
        self.directory, self.sources, self.tokenizer = Path(prefix), prefix, None
        self._ds = open_indexed(prefix, vocab_size)
        self._tokens = tokens_of(self._ds)
        starts = document_starts(self._ds)
        n_val = math.ceil(val_fraction * len(starts)) if len(starts) >= 2 else 0
        cut = int(starts[len(starts) - n_val]) if n_val else len(self._tokens)
        self._splits = {"train": (0, cut, starts[:len(starts) - n_val]),
                        "val": (cut, len(self._tokens), starts[len(starts) - n_val:] - cut)}
        if vocab_size is not None:
            head = self._tokens[:_ID_CHECK_TOKENS].astype(np.int64)
            bad = head[(head < 0) | (head >= vocab_size)]
            if len(bad):
                raise DataError(f"'{prefix}.bin' holds token id {int(bad[0])} "
                                f"outside this tokenizer's vocabulary [0, {vocab_size}); it was made with another "
                                "tokenizer: set data.tokenizer to that one")

    def _split(self, split: str) -> tuple[int, int, np.ndarray]:
        if split not in self._splits:
            raise DataError(f"data split '{split}' not in '{self.sources}'; use one of {', '.join(self._splits)}")
        return self._splits[split]

    def num_tokens(self, split: str) -> int:
        lo, hi, _ = self._split(split)
        return hi - lo

    def stream(self, split: str) -> TokenStream:
        lo, hi, _ = self._split(split)
        return TokenStream([self._tokens[lo:hi]])

    def doc_starts(self, split: str) -> np.ndarray:
        return self._split(split)[2]


Source = ShardIndex | IndexedSource


def _prefix(path: Path) -> str:
    return str(path)[:-4] if path.suffix in (".bin", ".idx") else str(path)


def open_source(path: str | Path, tokenizer: Tokenizer | None = None) -> Source:
    """Prepared data at `path` (checked against the tokenizer's fingerprint), or a Megatron dataset
    prefix (`path.bin`/`path.idx`, or either file's name)."""
    p = Path(path)
    prefix = _prefix(p)
    idx_files = sorted(p.glob("*.idx")) if p.is_dir() and not (p / INDEX_NAME).is_file() else []
    if idx_files:
        raise DataError(f"'{p}' is a folder of Megatron indexed datasets; pass one prefix, e.g. "
                        f"'{idx_files[0].with_suffix('')}' (several: list each in data.blend)")
    if (p / INDEX_NAME).is_file() or not (Path(prefix + ".idx").exists() or Path(prefix + ".bin").exists()):
        return open_shards(p, tokenizer)           # its own errors: no index, corrupt, tokenizer mismatch
    return IndexedSource(prefix, tokenizer.vocab_size if tokenizer is not None else None)


__all__ = ["IndexedSource", "Source", "open_source"]
