"""impl="fused" (ops/fused.py): the hand-written backward against the float64 reference where
the simple tests do not reach: gradients through a state carried across calls (mid-chunk
cuts), fp32 at the reference chunk size, and which impl "auto" picks."""

import pytest
import torch

from titans_scale.ops import fused
from titans_scale.ops.memory import MemoryArgumentError, memory_scan
from tests.helpers import make_inputs, rel_err


def _streamed_grads(args, impl, C, cuts):
    """Gradients of a loss on every piece's output and the last state, the sequence fed in
    pieces with the state passed on (so backward flows through carried (W_c, W, S))."""
    state, ys, bounds = args[6], [], [0, *cuts, args[0].shape[2]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        y, state = memory_scan(*(t[:, :, a:b] for t in args[:6]), state, chunk_size=C, impl=impl)
        ys.append(y)
    y = torch.cat(ys, dim=2)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
    loss = (y * probe).sum() + sum((w ** 2).sum() for w in state.weights) + sum(m.sum() for m in state.momentum)
    return torch.autograd.grad(loss, [*args[:6], *args[6]])


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("cuts", [[13], [5, 8, 29, 40]])      # mid-chunk and on chunk boundaries
def test_gradients_through_carried_state_equal_naive(depth, cuts):
    args = make_inputs(L=53, depth=depth, requires_grad=True)
    ref = _streamed_grads(args, "naive", 8, cuts)
    got = _streamed_grads(args, "fused", 8, cuts)
    for name, a, b in zip(["q", "k", "v", "theta", "eta", "alpha", "W0", "W1"], got, ref):
        assert rel_err(a, b) < 1e-8, name


@pytest.mark.parametrize("depth", [1, 2])
def test_fp32_at_the_reference_chunk_size(depth):
    """Many 64-token chunks in fp32: fused and chunked agree with the float64 reference alike."""
    args64 = make_inputs(B=1, H=2, L=64 * 6 + 17, d=16, depth=depth, seed=7)
    args32 = [t.float() for t in args64[:6]] + [[w.float() for w in args64[6]]]
    y_ref, _ = memory_scan(*args64, chunk_size=64, impl="naive")
    errs = {impl: rel_err(memory_scan(*args32, chunk_size=64, impl=impl)[0].double(), y_ref)
            for impl in ("chunked", "fused")}
    assert errs["fused"] < 1e-5 and errs["chunked"] < 1e-5, errs


def test_auto_picks_fused_on_cpu_and_chunked_for_deep_memories(monkeypatch):
    calls = []
    real = fused.TorchBackend.forward
    monkeypatch.setattr(fused.TorchBackend, "forward", staticmethod(lambda *a, **k: calls.append(1) or real(*a, **k)))
    memory_scan(*make_inputs(L=20, depth=2), chunk_size=8)
    assert calls, "auto did not run the fused path for a depth-2 memory on the CPU"
    calls.clear()
    y, _ = memory_scan(*make_inputs(L=20, depth=3), chunk_size=8)
    assert not calls and y.shape[2] == 20
    with pytest.raises(MemoryArgumentError, match="depth 3"):
        memory_scan(*make_inputs(L=20, depth=3), chunk_size=8, impl="fused")
