"""GPU suite, two GPUs: the parallel parity runs on NCCL ranks against the one-process CPU
reference (losses per step and step-1 gradients, GPU_RTOL), and `titans-scale train` under
torchrun resharded on resume: the CUDA forms of the CPU/gloo files that skip on CUDA machines

    tests/parallel/test_parity_data_parallel.py   dp2 megatron, ZeRO 1/2/3
    tests/parallel/test_parity_model_parallel.py  tp2, tp2+sp, pp2 1F1B, pp2 interleaved
    tests/parallel/test_parity_cp.py              cp2 (a2a on MAG, ring on every mixer)
    tests/parallel/test_parity_torchrun.py        train under torchrun, resumed in another layout

Four GPUs: test_parity_4gpu.py. Emulated FP8 (test_parity_fp8_tp.py, test_fp8_checkpoint.py) is
a CPU check of the recipe; FP8 on GPUs runs through TE in bench/gpu_acceptance.py.
"""

from __future__ import annotations

import pytest

from tests.helpers import (ALL_MIXERS, GPU_RTOL, check_every_rank, check_parity, losses, micro_config, needs_gpus,
                           reference, spawn_gpu_layouts, start_from, torchrun_train, write_config)

pytestmark = needs_gpus(2)

MAG = ("mag", "mag")
LAYOUTS = {
    "dp2_megatron": dict(dp=2),
    "dp2_zero1": dict(dp=2, engine="deepspeed", zero=1),
    "dp2_zero2": dict(dp=2, engine="deepspeed", zero=2),
    "dp2_zero3": dict(dp=2, engine="deepspeed", zero=3),
    "tp2": dict(tp=2),
    "tp2_sp": dict(tp=2, sp=True),
    "pp2_1f1b": dict(pp=2, micro=2),
    "pp2_interleaved": dict(pp=2, vpp=2, micro=2),
}
CP_LAYOUTS = {"cp2_mag_a2a": (MAG, dict(cp=2, cp_strategy="a2a", layers=MAG)),
              "cp2_all_ring": (ALL_MIXERS, dict(cp=2, cp_strategy="ring"))}


@pytest.fixture(scope="module")
def runs():
    return spawn_gpu_layouts(2, {**LAYOUTS, **{name: layout for name, (_, layout) in CP_LAYOUTS.items()}})


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(runs, ref, layout):
    check_every_rank(runs, layout, ref, rtol=GPU_RTOL)


@pytest.mark.parametrize("layout", list(CP_LAYOUTS))
def test_cp_matches_one_process(runs, layout):
    ref = reference(CP_LAYOUTS[layout][0])
    for rank_result in runs:
        check_parity(rank_result[layout], *ref, rtol=GPU_RTOL)


def test_torchrun_tp2_resumes_as_dp2(tmp_path):
    """Run A trains 10 steps as TP=2; run B resumes A's step-5 checkpoint as DP=2 (1 row per rank:
    the same global batch) and logs A's losses for steps 6-10."""
    shards = tmp_path / "shards"
    runs = {k: tmp_path / k for k in ("a", "b")}
    configs = {k: write_config(tmp_path / f"{k}.toml", micro_config(
        shards, runs[k], model={"layers": ["swa", "mag", "mac", "lmm"]},
        train={"steps": 10, "eval_every": 10, "eval_batches": 1, "ckpt_every": 5, "keep_checkpoints": 4},
        parallel={"tp": 2})) for k in runs}
    torchrun_train(configs["a"], nproc=2)
    a = losses(runs["a"])
    assert sorted(a) == list(range(1, 11)) and a[10] < a[1], "run A should train 10 steps and learn"
    start_from(runs["a"], 5, runs["b"])
    torchrun_train(configs["b"], "parallel.tp=1", "data.batch_size=1", nproc=2)
    b = losses(runs["b"])
    assert sorted(b) == list(range(6, 11))
    for s in range(6, 11):
        assert abs(b[s] - a[s]) <= GPU_RTOL * a[s], f"DP=2 resume: step {s} loss {b[s]} vs TP=2 {a[s]}"
