"""Data parallelism against one process, both engines: real 2-rank gloo runs.

One spawn of 2 ranks trains DP=2 with megatron-core's DDP + distributed optimizer, then with
DeepSpeed ZeRO stages 1, 2 and 3 (megatron's mpu passed in). Each reproduces the single-process
losses of a tiny TitansLM with every mixer (1e-5 relative per step) and its step-1 gradients
(megatron: the reduce-scattered shards all-gathered; ZeRO: safe_get_full_grad just before the
update). Gradient clipping is active, so the global grad norm must be right too. The same ranks
then save a ZeRO-2 checkpoint (DeepSpeed's format), resume it with the next step's loss
unchanged, and see a megatron-engine run refuse it in one line.

DeepSpeed JIT-builds its shm_comm op at its first initialize (~35 s, once): it is cached under
TORCH_EXTENSIONS_DIR (build/torch_extensions by default), so later runs skip it.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import batches, check_every_rank, make_cfg, spawn_layouts

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU/gloo parity runs; on CUDA: tests/gpu/test_parity_gpu.py (pytest -m gpu)")

LAYOUTS = {
    "dp2_megatron": dict(dp=2),
    "dp2_zero1": dict(dp=2, engine="deepspeed", zero=1),
    "dp2_zero2": dict(dp=2, engine="deepspeed", zero=2),
    "dp2_zero3": dict(dp=2, engine="deepspeed", zero=3),
}


def _deepspeed_checkpoint(root: str) -> dict:
    """ZeRO-2: save after 2 steps, resume in a fresh engine: step 3's loss both ways."""
    from titans_scale.errors import CheckpointError
    from titans_scale.parallel.checkpoint import ShardedCheckpointer
    from titans_scale.parallel.runtime import ParallelRuntime

    data, out = batches(), {}
    for name in ("saved", "resumed"):
        rt = ParallelRuntime(make_cfg(dp=2, engine="deepspeed", zero=2))
        ckpt = ShardedCheckpointer(root, rt.engine, rt.layout)
        if name == "saved":
            for x, y in data[:2]:
                rt.train_step(rt.dp_slice(x), rt.dp_slice(y), 1e-2)
            ckpt.save(2, {"step": 2})
        else:
            out["state"] = ckpt.load(ckpt.latest())
        out[name] = rt.train_step(rt.dp_slice(data[2][0]), rt.dp_slice(data[2][1]), 1e-2).loss
    rt = ParallelRuntime(make_cfg(dp=2))
    try:
        ShardedCheckpointer(root, rt.engine, rt.layout).load(ckpt.latest())
    except CheckpointError as e:
        out["refusal"] = str(e)
    return out


def _after_layouts(root: str) -> dict:
    return {"checkpoint": _deepspeed_checkpoint(root)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return spawn_layouts(2, LAYOUTS, _after_layouts, str(tmp_path_factory.mktemp("zero_ckpt")))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(runs, ref, layout):
    check_every_rank(runs, layout, ref)


def test_zero_checkpoint_resumes_and_other_engine_is_refused(runs):
    for rank_result in runs:
        c = rank_result["checkpoint"]
        assert c["state"] == {"step": 2}
        assert abs(c["resumed"] - c["saved"]) <= 1e-6 * abs(c["saved"])
        assert "written by the deepspeed engine" in c["refusal"] and "\n" not in c["refusal"]
