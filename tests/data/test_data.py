"""Data pipeline: tokenizers, embedded corpus, shards, the resumable loader, recall tasks."""

import json
import os
import re

import numpy as np
import pytest
import torch

from tests.helpers import bpe_tokenizer
from titans_scale.data.corpus import embedded_corpus, split_of
from titans_scale.data.loader import TokenLoader
from titans_scale.data.shards import open_shards, prepare_corpus
from titans_scale.data.synthetic import MARK, TOKEN_VALUES, mqar_sample, needle_sample, recall_batch, token_needle_batch
from titans_scale.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from titans_scale.errors import DataError, TitansError

BYTE = ByteTokenizer()


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    text = "The pass key is 12345. The grass is green. The value of key bamevi is 6281. def f(x): return x\n"
    return bpe_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", text, vocab_size=400)


class WideTokenizer(ByteTokenizer):
    """Byte tokens inside a vocabulary too large for uint16 shards."""

    vocab_size = 70_000

    def fingerprint(self):
        return "wide-test:vocab=70000"


# ------------------------------------------------------------------------ tokenizers


def test_byte_tokenizer():
    text = "héllo, wörld 🚀\n\ttabs"
    ids = BYTE.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert BYTE.decode(ids) == text
    assert BYTE.decode([BYTE.bos_id] + ids + [BYTE.eos_id, BYTE.pad_id]) == text  # specials carry no text
    assert np.array_equal(BYTE.encode_array(text), np.array(ids))
    assert len({BYTE.bos_id, BYTE.eos_id, BYTE.pad_id}) == 3 and BYTE.vocab_size == 259
    assert load_tokenizer("byte").fingerprint() == BYTE.fingerprint()


def test_hf_tokenizer(hf_path, tmp_path):
    tok = load_tokenizer(str(hf_path))
    from tokenizers import Tokenizer

    assert isinstance(tok, HFTokenizer) and tok.vocab_size == Tokenizer.from_file(str(hf_path)).get_vocab_size() > 256
    assert tok.eos_id == 0 and tok.pad_id == 1
    text = "The pass key is 98765. héllo"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode())  # it merges, unlike bytes
    # the fingerprint is stable across loads (a folder works too) and tied to the file's content
    assert load_tokenizer(hf_path.parent).fingerprint() == tok.fingerprint() != BYTE.fingerprint()
    other = tmp_path / "tokenizer.json"
    data = json.loads(hf_path.read_text())
    data["added_tokens"][1]["content"] = "<PAD>"
    other.write_text(json.dumps(data))
    assert HFTokenizer(other).fingerprint() != tok.fingerprint()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="no file .*pass 'byte' or the path of a tokenizer.json"):
        load_tokenizer(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)


# ---------------------------------------------------------------------------- corpus


def test_embedded_corpus_is_deterministic_and_bounded():
    a = embedded_corpus(max_bytes=1_000_000, val_fraction=0.05)
    b = embedded_corpus(max_bytes=1_000_000, val_fraction=0.05)
    assert a == b
    docs = a["train"] + a["val"]
    assert sum(len(d.text.encode()) for d in docs) == 1_000_000
    assert a["train"] and a["val"]
    assert not {d.name for d in a["train"]} & {d.name for d in a["val"]}
    for split, ds in a.items():
        assert all(split_of(d.name, 0.05) == split for d in ds)  # a hash of the name decides
        names = [d.name for d in ds]
        assert names == sorted(names)
    # real stdlib text, no tests or third-party code
    assert all(d.name.startswith("stdlib/") and "/test/" not in d.name and "site-packages" not in d.name
               for d in docs)
    assert any("def " in d.text for d in docs)
    # a bigger budget keeps the smaller one's files as a prefix
    bigger = embedded_corpus(max_bytes=1_500_000, val_fraction=0.05)
    files = sorted(d.name for s in bigger.values() for d in s)
    assert sorted(d.name for d in docs)[:-1] == files[: len(docs) - 1]


def test_tiny_budget_still_has_both_splits():
    c = embedded_corpus(max_bytes=20_000)
    assert c["train"] and c["val"]


