"""Token shards on disk: flat uint16/uint32 `.bin` files plus a JSON index.

    out_dir/index.json          format, tokenizer fingerprint, dtype, sources, per-split files
    out_dir/train_00000.bin     raw tokens, documents separated by the tokenizer's eos
    out_dir/val_00000.bin

With layout "indexed" (`prepare --format indexed`) each split is one file, `train.bin` +
`train.idx`, a Megatron-LM indexed dataset written by megatron-core's builder (its .bin is the
same raw token array, so this index reads it like any shard; Megatron-LM reads the prefix
`out_dir/train`). Its dtype is uint16 or int32 (megatron's format has no uint32).

The dtype is uint16 when the vocabulary fits (half the disk and page cache), else uint32.
The index is written last and atomically, so a crash mid-prepare leaves no index and the
next run rebuilds; an existing index that matches the tokenizer and sources is reused.
Shards are read through `np.memmap`: a 100 GB corpus costs no RAM.
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from titans_scale.data.corpus import (DEFAULT_MAX_BYTES, DEFAULT_VAL_FRACTION, embedded_corpus,
                                      embedded_fingerprint, split_of)
from titans_scale.data.hf import is_saved_dataset, iter_texts
from titans_scale.data.indexed import index_dtype, write_indexed
from titans_scale.data.tokenizer import Tokenizer, check_fingerprint
from titans_scale.errors import DataError
from titans_scale.io.atomic import write_json_atomic

FORMAT = "titans-scale-shards-v1"
INDEX_NAME = "index.json"
SPLITS = ("train", "val")
LAYOUTS = ("shards", "indexed")
TEXT_SUFFIXES = (".txt", ".jsonl")
TABLE_SUFFIXES = (".parquet",)
DEFAULT_SHARD_TOKENS = 1 << 27  # 128 M tokens: 256 MB as uint16


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------- reading


class TokenStream:
    """The shards of one split read as one flat token array (windows may cross shard ends)."""

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self._arrays = [a for a in arrays if len(a)]
        self._starts = [0]
        for a in self._arrays:
            self._starts.append(self._starts[-1] + len(a))

    def __len__(self) -> int:
        return self._starts[-1]

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] as int64."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"read({start}, {length}) outside a stream of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        i, done = bisect.bisect_right(self._starts, start) - 1, 0
        while done < length:
            a, off = self._arrays[i], start + done - self._starts[i]
            n = min(length - done, len(a) - off)
            out[done:done + n] = a[off:off + n]
            done, i = done + n, i + 1
        return out


@dataclass
class SplitInfo:
    files: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    documents: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens)


def _shard_maps(directory: Path, dtype: str | np.dtype, info: SplitInfo) -> list[np.ndarray]:
    """The non-empty shards of a split, memory-mapped."""
    return [np.memmap(directory / f, dtype=dtype, mode="r", shape=(n,)) for f, n in zip(info.files, info.tokens) if n]


@dataclass
class ShardIndex:
    directory: Path
    tokenizer: str
    vocab_size: int
    dtype: str
    eos_id: int | None
    sources: str
    splits: dict[str, SplitInfo]
    layout: str = "shards"

    def num_tokens(self, split: str) -> int:
        return self._split(split).num_tokens

    def _split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise DataError(f"data split '{split}' not in shards at '{self.directory}'; "
                            f"use one of {', '.join(self.splits)}")
        return self.splits[split]

    def stream(self, split: str) -> TokenStream:
        info = self._split(split)
        return TokenStream(_shard_maps(self.directory, self.dtype, info))

    def doc_starts(self, split: str) -> np.ndarray:
        """Stream offsets where a document starts: 0 and every token after an eos (one scan per shard)."""
        if self.eos_id is None:
            raise DataError(f"shards at '{self.directory}' have no end-of-text token (tokenizer {self.tokenizer}), "
                            "so their document boundaries are unknown; use a tokenizer with an eos token or "
                            "data.pack = false")
        found, base = [np.zeros(1, dtype=np.int64)], 0
        for a in _shard_maps(self.directory, self.dtype, self._split(split)):
            found.append(np.flatnonzero(a == self.eos_id) + 1 + base)
            base += len(a)
        starts = np.concatenate(found)
        return starts[starts < base]

    def to_json(self) -> dict:
        return {"format": FORMAT, "tokenizer": self.tokenizer, "vocab_size": self.vocab_size,
                "dtype": self.dtype, "eos_id": self.eos_id, "sources": self.sources, "layout": self.layout,
                "splits": {k: {"files": v.files, "tokens": v.tokens, "documents": v.documents}
                           for k, v in self.splits.items()}}


def _corrupt(path: Path, why: str) -> DataError:
    return DataError(f"shard index '{path}' is corrupt ({why}); delete '{path.parent}' and prepare the data again")


def open_shards(shard_dir: str | Path, tokenizer: Tokenizer | None = None) -> ShardIndex:
    """Read and check an index (and every shard's size); refuse another tokenizer's shards."""
    d = Path(shard_dir)
    path = d / INDEX_NAME
    if not path.is_file():
        raise DataError(f"no shard index at '{path}'; prepare the data first (prepare_corpus or "
                        "`titans-scale prepare`) or fix the data directory")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"not JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise _corrupt(path, f"format is not {FORMAT}")
    try:
        splits = {k: SplitInfo(list(map(str, v["files"])), [int(n) for n in v["tokens"]], int(v["documents"]))
                  for k, v in raw["splits"].items()}
        idx = ShardIndex(d, str(raw["tokenizer"]), int(raw["vocab_size"]), str(raw["dtype"]),
                         None if raw["eos_id"] is None else int(raw["eos_id"]), str(raw["sources"]), splits,
                         str(raw.get("layout", "shards")))
        itemsize = np.dtype(idx.dtype).itemsize
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _corrupt(path, f"bad or missing field {e}") from None
    for info in splits.values():
        if len(info.files) != len(info.tokens):
            raise _corrupt(path, "files and token counts differ in length")
        for f, n in zip(info.files, info.tokens):
            if Path(f).is_absolute() or ".." in Path(f).parts:
                raise _corrupt(path, f"it names '{f}', a file outside its folder")
            p = d / f
            if not p.is_file():
                raise DataError(f"shard '{p}' listed in the index is missing; delete '{d}' and prepare the data again")
            if p.stat().st_size != n * itemsize:
                raise DataError(f"shard '{p}' is truncated or damaged ({p.stat().st_size} bytes, index says "
                                f"{n * itemsize}); delete '{d}' and prepare the data again")
    if tokenizer is not None:
        check_fingerprint(idx.tokenizer, tokenizer, f"the shards in '{d}'")
    return idx


# --------------------------------------------------------------------------- sources


def _user_files(sources: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(path, stable name) for every .txt/.jsonl/.parquet source and saved Hugging Face dataset folder,
    other folders expanded in sorted order."""
    out = []
    suffixes = TEXT_SUFFIXES + TABLE_SUFFIXES
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise DataError(f"data source '{p}' not found; pass existing .txt/.jsonl files or folders, or 'embedded'")
        if is_saved_dataset(p):
            out.append((p, p.name))
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
            if not found:
                raise DataError(f"data source folder '{p}' holds no .txt or .jsonl files (nor .parquet, nor is it a "
                                "saved Hugging Face dataset); add some or pass files")
            out.extend((f, f"{p.name}/{f.relative_to(p).as_posix()}") for f in found)
        elif p.suffix in suffixes:
            out.append((p, p.name))
        else:
            raise DataError(f"data source '{p}' is not a .txt or .jsonl file (nor .parquet, nor a saved Hugging Face "
                            "dataset folder); convert it or pass a folder of them")
    return out


def _check_text(path: Path, block: int = 1 << 20) -> None:
    """Refuse a file that is not text: any NUL byte, or invalid UTF-8 beyond one sequence per
    1,000 bytes (a stray bad byte in real text is kept, replaced; a binary file is not)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    bad, first, pos = 0, None, 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise DataError(f"{path}: NUL byte at offset {pos + nul}: this is a binary file, not text; "
                                "pass UTF-8 .txt/.jsonl files")
            rest = chunk
            while True:
                try:
                    decoder.decode(rest)
                    break
                except UnicodeDecodeError as e:         # offsets within this chunk (approximate across chunks)
                    bad, first = bad + 1, pos + e.start if first is None else first
                    decoder.reset()
                    rest = rest[e.end:]
            pos += len(chunk)
    if bad > max(8, pos // 1000):
        raise DataError(f"{path}: {bad} invalid UTF-8 sequences in {pos} bytes (the first at offset {first}): "
                        "not UTF-8 text; convert it to UTF-8")


_TXT_BLOCK_CHARS = 1 << 23  # a big .txt file is tokenized in line-aligned blocks of ~8M chars


def _txt_blocks(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        block: list[str] = []
        size = 0
        for line in f:
            block.append(line)
            size += len(line)
            if size >= _TXT_BLOCK_CHARS:
                yield "".join(block)
                block, size = [], 0
        if block:
            yield "".join(block)


def _iter_user_docs(files: list[tuple[Path, str]], text_column: str) -> Iterator[tuple[str, Iterable[str]]]:
    """(document name, its text in blocks): a .txt file is one document, a .jsonl line or a
    table row (.parquet, saved Hugging Face dataset: its `text_column`) another."""
    for path, name in files:
        if path.suffix == ".txt":
            yield name, _txt_blocks(path)
            continue
        if path.suffix != ".jsonl":
            yield from ((f"{name}:{i}", (text,)) for i, text in enumerate(iter_texts(path, text_column)))
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    obj = None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(f"{path}:{lineno}: expected a JSON object with a string field \"text\"; "
                                    "fix or remove that line")
                yield f"{name}:{lineno}", (obj["text"],)


def _sources_fingerprint(files: list[tuple[Path, str]], val_fraction: float, text_column: str) -> str:
    h = hashlib.sha256(f"{val_fraction}".encode())
    for path, name in files:
        if path.is_dir():        # a saved Hugging Face dataset: every file in it
            for f in sorted(f for f in path.rglob("*") if f.is_file()):
                st = f.stat()
                h.update(f"{name}/{f.relative_to(path).as_posix()}:{st.st_size}:{st.st_mtime_ns};".encode())
        else:
            st = path.stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    if any(path.suffix not in TEXT_SUFFIXES for path, _ in files):
        h.update(f"column={text_column}".encode())   # the column read from tables is part of what was prepared
    return f"files:{h.hexdigest()[:16]}"


# --------------------------------------------------------------------------- writing


class _SplitWriter:
    """Buffers tokens and writes fixed-size shards, so memory stays bounded by one shard."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.info = SplitInfo()
        self._buf: list[np.ndarray] = []
        self._n = 0

    def add(self, tokens: np.ndarray) -> None:
        self._buf.append(tokens.astype(self.dtype, copy=False))
        self._n += len(tokens)
        if self._n >= self.shard_tokens:
            flat = np.concatenate(self._buf)
            full = self._n // self.shard_tokens
            for i in range(full):
                self._write(flat[i * self.shard_tokens:(i + 1) * self.shard_tokens])
            rest = flat[full * self.shard_tokens:].copy()
            self._buf, self._n = [rest], len(rest)

    def close(self) -> SplitInfo:
        if self._n:
            self._write(np.concatenate(self._buf))
        self._buf, self._n = [], 0
        return self.info

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.split}_{len(self.info.files):05d}.bin"
        tokens.tofile(self.directory / name)
        self.info.files.append(name)
        self.info.tokens.append(len(tokens))


