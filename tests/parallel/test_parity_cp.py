"""Context parallelism through the distributed trainer (ParallelRuntime) against one process.

Fast: one spawn of 2 ranks trains CP=2 (TP=1, PP=1) twice: a MAG model with the all-to-all
strategy, and the model with every mixer (MAC, MAG, MAL, LMM, SWA, SEG, full attention) under
the ring. Each rank feeds the runtime whole sequences and it keeps its shard; the losses must
match the single-process run (1e-5 relative per step) and so must the step-1 gradients after
megatron's DDP reduced them over DP x CP.

Slow: `titans-scale train` under torchrun with parallel.cp=4 on 16k-token sequences.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tests.helpers import (ALL_MIXERS, ROOT, SHORT_TRAIN, check_parity, losses, micro_config, reference,
                           run_command, spawn_layouts, torchrun, write_config)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU/gloo parity runs; on CUDA: tests/gpu/test_parity_gpu.py (pytest -m gpu)")

MAG = ("mag", "mag")
LAYOUTS = {
    "cp2_mag_a2a": (MAG, dict(cp=2, cp_strategy="a2a", layers=MAG)),
    "cp2_all_ring": (ALL_MIXERS, dict(cp=2, cp_strategy="ring")),
}


@pytest.fixture(scope="module")
def runs():
    layouts = {name: layout for name, (_, layout) in LAYOUTS.items()}
    return spawn_layouts(2, layouts)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cp_training_matches_one_process(runs, layout):
    ref = reference(LAYOUTS[layout][0])
    for rank_result in runs:
        assert "CP=2" in rank_result[layout]["describe"]
        check_parity(rank_result[layout], *ref)


FOUR_RANK_LAYOUTS = {
    "tp2_cp2_ring": dict(tp=2, cp=2, cp_strategy="ring", layers=MAG),
    "tp2_sp_cp2_ring": dict(tp=2, sp=True, cp=2, cp_strategy="ring", layers=MAG),
    "dp2_cp2_a2a": dict(dp=2, cp=2, cp_strategy="a2a", layers=MAG),
}


@pytest.mark.slow
def test_cp_with_tp_sp_and_dp_matches_one_process():
    """CP=2 combined with TP=2 (with and without SP) and with DP=2: 4 ranks, same parity."""
    runs = spawn_layouts(4, FOUR_RANK_LAYOUTS)
    ref = reference(MAG)
    for rank_result in runs:
        for name in FOUR_RANK_LAYOUTS:
            assert "CP=2" in rank_result[name]["describe"]
            check_parity(rank_result[name], *ref)


@pytest.mark.slow
def test_cli_trains_cp4_on_16k_sequences(tmp_path):
    """4 torchrun ranks, CP=4 (a2a) on 16,384-token sequences: 2 steps, a checkpoint and an eval,
    the losses those of the single-process trainer on the same data."""
    config, source = tmp_path / "cp.toml", tmp_path / "corpus.txt"
    # One document of 1.2 MB (byte tokens): its last 2% (the val split) still holds a 16k sequence.
    text = "".join(p.read_text() for p in sorted((ROOT / "titans_scale").rglob("*.py")))
    source.write_text((text * (1 + 1_200_000 // len(text)))[:1_200_000])
    write_config(config, micro_config(
        tmp_path / "shards", tmp_path / "one",
        model={"mem_heads": 4, "layers": ["mag", "mag"], "chunk_size": 64, "window": 64, "segment_len": None,
               "n_persistent": None},
        data={"source": str(source), "seq_len": 1024, "batch_size": 1, "max_bytes": None},
        optim={"warmup_steps": 1}, train={**SHORT_TRAIN, "steps": 2, "ckpt_every": 100}))
    train = ["-m", "titans_scale.cli", "train", "--config", str(config), "data.seq_len=16384"]
    torchrun(4, *train, "parallel.cp=4", f"train.run_dir={tmp_path / 'cp4'}", timeout=1800)
    run_command([sys.executable, *train], timeout=1800)  # the single-process trainer
    cp4, one = losses(tmp_path / "cp4"), losses(tmp_path / "one")
    assert sorted(cp4) == [1, 2], f"expected steps 1-2 logged, got {sorted(cp4)}"
    assert all(math.isfinite(v) and v > 0 for v in cp4.values()), cp4
    for step in (1, 2):
        assert abs(cp4[step] - one[step]) <= 1e-5 * one[step], \
            f"step {step}: CP=4 loss {cp4[step]} vs one process {one[step]}"
    assert (tmp_path / "cp4" / "checkpoints" / "latest").exists(), "the CP run should save its final checkpoint"
