"""DeepSpeed ZeRO around megatron's tensor and pipeline parallelism: 4-rank gloo runs.

TP=2 x DP=2 with ZeRO-2 and ZeRO-3, and PP=2 x DP=2 with ZeRO-1 (megatron's 1F1B schedule
driving the engine), each against the single-process losses and step-1 gradients. DeepSpeed
gets megatron's groups as its mpu: ZeRO partitions over the DP group only and the clipping
norm counts TP-replicated parameters once. Marked slow (4 processes, three engines).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import check_every_rank, spawn_layouts

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="CPU/gloo parity runs; on CUDA: tests/gpu/test_parity_4gpu.py (pytest -m gpu)")]

LAYOUTS = {
    "tp2_dp2_zero2": dict(tp=2, dp=2, engine="deepspeed", zero=2),
    "tp2_dp2_zero3": dict(tp=2, dp=2, engine="deepspeed", zero=3),
    "pp2_dp2_zero1": dict(pp=2, dp=2, micro=2, engine="deepspeed", zero=1),
}


@pytest.fixture(scope="module")
def runs():
    return spawn_layouts(4, LAYOUTS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(runs, ref, layout):
    check_every_rank(runs, layout, ref)