def _move_tail(directory: Path, dtype: np.dtype, src: SplitInfo, dst_split: str, n: int) -> SplitInfo:
    """Move the last `n` tokens of `src` into a new one-shard split (a corpus with too few documents)."""
    stream = TokenStream(_shard_maps(directory, dtype, src))
    keep = len(stream) - n
    tail = stream.read(keep, n).astype(dtype)
    del stream  # release the maps before truncating their files
    files, counts = [], []
    for f, c in zip(src.files, src.tokens):
        take = max(0, min(c, keep))
        keep -= take
        if take:
            os.truncate(directory / f, take * dtype.itemsize)
            files.append(f)
            counts.append(take)
        else:
            (directory / f).unlink()
    src.files, src.tokens = files, counts
    name = f"{dst_split}_00000.bin"
    tail.tofile(directory / name)
    return SplitInfo([name], [n], 1)


_INDEXED_BLOCK = 1 << 24  # tokens read at a time when a split is rewritten in the indexed layout


def _to_indexed(directory: Path, dtype: np.dtype, split: str, info: SplitInfo, eos_id: int,
                out_dtype: np.dtype) -> SplitInfo:
    """Rewrite a split's shards as one Megatron indexed dataset `split.bin/.idx` (documents end at eos)."""
    stream = TokenStream(_shard_maps(directory, dtype, info))
    n = len(stream)
    blocks = (stream.read(i, min(_INDEXED_BLOCK, n - i)) for i in range(0, n, _INDEXED_BLOCK))
    documents = write_indexed(directory / split, blocks, eos_id, out_dtype)
    del stream, blocks
    for f in info.files:
        (directory / f).unlink()
    return SplitInfo([f"{split}.bin"], [n], documents)


