"""GPU suite, one GPU: the parallel runtime as one NCCL rank, with megatron-core's DDP +
distributed optimizer and with DeepSpeed ZeRO-1: the model on cuda:0, the losses and step-1
gradients of the one-process CPU reference (GPU_RTOL), and a sharded checkpoint saved after
2 steps resumed by a fresh runtime with step 3's loss unchanged. The CPU forms of these runs
(gloo): tests/parallel/test_parity_data_parallel.py and test_megatron_cpu.py.
"""

from __future__ import annotations

import pytest

from tests.helpers import GPU_ENV, GPU_RTOL, batches, check_parity, make_cfg, needs_gpus, train_layout

pytestmark = needs_gpus(1)

ENGINES = {"megatron": dict(), "deepspeed": dict(engine="deepspeed", zero=1)}


def _one_rank(layout: dict, root: str) -> dict:
    import torch

    from titans_scale.parallel.runtime import ParallelRuntime

    out = {"parity": train_layout(**layout)}
    data, losses = batches(), {}
    for name in ("saved", "resumed"):
        cfg = make_cfg(**layout)
        cfg.train.run_dir = root
        rt = ParallelRuntime(cfg)
        assert rt.info.backend == "nccl" and rt.device == torch.device("cuda", 0), (rt.info.backend, rt.device)
        assert {p.device.type for c in rt.engine.chunks for p in c.parameters()} == {"cuda"}
        if name == "saved":
            for x, y in data[:2]:
                rt.train_step(x, y, 1e-2)
            rt.save(2, {"step": 2})
        else:
            out["state"] = rt.load(rt.latest())
        losses[name] = rt.train_step(*data[2], 1e-2).loss
    return {**out, **losses}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_runtime_as_one_nccl_rank(engine, ref, tmp_path):
    from titans_scale.parallel.launch_utils import run_distributed

    (out,) = run_distributed(_one_rank, 1, ENGINES[engine], str(tmp_path / "run"), backend=None, timeout_s=900,
                             env=GPU_ENV)
    check_parity(out["parity"], *ref, rtol=GPU_RTOL)
    assert out["state"]["step"] == 2
    assert abs(out["resumed"] - out["saved"]) <= 1e-6 * abs(out["saved"]), (out["saved"], out["resumed"])
