"""Packed rows (cu_seqlens) under context parallelism against each document alone on one process.

One spawn of 2 gloo ranks. A packed batch of several documents (lengths not multiples of the
chunk 4, segment 8 or window 6, one shorter than a chunk; a document inside a shard, documents
spanning the shard boundary; one or two length buckets, a bucket shorter than P chunks) through
a TitansLM of every mixer a strategy supports, CP=2 with uneven shards: the logits of each
rank's tokens and every parameter gradient (summed over the group) must equal those of each
document run alone, unsharded: fp32 1e-5 per strategy (a2a, state_passing, ring with MAC),
float64 1e-9 for the memory implementations naive / chunked / fused. The same CP model given
the rows without cu_seqlens (no document boundaries) is off by far more, so the comparison
can fail. The runtime's CP=2 packed training run is in test_parity_packed.py.

Slow: the Triton kernels (interpreter, fp32 1e-5); CP=4 (documents spanning 3 and 4 shards);
TP=2 (SP) x CP=2 through the runtime, 4 ranks, every mixer, against one process;
`titans-scale train` with data.pack under torchrun with parallel.cp=2 against one process.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from tests.helpers import (SHORT_TRAIN, check_every_rank, cu_seqlens_of, documents_of, losses, micro_config,
                           prepare_shards, reference, rel_err, run_command, spawn_layouts, torchrun, write_config)
from titans_scale.model import ModelConfig, TitansLM
from titans_scale.model.memory import NeuralMemory
from titans_scale.parallel.context import CPComm, apply_context_parallel, cp_allreduce_grads
from titans_scale.parallel.launch_utils import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU/gloo parity runs; CUDA machines run the GPU suite")

# Per row, its documents' lengths; CUT: where each row's shards meet (rank 0 holds [0, 17), rank 1 the rest).
ROWS, CUT = [[3, 13, 21], [30, 7]], (17,)
# Two length buckets (ops/varlen.py: up to 64 tokens, one document; up to 128), cut on the chunk grid.
TWO_BUCKETS, CUT_TWO = [[70, 30], [100]], (45,)
# Documents so short that their bucket (3 tokens) has fewer chunks than ranks: split per token.
TINY, CUT_TINY = [[3, 1], [2, 2]], (2,)
# Every document inside one shard: nothing crosses ranks, each rank runs its own documents.
NO_SPANNING = [[17, 20], [5, 12, 20]]
ATTENTION = ["swa", "seg", "attn"]
F32, F64 = torch.float32, torch.float64
CASES = {   # name: (strategy, mixers, memory depth, dtype, memory impl, rows, cuts, tolerance)
    "a2a": ("a2a", ["mag", "mal", "lmm", *ATTENTION], 2, F32, "auto", ROWS, CUT, 1e-5),
    "state_passing": ("state_passing", ["mag", "mal", "lmm", *ATTENTION], 1, F32, "auto", ROWS, CUT, 1e-5),
    "ring": ("ring", ["mac", "mag", "mal", "lmm", *ATTENTION], 2, F32, "auto", ROWS, CUT, 1e-5),
    "a2a_naive_f64": ("a2a", ["mag", "lmm"], 2, F64, "naive", ROWS, CUT, 1e-9),
    "state_passing_chunked_f64": ("state_passing", ["mal", "lmm"], 1, F64, "chunked", ROWS, CUT, 1e-9),
    "ring_fused_f64": ("ring", ["mac", "lmm"], 2, F64, "fused", ROWS, CUT, 1e-9),
    "ring_two_buckets": ("ring", ["mac", "mag", "swa"], 2, F32, "auto", TWO_BUCKETS, CUT_TWO, 1e-5),
    "a2a_tiny_documents": ("a2a", ["mag", "seg"], 2, F32, "auto", TINY, CUT_TINY, 1e-5),
    "ring_no_spanning": ("ring", ["mac", "mal", "attn"], 2, F32, "auto", NO_SPANNING, CUT, 1e-5),
}


def _model(layers, depth, dtype, impl, mem_norm):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, mem_heads=2, layers=layers, mem_depth=depth, mem_expansion=2,
                      chunk_size=4, window=6, segment_len=8, n_persistent=2, vocab_size=50, mem_norm=mem_norm)
    model = TitansLM(cfg).to(dtype)
    for m in model.modules():
        if isinstance(m, NeuralMemory):
            m.impl = impl
            with torch.no_grad():           # a larger inner step, so the memory matters to the output
                m.gates.bias.view(-1, 3)[:, 0] = 2.0
    return model


def _grads(model):
    return [p.grad for p in model.parameters()]


def _case(comm, strategy, layers, depth, dtype, impl, lengths, cuts) -> dict:
    # the normalised memory (the default) where the strategy takes it; state passing refuses it
    model = _model(layers, depth, dtype, impl, mem_norm=strategy != "state_passing")
    g = torch.Generator().manual_seed(1)
    B, L = len(lengths), sum(lengths[0])
    tok = torch.randint(0, 50, (B, L), generator=g)
    probe = torch.randn(B, L, 50, generator=g, dtype=dtype)
    cp_model = copy.deepcopy(model)
    rows = [[] for _ in lengths]                      # the reference: each document alone
    for r, a, b in documents_of(lengths):
        rows[r].append(model(tok[r:r + 1, a:b])[0])
    alone = torch.cat([torch.cat(row, 1) for row in rows])
    (alone * probe).sum().backward()

    apply_context_parallel(cp_model, comm.group, strategy)
    a, b = (0, *cuts, L)[comm.rank:comm.rank + 2]
    logits, state = cp_model(tok[:, a:b], cu_seqlens=cu_seqlens_of(lengths))
    (logits * probe[:, a:b]).sum().backward()
    cp_allreduce_grads(cp_model, comm)
    # a parameter the documents never reach (the memory gates, when every document is shorter than
    # a chunk) has no gradient alone and a zero one summed over the group
    pairs = [(x, torch.zeros_like(x) if y is None else y) for x, y in zip(_grads(cp_model), _grads(model))]
    unpacked = cp_model(tok[:, a:b])[0]             # the same sharded rows, no document boundaries
    return {
        "logits": rel_err(logits, alone[:, a:b]),
        "grads": max(rel_err(x, y) for x, y in pairs if y.abs().max() > 0),
        "zero_grads": max([x.abs().max().item() for x, y in pairs if not y.abs().max() > 0], default=0.0),
        "state": state,
        "unpacked": rel_err(unpacked, alone[:, a:b]),
    }


def _checks(cases: dict) -> dict:
    comm = CPComm()
    return {name: _case(comm, *case[:-1]) for name, case in cases.items()}


def _check(runs: list[dict], case: str, tol: float) -> None:
    for rank, out in enumerate(runs):
        got = out[case]
        assert got["state"] is None, "packed rows return no state"
        assert got["zero_grads"] == 0, f"rank {rank}: {got['zero_grads']:.2e} where the gradient is 0"
        assert got["logits"] < tol, f"rank {rank}: logits off by {got['logits']:.2e}"
        assert got["grads"] < tol, f"rank {rank}: gradients off by {got['grads']:.2e}"
    unpacked = max(out[case]["unpacked"] for out in runs)     # (a rank may hold one document only)
    assert unpacked > 1e-3, f"without boundaries only {unpacked:.2e} off"


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_checks, 2, CASES, timeout_s=600)


@pytest.mark.parametrize("case", CASES)
def test_packed_rows_under_cp_equal_each_document_alone(runs, case):
    _check(runs, case, CASES[case][-1])


@pytest.mark.slow
def test_packed_rows_under_cp_with_the_triton_memory_kernels():
    """impl='triton' (fp32 only; the interpreter on CPU, ~30 s a run) under a2a."""
    cases = {"a2a_triton": ("a2a", ["mag", "lmm"], 2, F32, "triton", ROWS, CUT, 1e-5)}
    _check(run_distributed(_checks, 2, cases, timeout_s=900), "a2a_triton", 1e-5)


@pytest.mark.slow
def test_packed_rows_under_cp4_equal_each_document_alone():
    """CP=4, shards of 10, 7, 13 and 7 tokens: a document spanning three shards, one spanning all
    four, short ones inside a shard; the ring (every mixer) and state_passing."""
    rows, cuts = [[3, 30, 4], [37]], (10, 17, 30)
    cases = {"cp4_ring": ("ring", ["mac", "mag", "mal", "lmm", *ATTENTION], 2, F32, "auto", rows, cuts, 1e-5),
             "cp4_state_passing": ("state_passing", ["mag", "lmm"], 1, F32, "auto", rows, cuts, 1e-5)}
    runs = run_distributed(_checks, 4, cases, timeout_s=900)
    for case in cases:
        _check(runs, case, 1e-5)


@pytest.mark.slow
def test_packed_rows_under_tp2_sp_x_cp2_match_one_process():
    """The runtime with TP=2 (SP) x CP=2 on packed rows of a model of every mixer: 4 ranks, the
    single-process losses and step-1 gradients (tests/helpers.PACKED_LENGTHS, 1e-5)."""
    layouts = {"tp2_sp_cp2": dict(tp=2, sp=True, cp=2, cp_strategy="auto", packed=True)}
    runs = spawn_layouts(4, layouts)
    for rank_result in runs:
        assert "CP=2" in rank_result["tp2_sp_cp2"]["describe"]
    check_every_rank(runs, "tp2_sp_cp2", reference(packed=True))


@pytest.mark.slow
def test_cli_trains_packed_rows_under_cp2(tmp_path):
    """`titans-scale train` with data.pack = true under torchrun, parallel.cp=2: the losses of the
    single-process trainer on the same packed rows (1e-5 relative per step)."""
    shards = prepare_shards(tmp_path / "shards")
    config = write_config(tmp_path / "pack.toml", micro_config(
        shards, tmp_path / "one", data={"pack": True}, train={**SHORT_TRAIN, "steps": 3, "ckpt_every": 100}))
    train = ["-m", "titans_scale.cli", "train", "--config", str(config)]
    torchrun(2, *train, "parallel.cp=2", f"train.run_dir={tmp_path / 'cp2'}")
    run_command([sys.executable, *train])
    cp2, one = losses(tmp_path / "cp2"), losses(tmp_path / "one")
    assert sorted(cp2) == sorted(one) == [1, 2, 3], (cp2, one)
    for step, want in one.items():
        assert abs(cp2[step] - want) <= 1e-5 * want, f"step {step}: CP=2 loss {cp2[step]} vs one process {want}"
