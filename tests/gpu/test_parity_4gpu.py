"""GPU suite, four GPUs: the combined layouts on NCCL ranks against the one-process CPU reference
(GPU_RTOL): the CUDA forms of tests/parallel/test_parity_combined.py and
test_parity_zero_model_parallel.py."""

from __future__ import annotations

import pytest

from tests.helpers import GPU_RTOL, check_every_rank, needs_gpus, spawn_gpu_layouts

pytestmark = needs_gpus(4)

LAYOUTS = {
    "tp2_pp2": dict(tp=2, pp=2, micro=2),
    "tp2_dp2": dict(tp=2, dp=2),
    "tp2_sp_pp2": dict(tp=2, pp=2, sp=True, micro=2),
    "tp2_dp2_zero2": dict(tp=2, dp=2, engine="deepspeed", zero=2),
    "tp2_dp2_zero3": dict(tp=2, dp=2, engine="deepspeed", zero=3),
    "pp2_dp2_zero1": dict(pp=2, dp=2, micro=2, engine="deepspeed", zero=1),
    "pp2_dp2": dict(pp=2, dp=2, micro=2),
    "cp2_pp2": dict(cp=2, pp=2, micro=2, cp_strategy="auto"),
}


@pytest.fixture(scope="module")
def runs():
    return spawn_gpu_layouts(4, LAYOUTS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(runs, ref, layout):
    check_every_rank(runs, layout, ref, rtol=GPU_RTOL)
