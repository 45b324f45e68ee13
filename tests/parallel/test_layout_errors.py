"""Layouts that cannot work are refused before any process group starts, in one line that names
the field and the fix (parallel/layout.py); the CLI prints that line, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from titans_scale.config import RunConfig
from titans_scale.model import ModelConfig
from titans_scale.parallel.layout import padded_vocab_size, plan_layout
from titans_scale.parallel.launch_utils import find_free_port
from titans_scale.parallel.state import ParallelConfigError


def _cfg(**parallel) -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig(d_model=48, n_heads=4, mem_heads=6, layers=["swa", "mag", "lmm", "swa"], mlp_hidden=96,
                            chunk_size=8, segment_len=16)
    cfg.data.seq_len, cfg.data.batch_size = 64, 4
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


REFUSED = [
    # (parallel fields, world size, words the one line must contain)
    (dict(tp=3), 3, ["parallel.tp=3", "model.n_heads=4", "tp in {1, 2, 4}"]),
    (dict(tp=4), 4, ["parallel.tp=4", "memory heads", "tp in {1, 2, 3, 6}"]),
    (dict(pp=5), 5, ["parallel.pp*vpp=5", "4 layers", "lower parallel.pp"]),
    (dict(pp=2, vpp=4, microbatches=2), 2, ["parallel.pp*vpp=8", "4 layers"]),
    (dict(tp=2, pp=2), 6, ["world size 6", "tp*pp*cp*dp", "multiple of 4"]),
    (dict(tp=2), 1, ["world size 1", "--nproc_per_node"]),
    (dict(sequence_parallel=True), 2, ["sequence_parallel", "parallel.tp >= 2"]),
    (dict(engine="deepspeed", zero_stage=3, pp=2), 2, ["zero_stage=3", "parallel.pp > 1", "zero_stage=1"]),
    (dict(engine="deepspeed", zero_stage=2, pp=2), 2, ["zero_stage=2", "zero_stage=1"]),
    (dict(engine="deepspeed", pp=2, vpp=2, microbatches=2, zero_stage=1), 2, ["vpp", "engine='megatron'"]),
    (dict(vpp=2), 2, ["parallel.vpp=2", "parallel.pp >= 2"]),
    (dict(microbatches=3), 2, ["data.batch_size=4", "parallel.microbatches=3"]),
    (dict(cp=2, engine="deepspeed"), 2, ["parallel.cp=2", "engine='megatron'"]),
    (dict(cp=4, cp_strategy="a2a"), 4, ["parallel.cp=4", "cp_strategy='a2a'", "mixer 'mag'", "use 'ring'"]),
    (dict(cp=16), 16, ["parallel.cp=16", "sequence length 64", "smaller context-parallel size"]),
    (dict(tp=0), 2, ["parallel.tp=0", ">= 1"]),
]


@pytest.mark.parametrize("parallel, world, words", REFUSED, ids=[str(r[0]) for r in REFUSED])
def test_refused_layout_names_the_fix(parallel, world, words):
    with pytest.raises(ParallelConfigError) as err:
        plan_layout(_cfg(**parallel), world)
    msg = str(err.value)
    assert "\n" not in msg, "one line"
    for w in words:
        assert w in msg, f"{w!r} missing from: {msg}"


def test_sequence_parallel_needs_divisible_sequence():
    cfg = _cfg(tp=2, sequence_parallel=True)
    cfg.data.seq_len = 63
    with pytest.raises(ParallelConfigError, match="data.seq_len=63"):
        plan_layout(cfg, 2)


def test_accepted_layouts():
    lay = plan_layout(_cfg(tp=2, pp=3, microbatches=2), 12)
    assert (lay.tp, lay.pp, lay.dp, lay.micro_batch_size) == (2, 3, 2, 2)
    lay = plan_layout(_cfg(cp=2), 4)
    assert (lay.cp, lay.dp) == (2, 2) and "CP=2" in lay.describe()
    lay = plan_layout(_cfg(engine="deepspeed", zero_stage=3), 4)
    assert (lay.dp, lay.zero_stage) == (4, 3)
    # The padded vocabulary is the same under every power-of-two TP size (checkpoints reshard).
    assert {padded_vocab_size(259, tp) for tp in (1, 2, 4, 8)} == {384}


def test_cli_refuses_before_any_process_group(tmp_path):
    """WORLD_SIZE=3 with only this one process: joining a process group would block waiting for
    ranks 1 and 2, so a prompt one-line error proves the layout was checked first."""
    env = {**os.environ, "WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(find_free_port()), "TITANS_NO_PROGRESS": "1"}
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\nd_model = 64\nn_heads = 4\n[train]\nrun_dir = "{tmp_path / "run"}"\n')
    r = subprocess.run([sys.executable, "-m", "titans_scale.cli", "train", "--config", str(config), "parallel.tp=3"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("titans-scale train: error:")]
    assert len(lines) == 1 and "parallel.tp=3 does not divide model.n_heads=4" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- pipeline stage balancing


def test_partition_balances_stages_with_embedding_and_head():
    from itertools import combinations

    from titans_scale.parallel.pipeline import partition_layers

    assert partition_layers([1, 1, 1, 1], 2) == [[0, 1], [2, 3]]
    # A heavy output head pushes layers off the last stage, a heavy embedding off the first.
    assert partition_layers([1, 1, 1, 1], 2, last_extra=2) == [[0, 1, 2], [3]]
    assert partition_layers([1, 1, 1, 1], 2, first_extra=2) == [[0], [1, 2, 3]]
    # Optimal against brute force over every split point set.
    g = __import__("random").Random(0)
    for _ in range(20):
        costs = [g.uniform(0.5, 3) for _ in range(7)]
        head, stages = g.uniform(0, 4), g.randint(2, 4)
        got = partition_layers(costs, stages, last_extra=head)
        cost = lambda parts: max(sum(costs[i] for i in p) + (head if k == len(parts) - 1 else 0)  # noqa: E731
                                 for k, p in enumerate(parts))
        best = min(cost([list(range(a, b)) for a, b in zip((0, *cuts), (*cuts, 7))])
                   for cuts in combinations(range(1, 7), stages - 1))
        assert [i for p in got for i in p] == list(range(7)) and all(got)
        assert abs(cost(got) - best) < 1e-9


def test_interleaved_chunks_follow_megatron_order():
    from titans_scale.parallel.pipeline import chunk_layer_ids

    m = _cfg().model     # 4 layers
    assert chunk_layer_ids(m, 64, pp=2, vpp=2, pp_rank=0) == [[0], [2]]
    assert chunk_layer_ids(m, 64, pp=2, vpp=2, pp_rank=1) == [[1], [3]]
    assert [i for r in range(2) for c in chunk_layer_ids(m, 64, 2, 1, r) for i in c] == [0, 1, 2, 3]
