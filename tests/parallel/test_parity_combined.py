"""Combined layouts on 4 ranks against one process: TP=2 x PP=2 and TP=2 x DP=2 (megatron
engine), TP=2+SP x PP=2 (sequence-sharded activations between pipeline stages), and pipelines
whose stages shard their gradients: PP=2 x DP=2, and CP=2 inside PP=2 (also interleaved). The
tied embedding lives on the first stage and as the head's copy on the last: the DP x CP
reduce-scatter must shard both copies alike before megatron's embedding all-reduce adds them
(until both were marked shared_embedding, the first stage's gradient was 50% off there).

Same check as the 2-rank parity tests: losses (1e-5 relative per step) and step-1 gradients of
a tiny TitansLM with every mixer. Four processes on a 2-core CI machine make this the slowest
parity spawn (about a minute).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import check_every_rank, spawn_layouts

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU/gloo parity runs; on CUDA: tests/gpu/test_parity_4gpu.py (pytest -m gpu)")

LAYOUTS = {
    "tp2_pp2": dict(tp=2, pp=2, micro=2),
    "tp2_dp2": dict(tp=2, dp=2),
    "tp2_sp_pp2": dict(tp=2, pp=2, sp=True, micro=2),
    "pp2_dp2": dict(pp=2, dp=2, micro=2),
    "cp2_pp2": dict(cp=2, pp=2, micro=2, cp_strategy="auto"),
    "cp2_pp2_vpp2": dict(cp=2, pp=2, vpp=2, micro=2, cp_strategy="auto"),
}


@pytest.fixture(scope="module")
def runs():
    return spawn_layouts(4, LAYOUTS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(runs, ref, layout):
    check_every_rank(runs, layout, ref)
