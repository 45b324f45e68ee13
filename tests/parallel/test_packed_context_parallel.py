"""Packed rows (cu_seqlens) under context parallelism against each document alone on one process.

One spawn of 2 gloo ranks. A packed batch of several documents (lengths not multiples of the
chunk 4, segment 8 or window 6, one shorter than a chunk; a document inside a shard, documents
spanning the shard boundary) through a TitansLM of every mixer a strategy supports, CP=2 with
uneven shards: the logits of each rank's tokens and every parameter gradient (summed over the
group) must equal those of each document run alone, unsharded: fp32 1e-5 per strategy (a2a,
state_passing, ring with MAC), float64 1e-9 for the memory implementations naive / chunked /
fused. The same CP model given the rows without cu_seqlens (no document boundaries) is off by
far more, so the comparison can fail.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import cu_seqlens_of, documents_of, rel_err
from titans_scale.model import ModelConfig, TitansLM
from titans_scale.model.memory import NeuralMemory
from titans_scale.parallel.context import CPComm, apply_context_parallel, cp_allreduce_grads
from titans_scale.parallel.launch_utils import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU/gloo parity runs; CUDA machines run the GPU suite")

LENGTHS = [[3, 13, 21], [30, 7]]
L, CUTS = 37, [0, 17, 37]             # rank 0 holds tokens [0, 17) of each row, rank 1 the rest
ATTENTION = ["swa", "seg", "attn"]
CASES = {   # name: (strategy, mixers, memory depth, dtype, memory impl, tolerance)
    "a2a": ("a2a", ["mag", "mal", "lmm", *ATTENTION], 2, torch.float32, "auto", 1e-5),
    "state_passing": ("state_passing", ["mag", "mal", "lmm", *ATTENTION], 1, torch.float32, "auto", 1e-5),
    "ring": ("ring", ["mac", "mag", "mal", "lmm", *ATTENTION], 2, torch.float32, "auto", 1e-5),
    "a2a_naive_f64": ("a2a", ["mag", "lmm"], 2, torch.float64, "naive", 1e-9),
    "state_passing_chunked_f64": ("state_passing", ["mal", "lmm"], 1, torch.float64, "chunked", 1e-9),
    "ring_fused_f64": ("ring", ["mac", "lmm"], 2, torch.float64, "fused", 1e-9),
}


def _model(layers, depth, dtype, impl):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, mem_heads=2, layers=layers, mem_depth=depth, mem_expansion=2,
                      chunk_size=4, window=6, segment_len=8, n_persistent=2, vocab_size=50)
    model = TitansLM(cfg).to(dtype)
    for m in model.modules():
        if isinstance(m, NeuralMemory):
            m.impl = impl
            with torch.no_grad():           # a larger inner step, so the memory matters to the output
                m.gates.bias.view(-1, 3)[:, 0] = 2.0
    return model


def _grads(model):
    return [p.grad for p in model.parameters()]


def _case(comm, strategy, layers, depth, dtype, impl) -> dict:
    model = _model(layers, depth, dtype, impl)
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, 50, (len(LENGTHS), L), generator=g)
    probe = torch.randn(len(LENGTHS), L, 50, generator=g, dtype=dtype)
    cp_model = copy.deepcopy(model)
    rows = [[] for _ in LENGTHS]                      # the reference: each document alone
    for r, a, b in documents_of(LENGTHS):
        rows[r].append(model(tok[r:r + 1, a:b])[0])
    alone = torch.cat([torch.cat(row, 1) for row in rows])
    (alone * probe).sum().backward()

    apply_context_parallel(cp_model, comm.group, strategy)
    a, b = CUTS[comm.rank], CUTS[comm.rank + 1]
    logits, state = cp_model(tok[:, a:b], cu_seqlens=cu_seqlens_of(LENGTHS))
    (logits * probe[:, a:b]).sum().backward()
    cp_allreduce_grads(cp_model, comm)
    pairs = [(x, y) for x, y in zip(_grads(cp_model), _grads(model))]
    unpacked = cp_model(tok[:, a:b])[0]             # the same sharded rows, no document boundaries
    return {
        "logits": rel_err(logits, alone[:, a:b]),
        "grads": max(rel_err(x, y) for x, y in pairs if y is not None and y.abs().max() > 0),
        "grads_missing": sum((x is None) != (y is None) for x, y in pairs),
        "state": state,
        "unpacked": rel_err(unpacked, alone[:, a:b]),
    }


def _checks() -> dict:
    comm = CPComm()
    return {name: _case(comm, *case[:5]) for name, case in CASES.items()}


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_checks, 2, timeout_s=600)


@pytest.mark.parametrize("case", CASES)
def test_packed_rows_under_cp_equal_each_document_alone(runs, case):
    tol = CASES[case][-1]
    for rank, out in enumerate(runs):
        got = out[case]
        assert got["state"] is None, "packed rows return no state"
        assert got["grads_missing"] == 0, f"rank {rank}: gradients missing"
        assert got["logits"] < tol, f"rank {rank}: logits off by {got['logits']:.2e}"
        assert got["grads"] < tol, f"rank {rank}: gradients off by {got['grads']:.2e}"
        assert got["unpacked"] > 1e-3, f"rank {rank}: without boundaries only {got['unpacked']:.2e} off"
