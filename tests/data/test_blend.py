"""data.blend: weighted sources (shards and a Megatron prefix), proportions, exact resume (also after kill -9)."""

import json
import math
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests.helpers import ENV, cli, losses, micro_config, write_config
from titans_scale.config import RunConfig
from titans_scale.config_io import load_config
from titans_scale.data.blend import BlendLoader
from titans_scale.data.loader import TokenLoader
from titans_scale.data.shards import prepare_corpus
from titans_scale.data.tokenizer import ByteTokenizer
from titans_scale.errors import ConfigError, DataError
from titans_scale.train.data import RunData

BYTE = ByteTokenizer()
LETTERS, DIGITS = set(b"abcdefgh "), set(b"0123456789 ")


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Source A: letters, prepared as shards; source B: digits, prepared in the indexed layout."""
    tmp = tmp_path_factory.mktemp("blend")
    rng = np.random.default_rng(0)
    for name, alphabet, layout in (("a", "abcdefgh", "shards"), ("b", "0123456789", "indexed")):
        docs = ["".join(rng.choice(list(alphabet), size=int(rng.integers(5, 60)))) + " " for _ in range(500)]
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        prepare_corpus(tmp / name, BYTE, [tmp / f"{name}.jsonl"], layout=layout, shard_tokens=4_000)
    return tmp / "a", tmp / "b"


def _source_of(row: np.ndarray) -> int:
    chars = set(row[row < 256].tolist())
    assert chars <= LETTERS or chars <= DIGITS, "a row holds tokens of one source only"
    return 0 if chars <= LETTERS and not chars <= {32} else 1


def test_blend_draws_the_configured_proportions(two_sources):
    a, b = two_sources
    p = 0.7
    loader = BlendLoader([(p, a), (1 - p, b)], "train", seq_len=16, batch_size=8, seed=3, tokenizer=BYTE)
    own = [TokenLoader(s, "train", 16, 1, seed=3 + 7919 * k, tokenizer=BYTE) for k, s in enumerate((a, b))]
    taken = [0, 0]
    counts = np.zeros(2, dtype=int)
    for t in range(250):
        picks = loader.picks(t)
        data, _ = loader.rows()
        for row, k in zip(data, picks):
            assert _source_of(row) == k
            # each source's rows are its own window sequence, in order
            assert np.array_equal(row, own[k].read_windows(np.array([taken[k]]))[0][0])
            taken[k] += 1
        counts += np.bincount(picks, minlength=2)
    n = counts.sum()
    assert abs(counts[0] - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)), counts    # binomial, ~1e-5 false alarm
    assert loader.consumed.tolist() == counts.tolist()


def test_blend_resumes_exactly_and_splits_over_ranks(two_sources):
    a, b = two_sources
    blend = [(0.5, a), (0.5, b)]
    first = BlendLoader(blend, "train", 16, 4, seed=1, tokenizer=BYTE)
    for _ in range(7):
        first.rows(begins=True)
    state = json.loads(json.dumps(first.state_dict()))
    want = [first.rows(begins=True) for _ in range(5)]
    again = BlendLoader(blend, "train", 16, 4, seed=1, tokenizer=BYTE)
    again.load_state_dict(state)
    for d, m in want:
        d2, m2 = again.rows(begins=True)
        assert np.array_equal(d, d2) and np.array_equal(m, m2)
    # two ranks of 2 rows laid side by side are one rank of 4
    ranks = [BlendLoader(blend, "train", 16, 2, seed=1, rank=r, world_size=2, tokenizer=BYTE) for r in range(2)]
    single = BlendLoader(blend, "train", 16, 4, seed=1, tokenizer=BYTE)
    for _ in range(4):
        assert np.array_equal(np.concatenate([r.rows()[0] for r in ranks]), single.rows()[0])
    with pytest.raises(DataError, match="seed=1 but this run has seed=2.*data.blend"):
        BlendLoader(blend, "train", 16, 4, seed=2, tokenizer=BYTE).load_state_dict(state)
    with pytest.raises(DataError, match="weights="):
        BlendLoader([(0.9, a), (0.1, b)], "train", 16, 4, seed=1, tokenizer=BYTE).load_state_dict(state)


def test_blend_of_one_source_is_the_plain_loader(two_sources):
    a, _ = two_sources
    blend, plain = BlendLoader([(1.0, a)], "train", 16, 3, seed=5), TokenLoader(a, "train", 16, 3, seed=5)
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(next(blend), next(plain)))


_CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import numpy as np
    from titans_scale.data.blend import BlendLoader
    a, b, out, kill_at, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    loader = BlendLoader([(0.6, a), (0.4, b)], "train", 16, 4, seed=9)
    state_path = os.path.join(out, "state.json")
    step = 0
    if os.path.exists(state_path):
        saved = json.load(open(state_path))
        loader.load_state_dict(saved["loader"])
        step = saved["step"]
    while step < steps:
        data, begins = loader.rows(begins=True)
        np.save(os.path.join(out, f"rows_{step}.npy"), data)
        if step == kill_at:                      # dies after taking a batch, before saving its position
            os.kill(os.getpid(), signal.SIGKILL)
        step += 1
        with open(state_path + ".tmp", "w") as f:
            json.dump({"step": step, "loader": loader.state_dict()}, f)
        os.replace(state_path + ".tmp", state_path)
""")