def _write_index(idx: ShardIndex) -> None:
    write_json_atomic(idx.directory / INDEX_NAME, idx.to_json())


def prepare_corpus(out_dir: str | Path, tokenizer: Tokenizer, sources: str | Path | Iterable[str | Path] = "embedded",
                   *, max_bytes: int = DEFAULT_MAX_BYTES, val_fraction: float = DEFAULT_VAL_FRACTION,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, overwrite: bool = False, layout: str = "shards",
                   text_column: str = "text", progress: bool = False) -> ShardIndex:
    """Tokenize `sources` into train/val shards under `out_dir`; reuse them when already there.

    sources: "embedded" (the stdlib corpus, `max_bytes` of it), or paths of .txt files (one
    document each), .jsonl files (one document per line, field "text"), .parquet files and saved
    Hugging Face dataset folders (one document per row, column `text_column`) and folders of them.
    Documents go to val by a hash of their name (~`val_fraction`); with too few documents the
    last `val_fraction` of the tokens become val. layout "indexed" writes each split as a
    Megatron indexed dataset (see the module docstring); `progress` shows a bar on stderr.
    """
    out = Path(out_dir)
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens={shard_tokens} must be positive")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    if layout not in LAYOUTS:
        raise DataError(f"layout={layout!r} is not known; use one of {', '.join(LAYOUTS)}")
    if layout == "indexed" and tokenizer.eos_id is None:
        raise DataError(f"the indexed format cuts documents at the end-of-text token, and tokenizer "
                        f"'{tokenizer.fingerprint()}' has none; use --format shards or a tokenizer with one")
    embedded = isinstance(sources, str) and sources == "embedded"
    if embedded:
        sources_fp = embedded_fingerprint(max_bytes, val_fraction)
    else:
        src_list = [sources] if isinstance(sources, (str, Path)) else list(sources)
        if not src_list:
            raise DataError("data sources: none given; pass 'embedded' or .txt/.jsonl paths")
        files = _user_files(src_list)
        sources_fp = _sources_fingerprint(files, val_fraction, text_column)

    if (out / INDEX_NAME).exists() and not overwrite:
        idx = open_shards(out)
        if idx.tokenizer != tokenizer.fingerprint():
            raise DataError(f"tokenizer mismatch: shards in '{out}' were made with '{idx.tokenizer}', not "
                            f"'{tokenizer.fingerprint()}'; use a new data directory or --overwrite "
                            "(overwrite=True from Python)")
        if idx.sources != sources_fp:
            named = "embedded" if embedded else ", ".join(map(str, src_list))
            raise DataError(f"data source '{named}': the shards in '{out}' were made from other sources "
                            f"({idx.sources}, this one is {sources_fp}); give this source its own data.shard_dir "
                            "(prepare --out), or replace those shards with --overwrite (overwrite=True from Python)")
        if idx.layout != layout:
            raise DataError(f"data in '{out}' was prepared in the {idx.layout} layout, not {layout}; "
                            "use a new data directory or --overwrite (overwrite=True from Python)")
        return idx

    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_NAME).unlink(missing_ok=True)  # no valid index until the rebuild is complete
    for split in SPLITS:
        for old in [*out.glob(f"{split}_*.bin"), out / f"{split}.bin", out / f"{split}.idx"]:
            old.unlink(missing_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _SplitWriter(out, s, dtype, shard_tokens) for s in SPLITS}

    if embedded:
        corpus = embedded_corpus(max_bytes, val_fraction)
        docs: Iterable[tuple[str, Iterable[str]]] = ((d.name, (d.text,)) for s in SPLITS for d in corpus[s])
        split_for = {d.name: s for s in SPLITS for d in corpus[s]}
    else:
        for path, _ in files:
            if path.suffix in TEXT_SUFFIXES:
                _check_text(path)
        docs = _iter_user_docs(files, text_column)
        split_for = None
    eos = np.array([tokenizer.eos_id], dtype=np.int64) if tokenizer.eos_id is not None else None
    bar = tqdm(desc=f"prepare {out}", unit="tok", unit_scale=True, disable=not progress, file=sys.stderr)
    for name, blocks in docs:
        writer = writers[split_for[name] if split_for else split_of(name, val_fraction)]
        n = 0
        for block in blocks:
            toks = tokenizer.encode_array(block)
            if not len(toks):
                continue
            if toks.min() < 0 or toks.max() >= tokenizer.vocab_size:
                raise DataError(f"tokenizer produced ids outside [0, {tokenizer.vocab_size}) for '{name}'")
            writer.add(toks)
            n += len(toks)
            bar.update(len(toks))
        if n:
            if eos is not None:
                writer.add(eos)
            writer.info.documents += 1
    bar.close()
    splits = {s: w.close() for s, w in writers.items()}

    total = sum(i.num_tokens for i in splits.values())
    if total == 0:
        raise DataError(f"data sources {'embedded' if embedded else src_list} hold no text (0 tokens); "
                        "pass files that contain text")
    if val_fraction > 0 and splits["val"].num_tokens == 0:
        splits["val"] = _move_tail(out, dtype, splits["train"], "val", max(1, math.ceil(val_fraction * total)))
    elif splits["train"].num_tokens == 0:
        # Every document hashed to val (a single short document): give train the head instead.
        for f in splits["val"].files:
            os.replace(out / f, out / f.replace("val_", "train_", 1))
        splits["train"] = SplitInfo([f.replace("val_", "train_", 1) for f in splits["val"].files],
                                    splits["val"].tokens, splits["val"].documents)
        splits["val"] = SplitInfo()
        if val_fraction > 0 and total >= 2:
            splits["val"] = _move_tail(out, dtype, splits["train"], "val", max(1, math.ceil(val_fraction * total)))

    if layout == "indexed":
        out_dtype = index_dtype(tokenizer.vocab_size)
        splits = {s: _to_indexed(out, dtype, s, info, tokenizer.eos_id, out_dtype) if info.num_tokens else info
                  for s, info in splits.items()}
        dtype = out_dtype
    idx = ShardIndex(out, tokenizer.fingerprint(), tokenizer.vocab_size, dtype.name, tokenizer.eos_id,
                     sources_fp, splits, layout)
    _write_index(idx)
    return idx


__all__ = ["prepare_corpus", "open_shards", "ShardIndex", "SplitInfo", "TokenStream", "token_dtype",
           "INDEX_NAME", "FORMAT", "DEFAULT_SHARD_TOKENS", "LAYOUTS"]
