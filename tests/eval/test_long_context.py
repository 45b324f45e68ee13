"""Long-context evaluation: chance levels, the recall mixture's loss, streamed sweeps in bounded
memory, and a short version of the recipe's proof that the memory learns recall beyond every
attention window while the same model with memory off stays at chance."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from titans_scale.cli import main as cli_main
from titans_scale.config import load_run_config
from titans_scale.data.tokenizer import ByteTokenizer
from titans_scale.errors import ConfigError
from titans_scale.eval.baselines import attention_reach, beyond_attention, chance_accuracy
from titans_scale.eval.sweep import EvalSweepSpec, memory_weight_norm, run_sweep, state_bytes
from titans_scale.model import TitansLM
from titans_scale.model.config import ModelConfig
from titans_scale.train.data import IGNORE, RunData
from titans_scale.train.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "recall"
# The recipe, shrunk to train in about a minute per model on 2 cores: a narrower model on
# shorter rows of needles only (no corpus rows), with a larger inner step (max_lr 0.1 learns
# faster; the recipe's 0.03 is what keeps the memory stable over 32k+ tokens). When recall
# starts varies with the seed and with fp32 rounding (a change of the op's summation order
# moved seed 2 from 100% to 29% at 500 steps). At 800 steps train.seed 1-4 scored 88%, 85%,
# 92%, 90% at 384 tokens (16 samples x 3 depths), so the test asserts >= 70%.
SHORT = ["model.d_model=32", "model.n_heads=2", "model.max_lr=0.1", "data.seq_len=192", "data.batch_size=8",
         "data.recall_fraction=1.0", "data.max_bytes=300000", "train.seed=2", "train.steps=800",
         "train.log_every=50",
         "train.eval_every=800", "train.eval_batches=1", "train.ckpt_every=800", "train.progress=false",
         "train.tensorboard=false"]


def recipe(name: str, tmp: Path, *extra: str):
    return load_run_config(str(RECIPE / f"{name}.toml"),
                           SHORT + [f"train.run_dir={tmp / name}", f"data.shard_dir={tmp / 'shards'}", *extra])


def train_pair(tmp: Path, names: tuple[str, str]) -> Path:
    threads = torch.get_num_threads()
    for name in names:
        Trainer(recipe(name, tmp), resume=False).run()
    torch.set_num_threads(threads)           # the recipe pins one thread
    return tmp


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The short recipe with memory (LMM) and without (sliding window), equal steps, fixed seed."""
    return train_pair(tmp_path_factory.mktemp("recall"), ("lmm", "swa"))


@pytest.fixture(scope="module")
def trained_mac(tmp_path_factory):
    """The same for MAC (the slowest to learn) and its memory-off twin, segment attention."""
    return train_pair(tmp_path_factory.mktemp("recall_mac"), ("mac", "seg"))


