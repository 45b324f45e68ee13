"""Megatron-LM indexed datasets: both directions token-identical with megatron-core, bad files refused."""

import json
import struct

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from titans_scale.cli import main
from titans_scale.data.loader import TokenLoader
from titans_scale.data.shards import open_shards, prepare_corpus
from titans_scale.data.sources import IndexedSource, open_source
from titans_scale.data.tokenizer import ByteTokenizer
from titans_scale.errors import DataError, TitansError

BYTE = ByteTokenizer()


def _docs_file(tmp_path, n=300, seed=0):
    rng = np.random.default_rng(seed)
    docs = [f"document {i}: " + "abc " * int(rng.integers(0, 30)) for i in range(n)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return src, docs


def _all(stream):
    return stream.read(0, len(stream))


def test_prepared_here_loads_in_megatron(tmp_path, capsys):
    src, docs = _docs_file(tmp_path)
    out = tmp_path / "out"
    assert main(["prepare", "--source", str(src), "--out", str(out), "--format", "indexed"]) == 0
    summary = json.loads(capsys.readouterr().out)
    idx = open_shards(out, BYTE)
    assert idx.layout == "indexed" and summary["format"] == "indexed"
    assert summary["documents"] == len(docs) == sum(s.documents for s in idx.splits.values())
    assert summary["tokens"] == idx.num_tokens("train") + idx.num_tokens("val")
    assert summary["bytes"] == 2 * summary["tokens"]                  # uint16 tokens
    shard_out = prepare_corpus(tmp_path / "plain", BYTE, [src])        # the same corpus as shards
    for split in ("train", "val"):
        ds = IndexedDataset(str(out / split))                         # megatron's own reader
        ours = _all(idx.stream(split))
        assert np.array_equal(np.concatenate([ds[i] for i in range(len(ds))]), ours)
        assert np.array_equal(ours, _all(shard_out.stream(split)))
        # one megatron document per eos-terminated document, starting where ours do
        seq_starts = np.concatenate([[0], np.cumsum(ds.sequence_lengths)])
        assert np.array_equal(seq_starts[ds.document_indices[:-1]], idx.doc_starts(split))
        assert len(ds.document_indices) - 1 == idx.splits[split].documents
    # the prefix itself is a source too, through megatron's reader, and the folder trains packed
    whole = IndexedSource(str(out / "train"), BYTE.vocab_size, val_fraction=0.0)
    assert np.array_equal(_all(whole.stream("train")), _all(idx.stream("train")))
    loader = TokenLoader(out, "train", 32, 2, tokenizer=BYTE)
    data, begins = loader.rows(begins=True)
    assert data.shape == (2, 33) and begins[:, :-1][data[:, :-1] == BYTE.eos_id].sum() == 0
    # prepared again: reused; as the other layout: refused with the fix
    assert main(["prepare", "--source", str(src), "--out", str(out), "--format", "indexed"]) == 0
    with pytest.raises(DataError, match="indexed layout, not shards.*--overwrite"):
        prepare_corpus(out, BYTE, [src])


def _megatron_file(prefix, dtype=np.int32, docs=None):
    """Documents (lists of sequences) written by megatron-core's builder."""
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for doc in docs:
        for seq in doc:
            b.add_item(torch.tensor(seq))
        b.end_document()
    b.finalize(str(prefix) + ".idx")


def test_megatron_file_loads_here(tmp_path):
    rng = np.random.default_rng(3)
    docs = [[list(rng.integers(0, 257, size=int(rng.integers(1, 40)))) + ([BYTE.eos_id] if k == n - 1 else [])
             for k in range(n)] for n in rng.integers(1, 4, size=120)]
    prefix = tmp_path / "corpus_text_document"
    _megatron_file(prefix, np.int32, docs)
    flat = np.array([t for doc in docs for seq in doc for t in seq])
    doc_lens = [sum(len(s) for s in doc) for doc in docs]
    want_starts = np.concatenate([[0], np.cumsum(doc_lens)[:-1]])
    for spec in (prefix, str(prefix) + ".bin", str(prefix) + ".idx"):
        src = open_source(spec, BYTE)
        assert isinstance(src, IndexedSource)
        train, val = _all(src.stream("train")), _all(src.stream("val"))
        assert np.array_equal(np.concatenate([train, val]), flat)        # token-identical
        n_val = int(np.ceil(0.02 * len(docs)))
        assert len(val) == sum(doc_lens[-n_val:])                        # the last documents are val
        assert np.array_equal(src.doc_starts("train"), want_starts[:-n_val])
        assert np.array_equal(src.doc_starts("val") + len(train), want_starts[-n_val:])
    # it trains: windows of its stream, packed at its documents
    loader = TokenLoader(prefix, "train", 16, 3, seed=1, tokenizer=BYTE)
    data, begins = loader.rows(begins=True)
    for row, start, marks in zip(data, loader.window_starts(0, 3), begins):
        assert np.array_equal(row, flat[start:start + 17])
        assert np.array_equal(np.flatnonzero(marks), [s - start for s in want_starts if start <= s < start + 17])


def _one_line(call, *needles):
    with pytest.raises(DataError) as e:
        call()
    assert isinstance(e.value, TitansError) and "\n" not in str(e.value)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_bad_indexed_sources_are_refused(tmp_path):
    good = tmp_path / "good"
    _megatron_file(good, np.uint16, [[[1, 2, 3, BYTE.eos_id]], [[4, 5, BYTE.eos_id]]])
    open_source(good, BYTE)

    (tmp_path / "noidx.bin").write_bytes((good.with_suffix(".bin")).read_bytes())
    _one_line(lambda: open_source(tmp_path / "noidx", BYTE), "noidx.idx", "not found")

    (tmp_path / "nobin.idx").write_bytes((good.with_suffix(".idx")).read_bytes())
    _one_line(lambda: open_source(tmp_path / "nobin", BYTE), "nobin.bin", "not found")

    trunc = tmp_path / "trunc"
    _megatron_file(trunc, np.uint16, [[[1, 2, 3, BYTE.eos_id]], [[4, 5, BYTE.eos_id]]])
    with open(str(trunc) + ".bin", "r+b") as f:
        f.truncate(10)
    _one_line(lambda: open_source(trunc, BYTE), "trunc.bin", "truncated")

    wide = tmp_path / "wide"                        # int32 tokens behind a uint16 index: too many bytes
    _megatron_file(wide, np.uint16, [[[1, 2, 3, BYTE.eos_id]]])
    np.array([1, 2, 3, BYTE.eos_id], dtype=np.int32).tofile(str(wide) + ".bin")
    _one_line(lambda: open_source(wide, BYTE), "wide.bin", "do not belong together")

    floats = tmp_path / "floats"
    _megatron_file(floats, np.float32, [[[1.0, 2.0]]])
    _one_line(lambda: open_source(floats, BYTE), "floats.idx", "float32", "integer dtype")

    narrow = tmp_path / "narrow"                    # uint8 cannot hold the byte tokenizer's eos (257)
    _megatron_file(narrow, np.uint8, [[[1, 2, 3]]])
    _one_line(lambda: open_source(narrow, BYTE), "narrow.idx", "uint8", "cannot hold")

    alien = tmp_path / "alien"                      # ids of a bigger vocabulary
    _megatron_file(alien, np.int32, [[[1, 2, 5000]]])
    _one_line(lambda: open_source(alien, BYTE), "alien.bin", "token id 5000", "data.tokenizer")

    empty = tmp_path / "empty"
    _megatron_file(empty, np.uint16, [])
    _one_line(lambda: open_source(empty, BYTE), "empty", "is empty")

    _one_line(lambda: open_source(tmp_path, BYTE), "folder of Megatron indexed datasets", "pass one prefix")

    junk = tmp_path / "junk"
    (tmp_path / "junk.idx").write_bytes(b"not an index at all, no")
    (tmp_path / "junk.bin").write_bytes(b"")
    _one_line(lambda: open_source(junk, BYTE), "junk.idx", "bad header")

    short = tmp_path / "short"
    _megatron_file(short, np.uint16, [[[1, 2, 3, BYTE.eos_id]], [[4, BYTE.eos_id]]])
    raw = (tmp_path / "short.idx").read_bytes()
    (tmp_path / "short.idx").write_bytes(raw[:-8])
    assert struct.unpack("<Q", raw[18:26])[0] == 2
    _one_line(lambda: open_source(short, BYTE), "short.idx", "truncated")


def test_indexed_layout_of_a_wide_vocabulary_is_int32(tmp_path):
    class Wide(ByteTokenizer):
        vocab_size = 70_000

        def fingerprint(self):
            return "wide-test:vocab=70000"

    src, _ = _docs_file(tmp_path, n=50)
    idx = prepare_corpus(tmp_path / "out", Wide(), [src], layout="indexed")
    assert idx.dtype == "int32"
    assert np.dtype(IndexedDataset(str(tmp_path / "out" / "train")).index.dtype) == np.int32
    shards = prepare_corpus(tmp_path / "s", Wide(), [src])
    assert np.array_equal(_all(idx.stream("train")), _all(shards.stream("train")))
