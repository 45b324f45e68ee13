"""`titans-scale train` under torchrun: TP=2 x PP=2 on 4 processes for 20 steps, checkpoints
resumed as TP=1 x PP=1 x DP=4 and back, the loss curve continuing as if never interrupted.

Run A trains 20 steps as TP=2 x PP=2 (2 micro-batches of 2 rows). Run B starts from A's step-10
checkpoint as DP=4 (1 row per rank: the same global batch) and must log A's losses for steps
11-20. Run C starts from B's step-15 checkpoint as TP=2 x PP=2 again and must log A's losses
for steps 16-20. Marked slow: three 4-process launches take a few minutes on 2 cores.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import losses, micro_config, start_from, torchrun_train, write_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="CPU/gloo run; on CUDA: tests/gpu/test_parity_gpu.py (pytest -m gpu)")]

DP4 = ["parallel.tp=1", "parallel.pp=1", "parallel.microbatches=1", "data.batch_size=1"]
REL = 1e-5       # fp32 sums in another order (TP and PP vs DP reductions): equal to rounding


def test_tp2_pp2_resumes_as_dp4_and_back(tmp_path):
    shards = tmp_path / "shards"
    runs = {k: tmp_path / k for k in ("a", "b", "c")}
    configs = {}
    for k, every in (("a", 10), ("b", 5), ("c", 10)):
        configs[k] = write_config(tmp_path / f"{k}.toml", micro_config(
            shards, runs[k], model={"layers": ["swa", "mag", "mac", "lmm"]},
            train={"steps": 20, "eval_every": 10, "eval_batches": 1, "ckpt_every": every, "keep_checkpoints": 4},
            parallel={"tp": 2, "pp": 2, "microbatches": 2}))

    torchrun_train(configs["a"])                        # TP=2 x PP=2, steps 1-20
    a = losses(runs["a"])
    assert sorted(a) == list(range(1, 21)) and a[20] < a[1], "run A should train 20 steps and learn"

    start_from(runs["a"], 10, runs["b"])
    torchrun_train(configs["b"], *DP4)                  # DP=4 from A's step 10
    b = losses(runs["b"])
    assert sorted(b) == list(range(11, 21))
    for s in range(11, 21):
        assert abs(b[s] - a[s]) <= REL * a[s], f"DP=4 resume: step {s} loss {b[s]} vs TP2xPP2 {a[s]}"

    start_from(runs["b"], 15, runs["c"])
    torchrun_train(configs["c"])                        # TP=2 x PP=2 from B's step 15
    c = losses(runs["c"])
    assert sorted(c) == list(range(16, 21))
    for s in range(16, 21):
        assert abs(c[s] - a[s]) <= REL * a[s], f"TP2xPP2 resume from DP=4: step {s} loss {c[s]} vs {a[s]}"