def cli_eval(run: Path, *args: str, capsys) -> dict:
    assert cli_main(["eval", "--run-dir", str(run), *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_chance_levels():
    assert chance_accuracy("passkey", 2) == pytest.approx(1 / 90)        # 10..99, uniform
    assert chance_accuracy("number", 5) == pytest.approx(1 / 90_000)
    assert chance_accuracy("mqar", 1) == pytest.approx(1 / 9)
    assert chance_accuracy("word", 5) == pytest.approx(1 / 70 ** 3)        # 3 x (14 consonants * 5 vowels)
    with pytest.raises(ConfigError, match="needle='x'"):
        chance_accuracy("x", 2)


def test_attention_reach():
    cfg = ModelConfig(d_model=32, n_heads=2, layers=["swa", "swa"], window=32, segment_len=32, chunk_size=16)
    assert attention_reach(cfg) == 62 and beyond_attention(cfg) == 64          # 2 x (window - 1); 2 x window
    cfg.layers = ["seg", "mac", "lmm"]
    assert attention_reach(cfg) == 31 + 31 + 3 and beyond_attention(cfg) == 65
    cfg.layers = ["attn", "lmm"]
    assert attention_reach(cfg) == float("inf")


def test_recall_mixture_weights_answers_up(trained):
    cfg = recipe("lmm", trained, "data.recall_fraction=0.75")        # the recipe's own mixture
    data = RunData(cfg)
    inputs, targets = data.next_batch(step=3)
    rows = data.recall.rows
    assert rows == 6 and inputs.shape == (8, 192)
    corpus, needles = targets[:-rows], targets[-rows:]
    share = (corpus != IGNORE).float().mean().item()                 # corpus_loss_fraction = 0.05
    assert 0.02 < share < 0.09
    again = data.next_batch(step=3)[1][:-rows]                       # other corpus text, same kept positions
    assert torch.equal(again == IGNORE, corpus == IGNORE)
    tok = ByteTokenizer()
    for x, y in zip(inputs[-rows:], needles):
        kept = (y != IGNORE).nonzero().flatten()
        assert kept.tolist() == list(range(189, 192))              # " " + 2 digits, ending the row
        text = tok.decode(x.tolist())
        key = text.split("The pass key is ")[1][:2]                # the needle, decoded independently
        assert tok.decode(y[kept].tolist()) == " " + key


@pytest.mark.parametrize("memory,twin", [("lmm", "swa"), ("mac", "seg")])
def test_memory_learns_recall_beyond_attention(memory, twin, request, capsys):
    """At 384 tokens with the needle 130-230 tokens back (attention sees <= 64): the memory model
    recalls the pass key, its memory-off twin trained for the same steps is at chance."""
    trained = request.getfixturevalue("trained" if memory == "lmm" else "trained_mac")
    args = ("--suite", "niah", "--lengths", "384", "--depths", "0,0.25,0.5", "--samples", "16")
    on, off = (cli_eval(trained / n, *args, capsys=capsys) for n in (memory, twin))
    report = {n: json.loads(Path(r["niah_json"]).read_text()) for n, r in ((memory, on), (twin, off))}
    assert all(c["beyond_attention"] for r in report.values() for c in r["cells"])
    assert min(c["min_distance"] for c in report[twin]["cells"]) > 2 * 64
    chance = on["niah_chance"]
    assert chance == pytest.approx(1 / 90)
    print(f"memory on {on['niah_beyond_acc']:.2f}, off {off['niah_beyond_acc']:.2f}, chance {chance:.3f}")
    assert on["niah_beyond_acc"] >= 0.7
    assert off["niah_beyond_acc"] <= chance + 0.07
    assert on["niah_beyond_acc"] - off["niah_beyond_acc"] >= 0.6
    assert Path(on["niah_png"]).stat().st_size > 1000                  # the heat map was drawn


def test_long_eval_is_streamed_in_bounded_memory(trained):
    """A trained model read 32k-token haystacks in 1k pieces: the state it carries is the same
    size at 1k and 32k tokens, no call sees more than a piece, and accuracy is reported per depth."""
    from titans_scale.train.load import load_trained

    _, model = load_trained(str(trained / "lmm"))
    tok = ByteTokenizer()
    short = run_sweep(model, tok, EvalSweepSpec("niah", [1024], depths=[0.5], samples=1, digits=2, piece=1024))
    long = run_sweep(model, tok, EvalSweepSpec("niah", [32768], depths=[0.0, 1.0], samples=1, digits=2, piece=1024))
    assert long.max_piece == 1024 and long.state_bytes == short.state_bytes > 0
    assert [c.depth for c in long.cells] == [0.0, 1.0]
    far = long.cell(32768, 0.0)
    assert far.min_distance > 32000 and far.samples == 1 and 0.0 <= far.accuracy <= 1.0
    assert long.to_json()["cells"][0]["beyond_attention"]


def test_state_bytes_counts_nested_tensors():
    cfg = ModelConfig(d_model=32, n_heads=2, layers=["swa", "mag", "mac"], window=8, segment_len=8, chunk_size=8)
    model = TitansLM(cfg).eval()
    with torch.no_grad():
        _, s1 = model(torch.zeros(1, 40, dtype=torch.long))
        _, s2 = model(torch.zeros(1, 40, dtype=torch.long), s1)
    assert state_bytes(s1) == state_bytes(s2) > 0


def test_memory_weight_norm_finds_the_largest_sequence_weight():
    cfg = ModelConfig(d_model=32, n_heads=2, layers=["swa", "mag", "mac"], window=8, segment_len=8, chunk_size=8)
    model = TitansLM(cfg).eval()
    with torch.no_grad():
        _, state = model(torch.zeros(2, 40, dtype=torch.long))
    mems = [state.layers[1].memory.memory, state.layers[2].memory.memory]
    want = max(w[b].norm().item() for m in mems for w in m.weights for b in range(2))
    assert memory_weight_norm(state) == pytest.approx(want) and want > 0
    mems[1].weights[0][1, 0, 0, 0] = 1e6                    # one sequence's weight of one layer
    assert memory_weight_norm(state) == pytest.approx(1e6, rel=1e-3)
    assert memory_weight_norm(ModelConfig()) == 0.0 == memory_weight_norm([None, 3])


def test_sweep_cells_and_errors(tmp_path):
    cfg = ModelConfig(d_model=32, n_heads=2, layers=["swa", "lmm"], window=16, segment_len=16, chunk_size=8)
    model = TitansLM(cfg)
    r = run_sweep(model, ByteTokenizer(), EvalSweepSpec("recall", [300, 400], samples=2, digits=1, piece=128))
    assert [(c.length, c.depth) for c in r.cells] == [(300, None), (400, None)]
    assert [c.answers for c in r.cells] == [2 * 3, 2 * 4]              # length // 96 pairs, all asked
    assert all(c.samples == 2 and c.tokens == 2 * c.answers for c in r.cells)   # " " + 1 digit each
    assert r.max_piece == 128 and r.chance == pytest.approx(1 / 9)
    with pytest.raises(ConfigError, match="--depths"):
        EvalSweepSpec("niah", [512], depths=[1.5]).validate()
    with pytest.raises(ConfigError, match="--needle"):
        EvalSweepSpec("niah", [512], needle="pin").validate()


def test_cli_eval_bad_input_is_one_line(trained, capsys):
    assert cli_main(["eval", "--run-dir", str(trained / "lmm"), "--suite", "niah", "--lengths", "5x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lengths" in err[0]


def test_generator_answers_match_eval_positions():
    """The eval scores exactly the needle's value: answer tokens decode back to it."""
    spec = EvalSweepSpec("niah", [600], depths=[0.3], digits=3)
    s = spec.sample(ByteTokenizer(), 600, 0.3, 0)
    toks = s.tokens()
    assert ByteTokenizer().decode(toks[s.answer_positions]).strip() == s.answers[0]
    assert np.array_equal(toks[s.answer_positions], s.answer_tokens)
