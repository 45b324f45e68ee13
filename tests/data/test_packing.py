"""Packed rows: document starts in stream windows, cu_seqlens, the boundary targets, RunData's 3-tuple."""

import json

import numpy as np
import pytest
import torch

from titans_scale.config import RunConfig
from titans_scale.config_io import load_config
from titans_scale.data.loader import TokenLoader
from titans_scale.data.packing import cu_seqlens, window_begins
from titans_scale.data.shards import prepare_corpus
from titans_scale.data.tokenizer import ByteTokenizer
from titans_scale.errors import ConfigError
from titans_scale.train.data import IGNORE, RunData

BYTE = ByteTokenizer()
EOS = BYTE.eos_id


def _naive_begins(starts, length, doc_starts):
    """The reference: a loop over rows and documents."""
    out = np.zeros((len(starts), length), dtype=bool)
    for b, s in enumerate(starts):
        for d in doc_starts:
            if s <= d < s + length:
                out[b, d - s] = True
    return out


def test_window_begins_equals_a_loop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(50, 400))
        doc_starts = np.unique(np.concatenate([[0], rng.integers(0, n, size=rng.integers(0, 40))]))
        length = int(rng.integers(1, 60))
        starts = rng.integers(0, n - length + 1, size=int(rng.integers(1, 9)))
        assert np.array_equal(window_begins(starts, length, doc_starts), _naive_begins(starts, length, doc_starts))


def test_cu_seqlens_holds_every_row_start():
    b = torch.zeros(3, 5, dtype=torch.bool)
    b[0, 2] = b[2, 4] = True
    cu = cu_seqlens(b)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 5, 10, 14, 15]
    assert not b[:, 0].any()                        # the caller's mask is left alone


@pytest.fixture(scope="module")
def doc_shards(tmp_path_factory):
    """Documents of very different lengths (some shorter than a chunk), byte tokens, several shards."""
    tmp = tmp_path_factory.mktemp("packing")
    rng = np.random.default_rng(1)
    docs = [f"doc{i} " + "x" * int(rng.integers(0, 90)) for i in range(400)]
    src = tmp / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp / "shards"
    prepare_corpus(out, BYTE, [src], shard_tokens=3_000)
    return src, out


def _cfg(src, shards, **data):
    return load_config(RunConfig, None, [f"data.source={src}", f"data.shard_dir={shards}", "data.seq_len=64",
                                         "data.batch_size=4", "model.vocab_size=259",
                                         *(f"data.{k}={json.dumps(v)}" for k, v in data.items())]).validate()


def _check_packed(x, y, cu, y_plain, loss_across_docs=False):
    B, L = x.shape
    assert cu.dtype == torch.int32 and cu.dim() == 1
    cu = cu.tolist()
    assert cu[0] == 0 and cu[-1] == B * L and cu == sorted(set(cu))
    assert set(range(0, B * L, L)) <= set(cu)
    flat_x, flat_y, flat_plain = x.reshape(-1), y.reshape(-1), y_plain.reshape(-1)
    inner = [s for s in cu[1:-1] if s % L]
    assert inner, "some rows hold several documents"
    for s in inner:                             # a document starts right after an eos
        assert flat_x[s - 1] == EOS
    # the target is ignored exactly where it would be the next document's first token
    boundary = torch.zeros(B * L, dtype=torch.bool)
    boundary[[s - 1 for s in inner]] = True
    row_end_starts = (x.reshape(B, L)[:, -1] == EOS)    # a document starting right after the row
    boundary.view(B, L)[:, -1] |= row_end_starts
    assert torch.equal(boundary, flat_x == EOS)     # every eos ends a document inside the stream
    if loss_across_docs:
        assert torch.equal(flat_y, flat_plain)
    else:
        assert torch.equal(flat_y == IGNORE, boundary)
        assert torch.equal(flat_y[~boundary], flat_plain[~boundary])
    # each document segment holds an eos only as its last token
    for a, b in zip(cu[:-1], cu[1:]):
        seg = flat_x[a:b]
        assert not (seg[:-1] == EOS).any()


def test_run_data_packs_rows_and_ignores_boundary_targets(doc_shards):
    src, shards = doc_shards
    plain, packed, across = (RunData(_cfg(src, shards, **kw)) for kw in
                             ({}, {"pack": True}, {"pack": True, "loss_across_docs": True}))
    for step in range(5):
        x0, y0 = plain.next_batch(step)
        x, y, cu = packed.next_batch(step)
        xa, ya, cua = across.next_batch(step)
        assert torch.equal(x, x0) and torch.equal(xa, x0) and torch.equal(cu, cua)
        _check_packed(x, y, cu, y0)
        _check_packed(xa, ya, cua, y0, loss_across_docs=True)
    # val batches follow the same rule
    for (x0, y0), (x, y, cu) in zip(plain.val_loader(3), packed.val_loader(3)):
        assert torch.equal(x, x0)
        _check_packed(x, y, cu, y0)


def test_pack_false_is_the_plain_loader(doc_shards):
    src, shards = doc_shards
    data = RunData(_cfg(src, shards))
    loader = TokenLoader(shards, "train", 64, 4, seed=data.cfg.train.seed, tokenizer=BYTE)
    for step in range(3):
        got, want = data.next_batch(step), next(loader)
        assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_packed_loader_resumes_exactly(doc_shards):
    src, shards = doc_shards
    a = RunData(_cfg(src, shards, pack=True))
    for step in range(3):
        a.next_batch(step)
    state = json.loads(json.dumps(a.state_dict()))
    want = [a.next_batch(step) for step in range(3, 6)]
    b = RunData(_cfg(src, shards, pack=True))
    b.load_state_dict(state)
    for step, w in zip(range(3, 6), want):
        assert all(torch.equal(p, q) for p, q in zip(b.next_batch(step), w))


def test_recall_rows_are_single_documents(doc_shards):
    src, shards = doc_shards
    data = RunData(_cfg(src, shards, pack=True, recall_fraction=0.5, seq_len=700))
    x, y, cu = data.next_batch(0)
    L = x.shape[1]
    assert not [s for s in cu.tolist() if s > 2 * L and s % L]      # rows 2 and 3 are recall samples
    assert [s for s in cu.tolist() if s < 2 * L and s % L]          # rows 0 and 1 hold several documents


def test_doc_starts_of_shards_are_after_each_eos(doc_shards):
    _, shards = doc_shards
    loader = TokenLoader(shards, "train", 64, 4)
    stream = loader.index.stream("train")
    tokens = stream.read(0, len(stream))
    starts = loader.index.doc_starts("train")
    want = np.concatenate([[0], np.flatnonzero(tokens == EOS) + 1])
    assert np.array_equal(starts, want[want < len(tokens)])
    assert len(loader.index.splits["train"].files) > 1          # the scan crosses shard ends


def test_pack_config_errors(doc_shards):
    src, shards = doc_shards
    with pytest.raises(ConfigError, match="data.loss_across_docs: applies to packed rows only"):
        _cfg(src, shards, loss_across_docs=True)


def test_packing_is_accepted_under_model_and_context_parallelism(doc_shards):
    """TP/PP/DP skip the ignored targets (parallel/stage.py masks them) and CP keeps document
    boundaries exact (parallel/context/documents.py): packed rows are accepted."""
    src, shards = doc_shards
    cfg = _cfg(src, shards, pack=True)
    cfg.parallel.tp = 2
    assert len(RunData(cfg).next_batch(0)) == 3
    cfg.parallel.tp, cfg.parallel.cp = 1, 2
    assert len(RunData(cfg).next_batch(0)) == 3
