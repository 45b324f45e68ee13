"""Pipelines whose stages shard their gradients: megatron's 1F1B with DP=2, and with context
parallelism (CP=2, strategy auto) inside the stages; 4-rank gloo runs against the single-process
losses and step-1 gradients. The tied embedding lives on the first stage and as the head's copy
on the last: the DP x CP reduce-scatter must shard both copies alike before megatron's
embedding all-reduce adds them (until both were marked shared_embedding, the first stage's
gradient was 50% off in both layouts)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import check_every_rank, spawn_layouts

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo parity runs")

LAYOUTS = {
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
