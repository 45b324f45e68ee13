"""Hugging Face datasets on disk (save_to_disk arrow folders, parquet) as prepare sources, and a run trained on one."""

import json

import numpy as np
import pytest

from tests.helpers import cli, losses, micro_config, write_config
from titans_scale.cli import main
from titans_scale.data.shards import prepare_corpus
from titans_scale.data.tokenizer import ByteTokenizer
from titans_scale.errors import DataError

datasets = pytest.importorskip("datasets", reason="the optional extra titans-scale[datasets] is not installed")

BYTE = ByteTokenizer()


def _texts(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [f"row {i} says " + " ".join(["hello", "world", "titans"][int(k)] for k in rng.integers(0, 3, size=8))
            for i in range(n)]


def _docs(idx):
    """The prepared documents' texts, sorted (the train/val split hashes each row's name)."""
    out = []
    for s in ("train", "val"):
        tokens = idx.stream(s).read(0, idx.num_tokens(s))
        out += [BYTE.decode(d) for d in np.split(tokens, np.flatnonzero(tokens == BYTE.eos_id) + 1) if len(d)]
    return sorted(out)


def test_saved_dataset_parquet_and_dataset_dict(tmp_path):
    texts = _texts()
    rows = {"text": texts[:-1] + [None], "content": [t.upper() for t in texts], "n": list(range(len(texts)))}
    ds = datasets.Dataset.from_dict(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    idx = prepare_corpus(tmp_path / "o1", BYTE, [tmp_path / "saved"])
    assert sum(s.documents for s in idx.splits.values()) == len(texts) - 1      # the null row is skipped
    assert _docs(idx) == sorted(texts[:-1])
    # the same rows from a parquet file, or a folder of them, are the same documents
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    same = prepare_corpus(tmp_path / "o2", BYTE, [tmp_path / "pq" / "part-0.parquet"])
    assert sum(s.documents for s in same.splits.values()) == len(texts) - 1
    assert _docs(same) == sorted(texts[:-1])
    assert prepare_corpus(tmp_path / "o3", BYTE, [tmp_path / "pq"]).num_tokens("train") > 0
    # another column; a DatasetDict gives all its splits
    upper = prepare_corpus(tmp_path / "o4", BYTE, [tmp_path / "saved"], text_column="content")
    assert _docs(upper) == sorted(t.upper() for t in texts)
    datasets.DatasetDict({"train": ds.select(range(200)), "test": ds.select(range(200, 299))}).save_to_disk(
        str(tmp_path / "dict"))
    both = prepare_corpus(tmp_path / "o5", BYTE, [tmp_path / "dict"])
    assert sum(s.documents for s in both.splits.values()) == 299


def test_bad_hf_sources_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TITANS_NO_PROGRESS", "1")
    ds = datasets.Dataset.from_dict({"body": ["a text"] * 20, "n": list(range(20))})
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"saved: no column 'text' \(columns: body, n\); pass --text-column"):
        prepare_corpus(tmp_path / "o1", BYTE, [tmp_path / "saved"])
    capsys.readouterr()                             # save_to_disk's own progress bar
    assert main(["prepare", "--source", str(tmp_path / "saved"), "--out", str(tmp_path / "o0")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("titans-scale prepare: error: ") and "no column 'text'" in err[0]
    with pytest.raises(DataError, match="column 'n' holds int values, not text"):
        prepare_corpus(tmp_path / "o2", BYTE, [tmp_path / "saved"], text_column="n")
    ds.to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(DataError, match=r"t.parquet: no column 'text'"):
        prepare_corpus(tmp_path / "o3", BYTE, [tmp_path / "t.parquet"])
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nothing here")
    with pytest.raises(DataError, match="bad.parquet: not a readable parquet file"):
        prepare_corpus(tmp_path / "o4", BYTE, [tmp_path / "bad.parquet"])
    datasets.Dataset.from_dict({"text": [""] * 5}).save_to_disk(str(tmp_path / "blank"))
    with pytest.raises(DataError, match=r"hold no text \(0 tokens\)"):
        prepare_corpus(tmp_path / "o5", BYTE, [tmp_path / "blank"])


def test_a_run_trains_on_a_saved_dataset_through_prepare(tmp_path):
    datasets.Dataset.from_dict({"text": _texts(400)}).save_to_disk(str(tmp_path / "hf"))
    shards = tmp_path / "shards"
    out = cli("prepare", "--source", tmp_path / "hf", "--out", shards).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["documents"] == 400 and summary["tokens"] > 0 and summary["bytes"] == 2 * summary["tokens"]
    cfg = micro_config(shards, tmp_path / "run", data={"source": str(tmp_path / "hf")},
                       train={"steps": 3, "eval_every": 3, "ckpt_every": 3})
    cli("train", "--config", write_config(tmp_path / "run.toml", cfg))
    ls = losses(tmp_path / "run")
    assert sorted(ls) == [1, 2, 3] and all(np.isfinite(v) for v in ls.values())