# ---------------------------------------------------------------------------- shards


def _all_tokens(idx, split):
    s = idx.stream(split)
    return s.read(0, len(s))


def test_prepare_embedded_multi_shard_and_reuse(tmp_path):
    out = tmp_path / "shards"
    idx = prepare_corpus(out, BYTE, "embedded", max_bytes=300_000, val_fraction=0.05, shard_tokens=40_000)
    corpus = embedded_corpus(300_000, 0.05)
    assert idx.dtype == "uint16" and len(idx.splits["train"].files) > 2
    for split in ("train", "val"):
        expect = np.concatenate([np.append(BYTE.encode_array(d.text), BYTE.eos_id) for d in corpus[split]])
        assert np.array_equal(_all_tokens(idx, split), expect)
        assert idx.splits[split].documents == len(corpus[split])
    assert all(n == 40_000 for n in idx.splits["train"].tokens[:-1])
    # a window read across a shard boundary
    s = idx.stream("train")
    assert np.array_equal(s.read(39_990, 20), np.concatenate([_all_tokens(idx, "train")[39_990:40_010]]))

    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk["tokenizer"] == BYTE.fingerprint() and on_disk["dtype"] == "uint16"

    first = out / idx.splits["train"].files[0]
    mtime = first.stat().st_mtime_ns
    again = prepare_corpus(out, BYTE, "embedded", max_bytes=300_000, val_fraction=0.05, shard_tokens=40_000)
    assert again.to_json() == idx.to_json() and first.stat().st_mtime_ns == mtime  # reused, not rewritten
    with pytest.raises(DataError, match="made from other sources.*overwrite=True"):
        prepare_corpus(out, BYTE, "embedded", max_bytes=200_000, val_fraction=0.05)
    rebuilt = prepare_corpus(out, BYTE, "embedded", max_bytes=200_000, val_fraction=0.05, overwrite=True)
    assert rebuilt.num_tokens("train") + rebuilt.num_tokens("val") < idx.num_tokens("train") + idx.num_tokens("val")
    assert len(list(out.glob("*.bin"))) == len(rebuilt.splits["train"].files) + len(rebuilt.splits["val"].files)


def test_prepare_user_files(tmp_path, hf_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    docs = [f"document number {i}: " + "text " * (i + 1) for i in range(60)]
    (src / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[:50])) + "\n\n")
    for i, d in enumerate(docs[50:]):
        (src / "sub" / f"{i}.txt").write_text(d)
    (src / "ignored.csv").write_text("x")
    tok = load_tokenizer(hf_path)
    idx = prepare_corpus(tmp_path / "out", tok, [src], val_fraction=0.2)
    assert idx.splits["train"].documents + idx.splits["val"].documents == 60
    assert idx.splits["val"].documents > 0
    text = "".join(tok.decode(_all_tokens(idx, s)) for s in ("train", "val"))
    for d in docs:
        assert d in text
    # ids come back exactly, eos between documents
    train = _all_tokens(idx, "train")
    assert (train == tok.eos_id).sum() == idx.splits["train"].documents
    with pytest.raises(DataError, match="tokenizer mismatch"):
        open_shards(tmp_path / "out", BYTE)
    with pytest.raises(DataError, match="tokenizer mismatch.*new data directory or --overwrite"):
        prepare_corpus(tmp_path / "out", BYTE, [src], val_fraction=0.2)


