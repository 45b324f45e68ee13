"""Context parallelism through the distributed trainer (ParallelRuntime) against one process.

Fast: one spawn of 2 ranks trains CP=2 (TP=1, PP=1): a MAG model with the all-to-all
strategy, the model with every mixer (MAC, MAG, MAL, LMM, SWA, SEG, full attention) under
the ring, and the MAG model with the normalised memory (model.mem_norm) under a2a and ring.
Each rank feeds the runtime whole sequences and it keeps its shard; the losses must
match the single-process run (1e-5 relative per step) and so must the step-1 gradients after
megatron's DDP reduced them over DP x CP.

Slow: `titans-scale train` under torchrun with parallel.cp=4 on 16k-token sequences.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tests.helpers import (ALL_MIXERS, ROOT, SHORT_TRAIN, check_parity, losses, micro_config, reference,
                           run_command, spawn_layouts, torchrun, write_config)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU/gloo parity runs; on CUDA: tests/gpu/test_parity_gpu.py (pytest -m gpu)")

MAG = ("mag", "mag")
LAYOUTS = {
    "cp2_mag_a2a": (MAG, dict(cp=2, cp_strategy="a2a", layers=MAG)),
    "cp2_all_ring": (ALL_MIXERS, dict(cp=2, cp_strategy="ring")),
    "cp2_mag_a2a_norm": (MAG, dict(cp=2, cp_strategy="a2a", layers=MAG, mem_norm=True)),
    "cp2_mag_ring_norm": (MAG, dict(cp=2, cp_strategy="ring", layers=MAG, mem_norm=True)),
}


@pytest.fixture(scope="module")
def runs():
    layouts = {name: layout for name, (_, layout) in LAYOUTS.items()}
    return spawn_layouts(2, layouts)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cp_training_matches_one_process(runs, layout):
    layers, kw = LAYOUTS[layout]
    ref = reference(layers, mem_norm=kw.get("mem_norm", False))
    for rank_result in runs:
        assert "CP=2" in rank_result[layout]["describe"]
        check_parity(rank_result[layout], *ref)


def _normalised_memory_op_errors() -> dict:
    """In each of 2 ranks: cp_memory_scan with ln_weight/ln_bias (float64, shards cut mid-chunk)
    against the one-process per-token reference: the largest relative error over y, the final
    state and the gradients of q..alpha, W^0, ln_weight and ln_bias (replicated ones summed)."""
    import torch.distributed as dist

    from tests.helpers import make_inputs, rel_err
    from titans_scale.ops.memory import memory_scan
    from titans_scale.parallel.context import CPComm, CPConfigError, cp_memory_scan

    comm, cuts, out = CPComm(dist.group.WORLD), [0, 9, 21], {}
    a, b = cuts[comm.rank], cuts[comm.rank + 1]
    for strategy, depth, impl in [(s, d, i) for s in ("a2a", "ring") for d in (1, 2) for i in ("chunked", "fused")]:
        q, k, v, theta, eta, alpha, init = make_inputs(B=2, H=2, L=21, d=4, depth=depth, seed=depth)
        g = torch.Generator().manual_seed(depth)
        r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
        norm = [1 + 0.3 * r(2, 4), 0.2 * r(2, 4)]
        dy = r(*q.shape)
        ins = [q, k, v, theta * 0.25, eta, alpha]        # inner steps as tests/ops/test_memory_norm.py
        leaves = [t.clone().requires_grad_() for t in ins + init + norm]
        y, st = memory_scan(*leaves[:6], leaves[6:-2], 4, "naive", ln_weight=leaves[-2], ln_bias=leaves[-1])
        ref = torch.autograd.grad((y * dy).sum() + sum((s ** 2).sum() for s in st.tensors()), leaves)
        loc = [t[:, :, a:b].clone().requires_grad_() for t in ins] + [t.clone().requires_grad_() for t in init + norm]
        y_cp, st_cp = cp_memory_scan(*loc[:6], loc[6:-2], 4, comm, strategy, impl, ln_weight=loc[-2], ln_bias=loc[-1])
        loss = (y_cp * dy[:, :, a:b]).sum() + sum((s ** 2).sum() for s in st_cp.tensors()) / comm.size
        grads = [torch.zeros_like(t) if x is None else x
                 for x, t in zip(torch.autograd.grad(loss, loc, allow_unused=True), loc)]
        for x in grads[6:]:                                # replicated over the group: sum
            dist.all_reduce(x)
        errs = [rel_err(y_cp, y[:, :, a:b])] + [rel_err(x, r) for x, r in zip(st_cp.tensors(), st.tensors())]
        errs += [rel_err(x, r[:, :, a:b]) for x, r in zip(grads[:6], ref[:6])]
        errs += [rel_err(x, r) for x, r in zip(grads[6:], ref[6:])]
        out[f"{strategy}-{depth}-{impl}"] = max(errs)
    try:
        linear = [torch.zeros(2, 2, 4, 4, dtype=torch.float64)]
        cp_memory_scan(*loc[:6], linear, 4, comm, "state_passing", "chunked", ln_weight=loc[-2], ln_bias=loc[-1])
    except CPConfigError as e:
        out["state_passing"] = str(e)
    return out


def test_normalised_memory_op_matches_one_process():
    """cp_memory_scan with the normalised memory equals the float64 per-token reference under a2a
    and ring (depth 1-2, chunked and fused); state_passing refuses it in one line."""
    from titans_scale.parallel.launch_utils import run_distributed

    for errors in run_distributed(_normalised_memory_op_errors, 2, timeout_s=600):
        assert "mem_norm" in errors.pop("state_passing")
        for case, err in errors.items():
            assert err < 1e-10, case


def test_auto_strategy_never_picks_state_passing_for_the_normalised_memory():
    """3 linear memory heads over cp=2: auto picks state_passing for the plain memory, ring with
    mem_norm; asking for state_passing with mem_norm is a one-line config error."""
    from dataclasses import replace

    from titans_scale.model import ModelConfig
    from titans_scale.parallel.context import CPConfigError, check_cp_config

    plain = ModelConfig(d_model=24, n_heads=2, mem_heads=3, mem_depth=1, layers=["lmm"], mem_norm=False)
    assert check_cp_config(plain, cp=2) == ["state_passing"]
    assert check_cp_config(replace(plain, mem_norm=True), cp=2) == ["ring"]
    with pytest.raises(CPConfigError, match="mem_norm"):
        check_cp_config(replace(plain, mem_norm=True), cp=2, strategy="state_passing")


FOUR_RANK_LAYOUTS = {
    "tp2_cp2_ring": dict(tp=2, cp=2, cp_strategy="ring", layers=MAG),
    "tp2_sp_cp2_ring": dict(tp=2, sp=True, cp=2, cp_strategy="ring", layers=MAG),
    "dp2_cp2_a2a": dict(dp=2, cp=2, cp_strategy="a2a", layers=MAG),
}


@pytest.mark.slow
def test_cp_with_tp_sp_and_dp_matches_one_process():
    """CP=2 combined with TP=2 (with and without SP) and with DP=2: 4 ranks, same parity."""
    runs = spawn_layouts(4, FOUR_RANK_LAYOUTS)
    ref = reference(MAG)
    for rank_result in runs:
        for name in FOUR_RANK_LAYOUTS:
            assert "CP=2" in rank_result[name]["describe"]
            check_parity(rank_result[name], *ref)


@pytest.mark.slow
def test_cli_trains_cp4_on_16k_sequences(tmp_path):
    """4 torchrun ranks, CP=4 (a2a) on 16,384-token sequences: 2 steps, a checkpoint and an eval,
    the losses those of the single-process trainer on the same data."""
    config, source = tmp_path / "cp.toml", tmp_path / "corpus.txt"
    # One document of 1.2 MB (byte tokens): its last 2% (the val split) still holds a 16k sequence.
    text = "".join(p.read_text() for p in sorted((ROOT / "titans_scale").rglob("*.py")))
    source.write_text((text * (1 + 1_200_000 // len(text)))[:1_200_000])
    write_config(config, micro_config(
        tmp_path / "shards", tmp_path / "one",
        model={"mem_heads": 4, "layers": ["mag", "mag"], "chunk_size": 64, "window": 64, "segment_len": None,
               "n_persistent": None},
        data={"source": str(source), "seq_len": 1024, "batch_size": 1, "max_bytes": None},
        optim={"warmup_steps": 1}, train={**SHORT_TRAIN, "steps": 2, "ckpt_every": 100}))
    train = ["-m", "titans_scale.cli", "train", "--config", str(config), "data.seq_len=16384"]
    torchrun(4, *train, "parallel.cp=4", f"train.run_dir={tmp_path / 'cp4'}", timeout=1800)
    run_command([sys.executable, *train], timeout=1800)  # the single-process trainer
    cp4, one = losses(tmp_path / "cp4"), losses(tmp_path / "one")
    assert sorted(cp4) == [1, 2], f"expected steps 1-2 logged, got {sorted(cp4)}"
    assert all(math.isfinite(v) and v > 0 for v in cp4.values()), cp4
    for step in (1, 2):
        assert abs(cp4[step] - one[step]) <= 1e-5 * one[step], \
            f"step {step}: CP=4 loss {cp4[step]} vs one process {one[step]}"
    assert (tmp_path / "cp4" / "checkpoints" / "latest").exists(), "the CP run should save its final checkpoint"
