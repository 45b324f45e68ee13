"""Recompute at chunk-group boundaries (ops/recompute.py): same numbers, less memory."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from titans_scale.ops import chunked
from titans_scale.ops.memory import MemoryArgumentError, memory_scan
from tests.helpers import make_inputs


def _grads(args, C, g, start=None, impl="chunked"):
    """Outputs and input gradients of a loss on y and the final state; `start` streams in
    from a mid-chunk state produced by an earlier call."""
    init = args[6] if start is None else start
    y, s = memory_scan(*args[:6], init, chunk_size=C, impl=impl, recompute_group=g)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    loss = (y * probe).sum() + sum((w ** 2).sum() for w in s.weights) + sum(m.sum() for m in s.momentum)
    flat = [*args[:6], *args[6]]
    return [y, *s.weights, *s.momentum], torch.autograd.grad(loss, flat, retain_graph=start is not None)


@pytest.mark.parametrize("impl,depth", [("chunked", 1), ("chunked", 2), ("chunked", 3), ("fused", 1), ("fused", 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_bitwise_identical(impl, depth, dtype):
    args = make_inputs(B=1, H=2, L=61, d=8, depth=depth, dtype=dtype, requires_grad=True)
    outs, grads = _grads(args, 8, None, impl=impl)
    for g in (1, 2, 5):
        outs_g, grads_g = _grads(args, 8, g, impl=impl)
        assert all(torch.equal(a, b) for a, b in zip(outs, outs_g)), f"outputs differ, g={g}"
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_g)), f"gradients differ, g={g}"


@pytest.mark.parametrize("impl", ["chunked", "fused"])
@pytest.mark.parametrize("depth", [1, 2])
def test_streaming_from_mid_chunk_state(impl, depth):
    args = make_inputs(B=1, H=1, L=50, d=8, depth=depth, dtype=torch.float32, requires_grad=True)
    head = [x[:, :, :5] for x in args[:6]]
    _, start = memory_scan(*head, args[6], chunk_size=8, impl=impl)     # 5 tokens into a chunk
    tail = [x[:, :, 5:] for x in args[:6]]
    outs, grads = _grads((*tail, args[6]), 8, None, start, impl)
    outs_g, grads_g = _grads((*tail, args[6]), 8, 2, start, impl)
    assert all(torch.equal(a, b) for a, b in zip(outs + list(grads), outs_g + list(grads_g)))


def test_backward_recomputes_the_chunks(monkeypatch):
    """With recompute every chunk step runs again in backward; without, none does."""
    calls = []
    real = chunked.chunk_step
    monkeypatch.setattr(chunked, "chunk_step", lambda *a: calls.append(1) or real(*a))
    args = make_inputs(B=1, H=1, L=45, d=8, depth=2, dtype=torch.float32, requires_grad=True)
    for g, expect in ((None, 0), (2, 6)):                     # 45 tokens / chunk 8 -> 6 pieces
        calls.clear()
        y, _ = memory_scan(*args, chunk_size=8, impl="chunked", recompute_group=g)
        assert len(calls) == 6
        calls.clear()
        y.sum().backward()
        assert len(calls) == expect


def test_no_grad_and_bad_values():
    args = make_inputs(B=1, H=1, L=20, d=8, depth=2)
    with torch.no_grad():
        y, _ = memory_scan(*args, chunk_size=4, recompute_group=2)
    assert torch.equal(y, memory_scan(*args, chunk_size=4)[0])
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(MemoryArgumentError, match="recompute_group"):
            memory_scan(*args, chunk_size=4, recompute_group=bad)


def _bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = mod          # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def test_recompute_lowers_peak_memory():
    """Peak resident memory of forward + backward above the inputs, each run in a fresh
    process (the benchmark's own measurement), at the benchmark's reference shape and
    8k tokens: 128 chunks, saved every 11th with recompute."""
    bench = _bench()
    shape = bench.Shape(L=8192)
    plain = bench.run_worker_subprocess(shape, None, threads=1, timeout=300)
    recomputed = bench.run_worker_subprocess(shape, bench.auto_group(shape), threads=1, timeout=300)
    assert recomputed["peak_over_inputs_bytes"] * 3 < plain["peak_over_inputs_bytes"], (plain, recomputed)