def test_blend_resumes_after_kill_minus_nine(two_sources, tmp_path):
    a, b = two_sources
    run = [sys.executable, "-c", _CHILD, a, b, tmp_path]
    killed = subprocess.run([*map(str, run), "6", "12"], env=ENV, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 6
    done = subprocess.run([*map(str, run), "-1", "12"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    plain = BlendLoader([(0.6, a), (0.4, b)], "train", 16, 4, seed=9)
    for step in range(12):
        assert np.array_equal(np.load(tmp_path / f"rows_{step}.npy"), plain.rows()[0]), step


def _cfg(*overrides):
    return load_config(RunConfig, None, list(overrides)).validate()


def test_blend_config_is_typed_and_checked(two_sources):
    a, b = two_sources
    cfg = _cfg(f'data.blend=[[0.7, "{a}"], [0.3, "{b}"]]', "data.seq_len=16", "data.batch_size=4", "data.pack=true")
    assert cfg.data.blend == [(0.7, str(a)), (0.3, str(b))]
    x, y, cu = RunData(cfg).next_batch(0)
    assert x.shape == (4, 16) and cu[-1] == 64
    for bad, needle in ((f'data.blend=[["{a}", 0.7]]', r"data.blend\[0\]\[0\]"),
                        (f'data.blend=[[0.0, "{a}"]]', r"data.blend\[0\]: weight must be a number > 0"),
                        ('data.blend=[[1.0, " "]]', r"data.blend\[0\]: path is empty"),
                        (f'data.blend=[[1.0, "{a}"], [2.0, "{a}"]]', "data.blend: lists .* twice")):
        with pytest.raises(ConfigError, match=needle):
            _cfg(bad)


@pytest.mark.slow
def test_blend_train_resumes_after_kill_minus_nine(two_sources, tmp_path):
    a, b = two_sources
    cfg = micro_config(tmp_path / "unused", tmp_path / "ref", data={"blend": [[0.6, str(a)], [0.4, str(b)]]})
    ref = write_config(tmp_path / "ref.toml", cfg)
    cfg["train"]["run_dir"] = str(tmp_path / "killed")
    killed = write_config(tmp_path / "killed.toml", cfg)
    cli("train", "--config", ref)
    r = cli("train", "--config", killed, env={**ENV, "TITANS_TEST_KILL_AT": "save_mid:8"}, check=False)
    assert r.returncode == -signal.SIGKILL
    cli("train", "--config", killed)
    want, got = losses(tmp_path / "ref"), losses(tmp_path / "killed")
    assert all(got[s] == want[s] for s in range(9, 13)), (got, want)        # bitwise equal