def test_single_document_gets_a_val_tail(tmp_path, monkeypatch):
    import titans_scale.data.shards as shards

    monkeypatch.setattr(shards, "_TXT_BLOCK_CHARS", 1000)  # a big file is read in blocks: same tokens
    f = tmp_path / "book.txt"
    text = "".join(f"line {i} of the only document\n" for i in range(500))
    f.write_text(text)
    idx = prepare_corpus(tmp_path / "out", BYTE, f, val_fraction=0.1)
    train, val = _all_tokens(idx, "train"), _all_tokens(idx, "val")
    assert len(val) == -(-(len(text) + 1) // 10)
    assert np.array_equal(np.concatenate([train, val]), np.append(BYTE.encode_array(text), BYTE.eos_id))
    assert idx.splits["train"].documents == 1


def test_wide_vocab_uses_uint32(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("abc " * 100)
    idx = prepare_corpus(tmp_path / "out", WideTokenizer(), f)
    assert idx.dtype == "uint32"
    assert os.path.getsize(tmp_path / "out" / idx.splits["train"].files[0]) == 4 * idx.splits["train"].tokens[0]


def test_prepare_errors(tmp_path):
    with pytest.raises(DataError, match=r"data source '.*missing.txt' not found"):
        prepare_corpus(tmp_path / "o1", BYTE, [tmp_path / "missing.txt"])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match="not a .txt or .jsonl file"):
        prepare_corpus(tmp_path / "o2", BYTE, [tmp_path / "x.csv"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"hold no text \(0 tokens\)"):
        prepare_corpus(tmp_path / "o3", BYTE, [tmp_path / "empty.txt"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object with a string field \"text\""):
        prepare_corpus(tmp_path / "o4", BYTE, [tmp_path / "bad.jsonl"])
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="holds no .txt or .jsonl"):
        prepare_corpus(tmp_path / "o5", BYTE, [tmp_path / "d"])
    with pytest.raises(DataError, match="no shard index"):
        open_shards(tmp_path / "nothing")


def test_prepare_refuses_binary_input_and_keeps_text_with_a_stray_byte(tmp_path):
    elf = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 40             # a binary renamed .txt
    (tmp_path / "prog.txt").write_bytes(elf)
    with pytest.raises(DataError, match=r"prog.txt: NUL byte at offset 7: this is a binary file"):
        prepare_corpus(tmp_path / "o1", BYTE, [tmp_path / "prog.txt"])
    latin1 = "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50   # not UTF-8, no NUL
    (tmp_path / "latin1.txt").write_bytes(latin1)
    with pytest.raises(DataError, match=r"latin1.txt: 200 invalid UTF-8 sequences .* first at offset 3"):
        prepare_corpus(tmp_path / "o2", BYTE, [tmp_path / "latin1.txt"])
    text = ("def f(x):\n    return x\n" * 200).encode() + b"\xff" + b"# end\n"   # one stray byte: kept
    (tmp_path / "code.txt").write_bytes(text)
    assert prepare_corpus(tmp_path / "o3", BYTE, [tmp_path / "code.txt"]).num_tokens("train") > 0


def test_corrupt_index_and_truncated_shard(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("some text " * 200)
    out = tmp_path / "out"
    idx = prepare_corpus(out, BYTE, f)
    shard = out / idx.splits["train"].files[0]
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 2)
    for call in (lambda: open_shards(out), lambda: prepare_corpus(out, BYTE, f)):
        with pytest.raises(DataError, match="truncated or damaged.*prepare the data again") as e:
            call()
        assert "\n" not in str(e.value) and isinstance(e.value, TitansError)
    (out / "index.json").write_text('{"format": "titans-scale-shards-v1", "splits": ')
    with pytest.raises(DataError, match="corrupt"):
        open_shards(out)
    (out / "index.json").write_text('{"format": "titans-scale-shards-v1"}')
    with pytest.raises(DataError, match="corrupt .*missing field"):
        open_shards(out)
    prepare_corpus(out, BYTE, f, overwrite=True)  # the fix the message names works
    assert open_shards(out, BYTE).num_tokens("train") > 0


# ---------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader")
    # ~33k tokens: a few epochs pass in the tests below; several shards, so windows cross them
    prepare_corpus(out, BYTE, "embedded", max_bytes=60_000, val_fraction=0.05, shard_tokens=7_000)
    return out


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_batches_are_windows_of_the_stream(small_shards):
    loader = TokenLoader(small_shards, "train", seq_len=64, batch_size=3, seed=5)
    stream = loader.index.stream("train")
    for _ in range(5):
        first = loader.consumed
        starts = loader.window_starts(first, 3)
        x, y = next(loader)
        assert x.shape == y.shape == (3, 64) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for b, s in enumerate(starts):
            assert np.array_equal(np.concatenate([x[b].numpy(), y[b, -1:].numpy()]), stream.read(int(s), 65))
    # one epoch visits every window once: a permutation of offset + i * seq_len
    n = loader.windows_per_epoch
    starts = loader.window_starts(0, n)
    offset = int(starts.min())
    assert sorted(starts) == [offset + i * 64 for i in range(n)]
    assert offset + n * 64 + 1 <= len(stream)
    # different epochs: another order (and usually another offset)
    assert not np.array_equal(loader.window_starts(n, n) - loader.window_starts(n, n).min(), starts - offset)


def test_loader_resume_is_exact(small_shards):
    a = TokenLoader(small_shards, "train", seq_len=128, batch_size=4, seed=11)
    spe = a.windows_per_epoch // 4
    _take(a, spe - 2)  # the next batches cross the epoch boundary
    state = a.state_dict()
    expect = _take(a, 6)
    assert a.epoch >= 1
    b = TokenLoader(small_shards, "train", seq_len=128, batch_size=4, seed=11)
    b.load_state_dict(json.loads(json.dumps(state)))  # the state survives JSON (checkpoint metadata)
    got = _take(b, 6)
    for (x1, y1), (x2, y2) in zip(expect, got):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # a fresh loader without the state starts elsewhere, another seed gives another stream
    assert not torch.equal(next(TokenLoader(small_shards, "train", 128, 4, seed=11))[0], expect[0][0])
    assert not torch.equal(next(TokenLoader(small_shards, "train", 128, 4, seed=12))[0],
                           next(TokenLoader(small_shards, "train", 128, 4, seed=11))[0])


def test_loader_data_parallel_ranks(small_shards):
    single = TokenLoader(small_shards, "train", seq_len=32, batch_size=6, seed=3)
    ranks = [TokenLoader(small_shards, "train", seq_len=32, batch_size=2, seed=3, rank=r, world_size=3)
             for r in range(3)]
    for _ in range(4):
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    # disjoint windows across ranks within an epoch
    starts = [set(r.window_starts(r.consumed + r.rank * 2, 2).tolist()) for r in ranks]
    assert not (starts[0] & starts[1]) and not (starts[1] & starts[2])
    # resume on another world size with the same global batch
    resumed = TokenLoader(small_shards, "train", seq_len=32, batch_size=6, seed=3)
    resumed.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(resumed)[0], next(single)[0])


def test_loader_errors(small_shards, hf_path):
    with pytest.raises(DataError, match="fewer than seq_len \\+ 1.*lower seq_len"):
        TokenLoader(small_shards, "val", seq_len=10**7, batch_size=1)
    with pytest.raises(DataError, match="rank=2 must be in"):
        TokenLoader(small_shards, "train", 8, 1, rank=2, world_size=2)
    with pytest.raises(DataError, match="split 'test' not in shards"):
        TokenLoader(small_shards, "test", 8, 1)
    with pytest.raises(DataError, match="tokenizer mismatch"):
        TokenLoader(small_shards, "train", 8, 1, tokenizer=load_tokenizer(hf_path))
    a = TokenLoader(small_shards, "train", 8, 1, seed=1)
    with pytest.raises(DataError, match="seed=1 but this run has seed=2"):
        TokenLoader(small_shards, "train", 8, 1, seed=2).load_state_dict(a.state_dict())
    with pytest.raises(DataError, match="seq_len=8 but this run has seq_len=16"):
        TokenLoader(small_shards, "train", 16, 1, seed=1).load_state_dict(a.state_dict())


# ------------------------------------------------------------------------- synthetic

NEEDLE_RE = {
    "passkey": re.compile(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\."),
    "number": re.compile(r"The special magic number for (\w+) is: (\d+)\."),
    "word": re.compile(r"The special magic word for (\w+) is: (\w+)\."),
}
QUESTION_RE = {
    "passkey": re.compile(r"What is the pass key\? The pass key is$"),
    "number": re.compile(r"What is the special magic number for (\w+)\? The special magic number for \1 is:$"),
    "word": re.compile(r"What is the special magic word for (\w+)\? The special magic word for \1 is:$"),
}


@pytest.mark.parametrize("kind", ["passkey", "number", "word"])
@pytest.mark.parametrize("haystack", ["noise", "corpus"])
def test_needle_answer_parses_back(kind, haystack):
    s = needle_sample(BYTE, 3000, seed=7, needle=kind, haystack=haystack, depth=0.4)
    toks = s.tokens()
    assert len(toks) == s.length == 3000
    prompt = BYTE.decode(toks[: s.prompt_len])
    found = NEEDLE_RE[kind].findall(prompt)
    assert len(found) == 1, "exactly one needle in the haystack"
    value = found[0][0] if kind == "passkey" else found[0][1]
    if kind == "passkey":
        assert found[0][0] == found[0][1]
    q = QUESTION_RE[kind].search(prompt)
    assert q is not None, "the prompt ends with the question"
    if kind != "passkey":
        assert q.group(1) == found[0][0], "the question asks for the needle's key"
    assert s.answers == (value,)
    assert BYTE.decode(toks[s.answer_positions]).strip() == value
    assert np.array_equal(toks[s.answer_positions], s.answer_tokens)
    assert s.answer_positions[-1] == len(toks) - 1  # the stream ends with the answer
    # the needle sits at the asked depth of the haystack
    start, end = s.needle_spans[0]
    assert NEEDLE_RE[kind].search(BYTE.decode(toks[start:end]))


def test_needle_depth_and_determinism():
    intro_len = len(BYTE.encode("There is important information hidden inside a lot of irrelevant text. "
                                "Find it and memorize it.\n"))
    top = needle_sample(BYTE, 2000, seed=1, depth=0.0)
    assert top.needle_spans[0][0] == intro_len
    bottom = needle_sample(BYTE, 2000, seed=1, depth=1.0)
    q_len = len(BYTE.encode("\nWhat is the pass key? The pass key is"))
    assert bottom.needle_spans[0][1] == 2000 - len(bottom.answer_tokens) - q_len
    mid = needle_sample(BYTE, 2000, seed=1, depth=0.5)
    free = 2000 - intro_len - (mid.needle_spans[0][1] - mid.needle_spans[0][0]) - q_len - len(mid.answer_tokens)
    assert mid.needle_spans[0][0] == intro_len + round(0.5 * free)

    a, b = needle_sample(BYTE, 2000, seed=9), needle_sample(BYTE, 2000, seed=9)
    assert np.array_equal(a.tokens(), b.tokens()) and a.answers == b.answers
    c = needle_sample(BYTE, 2000, seed=10)
    assert c.answers != a.answers and not np.array_equal(a.tokens(), c.tokens())
    with pytest.raises(DataError, match="length=50 is too short; this sample needs at least"):
        needle_sample(BYTE, 50, seed=0)


@pytest.mark.parametrize("haystack", ["noise", "corpus"])
def test_mqar_answers_parse_back(haystack):
    s = mqar_sample(BYTE, 4000, seed=3, num_pairs=10, num_queries=6, haystack=haystack)
    toks = s.tokens()
    assert len(toks) == 4000
    text = BYTE.decode(toks)
    context, questions = text.split("\nAnswer:")
    pairs = dict(re.findall(r"The value of key (\w+) is (\d+)\.", context))
    assert len(pairs) == 10
    queries = re.findall(r"The value of key (\w+) is (\d+)", questions)
    assert len(queries) == 6 and len({k for k, _ in queries}) == 6
    assert all(pairs[k] == v for k, v in queries)
    assert s.answers == tuple(v for _, v in queries)
    assert BYTE.decode(toks[s.answer_positions]).split() == [v for _, v in queries]
    assert s.prompt_len > len(context)  # nothing to answer before the queries
    assert len(s.needle_spans) == 10 and all(a < b for a, b in s.needle_spans)


def test_streaming_in_pieces_equals_one_piece(hf_path):
    for tok in (BYTE, load_tokenizer(hf_path)):
        for s in (needle_sample(tok, 5000, seed=2, haystack="corpus"), mqar_sample(tok, 5000, seed=2, num_pairs=5)):
            whole = s.tokens()
            assert len(whole) == 5000
            assert np.array_equal(whole[s.answer_positions], s.answer_tokens)
            for chunk in (1, 7, 999, 4096, 5000, 10**6):
                pieces = list(s.stream(chunk))
                assert all(len(p) == chunk for p in pieces[:-1]) and 0 < len(pieces[-1]) <= chunk
                assert np.array_equal(np.concatenate(pieces), whole)
            assert np.array_equal(np.concatenate(list(s.stream(333, stop=s.prompt_len))), whole[: s.prompt_len])
        # HF tokens: answers are still exact and parse back
        s = needle_sample(tok, 3000, seed=4, needle="number")
        assert tok.decode(s.tokens()[s.answer_positions]).strip() == s.answers[0]


def test_million_token_sample_streams():
    s = needle_sample(BYTE, 1_000_000, seed=5, depth=0.5)
    n, biggest, last = 0, 0, None
    start, end = s.needle_spans[0]
    needle = None
    for chunk in s.stream(1 << 16):
        if n <= start < n + len(chunk):
            needle = chunk[start - n: end - n]  # the needle lies inside one chunk here
        n += len(chunk)
        biggest = max(biggest, len(chunk))
        last = chunk
    assert n == 1_000_000 and biggest == 1 << 16
    assert np.array_equal(last[-len(s.answer_tokens):], s.answer_tokens)
    v = s.answers[0]
    assert BYTE.decode(needle).strip() == f"The pass key is {v}. Remember it. {v} is the pass key."
    assert abs(start - 500_000) < 100


def test_recall_batch():
    x, y, m = recall_batch(BYTE, 4, 512, seed=1, task="mqar", num_pairs=4)
    assert x.shape == y.shape == m.shape == (4, 512) and m.dtype == torch.bool
    assert torch.equal(x[:, 1:], y[:, :-1])
    for b in range(4):
        answers = BYTE.decode(y[b][m[b]].tolist())
        queries = re.findall(r"The value of key (\w+) is", BYTE.decode(x[b].tolist()).split("Answer:")[1])
        pairs = dict(re.findall(r"The value of key (\w+) is (\d+)\.", BYTE.decode(x[b].tolist()).split("Answer:")[0]))
        assert answers.split() == [pairs[k] for k in queries]
    x2, y2, m2 = recall_batch(BYTE, 4, 512, seed=1, task="mqar", num_pairs=4)
    assert torch.equal(x, x2) and torch.equal(m, m2)
    x3, _, _ = recall_batch(BYTE, 4, 512, seed=1, step=1, task="mqar", num_pairs=4)
    assert not torch.equal(x, x3)
    x4, y4, m4 = recall_batch(BYTE, 2, 300, seed=0, task="needle")
    assert m4[:, -1].all() and m4.sum(1).tolist() == [6, 6]  # " " + 5 digits, ending the row
    with pytest.raises(DataError, match="task='x' is not known"):
        recall_batch(BYTE, 1, 100, seed=0, task="x")


@pytest.mark.parametrize("distractors", [0, 16])
def test_token_needle_presence_and_distractors(distractors):
    x, y, m = token_needle_batch(8, 640, 3, step=2, depth=0.3, distractors=distractors)
    assert m.sum(1).tolist() == [1] * 8 and m[:, -1].all()
    for row in range(8):
        marks = (x[row] == MARK).nonzero().flatten().tolist()
        assert marks == [191, 639] and y[row, 639] == x[row, 192]          # the needle's value is the answer
        values = (x[row] < TOKEN_VALUES).nonzero().flatten().tolist()
        assert len(values) == 1 + distractors and 192 in values           # without distractors: presence suffices
        assert all(x[row, p - 1] != MARK for p in values if p != 192)       # no distractor follows a MARK
    x0, _, _ = token_needle_batch(8, 640, 3, step=2, depth=0.3)
    assert distractors or torch.equal(x, x0)
    with pytest.raises(DataError, match="distractors=637"):
        token_needle_batch(1, 640, 0, distractors=637)
