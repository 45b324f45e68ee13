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
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.parallel.parity_helpers import ALL_MIXERS, check_parity, reference, train_layout
from titans_scale.parallel.launch_utils import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU/gloo parity runs; CUDA machines run the GPU suite")

MAG = ("mag", "mag")
LAYOUTS = {
    "cp2_mag_a2a": (MAG, dict(cp=2, cp_strategy="a2a", layers=MAG)),
    "cp2_all_ring": (ALL_MIXERS, dict(cp=2, cp_strategy="ring")),
}


def _two_rank_worker() -> dict:
    return {name: train_layout(**layout) for name, (_, layout) in LAYOUTS.items()}


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_two_rank_worker, 2, backend=None, timeout_s=900)


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


def _four_rank_worker() -> dict:
    return {name: train_layout(**layout) for name, layout in FOUR_RANK_LAYOUTS.items()}


@pytest.mark.slow
def test_cp_with_tp_sp_and_dp_matches_one_process():
    """CP=2 combined with TP=2 (with and without SP) and with DP=2: 4 ranks, same parity."""
    runs = run_distributed(_four_rank_worker, 4, backend=None, timeout_s=900)
    ref = reference(MAG)
    for rank_result in runs:
        for name in FOUR_RANK_LAYOUTS:
            assert "CP=2" in rank_result[name]["describe"]
            check_parity(rank_result[name], *ref)


CLI_CONFIG = """
[model]
d_model = 32
n_heads = 2
mem_heads = 4
layers = ["mag", "mag"]
mem_expansion = 2
chunk_size = 64
window = 64

[data]
shard_dir = "{shards}"
source = "{source}"
seq_len = 1024
batch_size = 1

[optim]
lr = 3e-3
warmup_steps = 1

[train]
steps = 2
run_dir = "{run}"
log_every = 1
eval_every = 100
eval_batches = 1
ckpt_every = 100
progress = false
tensorboard = false
"""


def _cli(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TITANS_NO_PROGRESS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}"


@pytest.mark.slow
def test_cli_trains_cp4_on_16k_sequences(tmp_path):
    """4 torchrun ranks, CP=4 (a2a) on 16,384-token sequences: 2 steps, a checkpoint and an eval,
    the losses those of the single-process trainer on the same data."""
    from titans_scale.train.metrics import read_metrics

    config, source = tmp_path / "cp.toml", tmp_path / "corpus.txt"
    # One document of 1.2 MB (byte tokens): its last 2% (the val split) still holds a 16k sequence.
    text = "".join(p.read_text() for p in sorted((Path(__file__).resolve().parents[2] / "titans_scale").rglob("*.py")))
    source.write_text((text * (1 + 1_200_000 // len(text)))[:1_200_000])
    config.write_text(CLI_CONFIG.format(shards=tmp_path / "shards", source=source, run=tmp_path / "one"))
    train = ["-m", "titans_scale.cli", "train", "--config", str(config), "data.seq_len=16384"]
    _cli([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=4", *train,
          "parallel.cp=4", f"train.run_dir={tmp_path / 'cp4'}"])
    _cli([sys.executable, *train])                      # the single-process trainer

    def losses(run: Path) -> dict[int, float]:
        return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}

    cp4, one = losses(tmp_path / "cp4"), losses(tmp_path / "one")
    assert sorted(cp4) == [1, 2], f"expected steps 1-2 logged, got {sorted(cp4)}"
    assert all(math.isfinite(v) and v > 0 for v in cp4.values()), cp4
    for step in (1, 2):
        assert abs(cp4[step] - one[step]) <= 1e-5 * one[step], \
            f"step {step}: CP=4 loss {cp4[step]} vs one process {one[step]}"
    assert (tmp_path / "cp4" / "checkpoints" / "latest").exists(), "the CP run should save its final checkpoint"
