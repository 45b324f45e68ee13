"""Megatron-LM / GPT-NeoX indexed datasets (`prefix.bin` + `prefix.idx`), through megatron-core's own
reader (`IndexedDataset`) and writer (`IndexedDatasetBuilder`).

The `.bin` file is the raw token array (documents laid end to end, no header); the `.idx`
holds the dtype, every sequence's length and pointer, and the sequence index where each
document starts (`document_indices`). Megatron's reader checks its input with asserts; a bad
file is refused here first, with one line naming the file (missing, truncated, a float or
too-narrow dtype, empty).
"""

from __future__ import annotations

import logging
import struct
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from titans_scale.errors import DataError

_HEADER = b"MMIDIDX\x00\x00"
_HEAD_BYTES = 9 + 8 + 1 + 8 + 8          # header, version, dtype code, sequence count, document count


def _megatron():
    """megatron-core's indexed_dataset module. Importing megatron.core warns that fused kernels are
    absent and its readers log every file at INFO: neither is news to a data user."""
    logging.getLogger("megatron").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def index_dtype(vocab_size: int) -> np.dtype:
    """The token dtype megatron's format can store for a vocabulary (it has uint16, no uint32)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _check_files(prefix: str) -> tuple[Path, Path]:
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    for p in (idx, bin_):
        if not p.is_file():
            raise DataError(f"indexed dataset file '{p}' not found; a Megatron dataset is a prefix with both "
                            ".bin and .idx (pass the prefix, without the suffix)")
    with open(idx, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if len(head) < _HEAD_BYTES or head[:9] != _HEADER or struct.unpack("<Q", head[9:17])[0] != 1:
        raise DataError(f"'{idx}' is not a Megatron indexed dataset index (bad header or version); "
                        "write it with megatron's preprocess_data.py or `titans-scale prepare --format indexed`")
    code = head[17]
    try:
        dtype = np.dtype(_megatron().DType.dtype_from_code(code))
    except ValueError:
        raise DataError(f"'{idx}' has an unknown token dtype code {code}; the file is damaged") from None
    if dtype.kind not in "iu":
        raise DataError(f"'{idx}' stores tokens as {dtype.name}, not integers: token ids need an integer dtype; "
                        "prepare the data again")
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    if n_seq == 0 or n_doc < 2:
        raise DataError(f"indexed dataset '{prefix}' is empty (0 documents); pass one with data")
    want = _HEAD_BYTES + n_seq * (4 + 8) + n_doc * 8
    if idx.stat().st_size < want:
        raise DataError(f"'{idx}' is truncated ({idx.stat().st_size} bytes, its header needs {want}); "
                        "copy or prepare it again")
    return idx, bin_


def open_indexed(prefix: str | Path, vocab_size: int | None = None):
    """megatron-core's `IndexedDataset` at `prefix`, checked: the .bin holds exactly the tokens its .idx
    describes, at least one token, and (given `vocab_size`) a dtype that can hold every id."""
    prefix = str(prefix)
    idx, bin_ = _check_files(prefix)
    try:
        ds = _megatron().IndexedDataset(prefix, mmap=True)
    except (AssertionError, IndexError, ValueError) as e:    # megatron checks its index with asserts
        raise DataError(f"'{idx}' is inconsistent ({e or type(e).__name__}); the file is damaged") from None
    dtype = np.dtype(ds.index.dtype)
    lengths = ds.sequence_lengths.astype(np.int64)
    n_tokens = int(lengths.sum())
    size, want = bin_.stat().st_size, n_tokens * dtype.itemsize
    if size < want:
        raise DataError(f"'{bin_}' is truncated ({size} bytes; '{idx.name}' describes {n_tokens} {dtype.name} "
                        f"tokens = {want} bytes); copy or prepare it again")
    if size > want:
        raise DataError(f"'{bin_}' has {size} bytes but '{idx.name}' describes {n_tokens} {dtype.name} tokens "
                        f"({want} bytes): the .bin and .idx do not belong together (another dtype?)")
    if n_tokens == 0:
        raise DataError(f"indexed dataset '{prefix}' is empty (0 tokens); pass one with data")
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1])]) * dtype.itemsize
    if not np.array_equal(ds.index.sequence_pointers, pointers):
        raise DataError(f"'{idx}' has sequence pointers that do not tile '{bin_.name}'; the file is damaged")
    if vocab_size is not None and vocab_size - 1 > np.iinfo(dtype).max:
        raise DataError(f"'{idx}' stores tokens as {dtype.name}, which cannot hold the ids of this tokenizer "
                        f"(vocabulary {vocab_size}); the data was made with another tokenizer")
    return ds


def tokens_of(ds) -> np.ndarray:
    """Every token of an `IndexedDataset`, one flat read-only view of its memory-mapped .bin."""
    n = int(ds.sequence_lengths.astype(np.int64).sum())
    return ds.bin_reader.read(dtype=ds.index.dtype, count=n, offset=0)


def document_starts(ds) -> np.ndarray:
    """Token offsets (into `tokens_of(ds)`) where each document starts; empty documents folded away."""
    seq_starts = np.concatenate([[0], np.cumsum(ds.sequence_lengths.astype(np.int64))])
    return np.unique(seq_starts[ds.document_indices[:-1]])


def write_indexed(prefix: str | Path, blocks: Iterable[np.ndarray], eos_id: int, dtype: np.dtype) -> int:
    """Write token `blocks` (documents laid end to end, each ending with `eos_id`) as `prefix.bin/.idx`
    with megatron-core's `IndexedDatasetBuilder`, one document per eos; returns the document count.
    A document longer than a block is stored as several sequences of one document."""
    prefix = str(prefix)
    builder = _megatron().IndexedDatasetBuilder(prefix + ".bin", dtype=np.dtype(dtype).type)
    documents, open_doc = 0, False
    for block in blocks:
        prev = 0
        for end in (np.flatnonzero(block == eos_id) + 1).tolist():   # prepare time, not the training hot path
            builder.add_item(torch.from_numpy(np.ascontiguousarray(block[prev:end])))
            builder.end_document()
            prev, documents, open_doc = end, documents + 1, False
        if prev < len(block):
            builder.add_item(torch.from_numpy(np.ascontiguousarray(block[prev:])))
            open_doc = True
    if open_doc:                      # the split ends inside a document (a val tail cut from train)
        builder.end_document()
        documents += 1
    builder.finalize(prefix + ".idx")
    return documents


__all__ = ["open_indexed", "tokens_of", "document_starts", "write_indexed", "index_dtype"]
