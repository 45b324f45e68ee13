"""FP8 state in the parallel trainer's checkpoints: a TP=2 run in emulated FP8, killed and
resumed, continues with the amax histories and scales it had (the losses after the resume
equal the uninterrupted run's), and the converter reads such a checkpoint as weights only."""

import pytest
import torch

from tests.helpers import SHORT_TRAIN, losses, micro_config, start_from, torchrun_train, write_config

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="CPU check of emulated FP8; FP8 on CUDA: bench/gpu_acceptance.py (TE)")]


def test_tp2_fp8_resume_keeps_the_scales(tmp_path):
    from megatron.core import dist_checkpointing

    from titans_scale import convert

    runs = {k: tmp_path / k for k in ("a", "b")}
    for k, run in runs.items():
        write_config(tmp_path / f"{k}.toml", micro_config(
            tmp_path / "shards", run, model={"n_persistent": None},
            data={"max_bytes": 100000, "seq_len": 32, "batch_size": 2}, optim={"warmup_steps": 1},
            fp8={"backend": "emulated", "amax_history_len": 4},
            train={**SHORT_TRAIN, "steps": 6, "precision": "fp8", "ckpt_every": 3}, parallel={"tp": 2}))
    torchrun_train(tmp_path / "a.toml", nproc=2)               # steps 1-6, checkpoints at 3 and 6
    a = losses(runs["a"])
    ckpt = runs["a"] / "checkpoints" / "step_00000003"
    keys = dist_checkpointing.load_tensors_metadata(str(ckpt / "model_optim"))
    assert any(k.endswith(".fp8_scale") for k in keys) and any(k.endswith(".fp8_amax_history") for k in keys)

    start_from(runs["a"], 3, runs["b"])
    torchrun_train(tmp_path / "b.toml", nproc=2)               # steps 4-6 from A's step 3
    b = losses(runs["b"])
    assert sorted(b) == [4, 5, 6]
    for s in (4, 5, 6):     # same layout, same order of every sum: equal unless state was lost
        assert b[s] == a[s], f"step {s}: resumed {b[s]} vs uninterrupted {a[s]}"

    weights = convert.write_consolidated(convert.open_checkpoint(ckpt), tmp_path / "c")
    assert (weights / "model.safetensors").is_file()
