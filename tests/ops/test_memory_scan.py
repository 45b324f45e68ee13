"""The fast memory ops (chunked: autograd through the chunk step; fused: the same step with a
hand-written backward) equal the float64 per-token reference (docs/design.md section 3)."""

import pytest
import torch

from titans_scale.ops.memory import MemoryArgumentError, memory_scan
from titans_scale.ops.mlp import mlp_forward
from tests.helpers import make_inputs, rel_err


FAST = [("chunked", 1), ("chunked", 2), ("chunked", 3), ("fused", 1), ("fused", 2)]   # fused: depth 1-2


@pytest.mark.parametrize("impl,depth", FAST)
@pytest.mark.parametrize("C", [1, 3, 16, 64])
def test_fast_path_equals_naive_forward(impl, depth, C):
    args = make_inputs(L=37 if C != 64 else 70, depth=depth)   # L never a multiple of C
    y_ref, s_ref = memory_scan(*args, chunk_size=C, impl="naive")
    y, s = memory_scan(*args, chunk_size=C, impl=impl)
    assert rel_err(y, y_ref) < 1e-9
    for name in ("chunk_start", "weights", "momentum"):
        for a, b in zip(getattr(s, name), getattr(s_ref, name)):
            assert rel_err(a, b) < 1e-9, name
    assert s.position == s_ref.position == (args[0].shape[2] % C)


@pytest.mark.parametrize("impl,depth", FAST)
@pytest.mark.parametrize("C", [1, 3, 16])
def test_fast_path_gradients_equal_naive(impl, depth, C):
    args = make_inputs(L=20, depth=depth, requires_grad=True)
    flat = [*args[:6], *args[6]]
    probe = torch.randn(args[0].shape, dtype=torch.float64)
    grads = {}
    for name in ("naive", impl):
        y, s = memory_scan(*args, chunk_size=C, impl=name)
        # outer loss touches the outputs and the final state, so every path is exercised
        loss = (y * probe).sum() + sum((w ** 2).sum() for w in s.weights) + sum(m.sum() for m in s.momentum)
        grads[name] = torch.autograd.grad(loss, flat)
    for name, a, b in zip(["q", "k", "v", "theta", "eta", "alpha"] + [f"W{i}" for i in range(depth)],
                          grads[impl], grads["naive"]):
        assert rel_err(a, b) < 1e-8, name


def test_chunk_one_is_the_papers_per_token_rule():
    """Eqs. 13-15 written out by hand for a linear memory: M_t = (1-a) M_{t-1} + S_t,
    S_t = eta S_{t-1} - theta grad, grad = k^T (k M - v); retrieval reads M_{t-1}."""
    q, k, v, theta, eta, alpha, init = make_inputs(L=25, depth=1)
    M, S = init[0].clone(), torch.zeros_like(init[0])
    ys = []
    for t in range(q.shape[2]):
        qt, kt, vt = q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]
        ys.append(qt @ M)
        grad = kt.transpose(-1, -2) @ (kt @ M - vt)
        S = eta[:, :, t, None, None] * S - theta[:, :, t, None, None] * grad
        M = (1 - alpha[:, :, t, None, None]) * M + S
    y_paper = torch.cat(ys, dim=2)
    y, state = memory_scan(q, k, v, theta, eta, alpha, init, chunk_size=1, impl="chunked")
    assert rel_err(y, y_paper) < 1e-10
    assert rel_err(state.weights[0], M) < 1e-10


@pytest.mark.parametrize("impl", ["naive", "chunked", "fused"])
@pytest.mark.parametrize("depth", [1, 2])
def test_streaming_in_pieces_equals_one_call(impl, depth):
    args = make_inputs(L=53, depth=depth)
    C = 8
    y_full, s_full = memory_scan(*args, chunk_size=C, impl=impl)
    for cuts in ([20], [3, 11, 37], [1, 8, 9, 30, 52]):         # mid-chunk and on boundaries
        state, ys, bounds = args[6], [], [0, *cuts, 53]
        for a, b in zip(bounds[:-1], bounds[1:]):
            piece = [t[:, :, a:b] for t in args[:6]]
            y, state = memory_scan(*piece, state, chunk_size=C, impl=impl)
            ys.append(y)
        assert rel_err(torch.cat(ys, dim=2), y_full) < 1e-12
        for a, b in zip(state.weights + state.momentum, s_full.weights + s_full.momentum):
            assert rel_err(a, b) < 1e-12
        assert state.position == s_full.position


def test_retrieval_reads_chunk_start_weights():
    """Inside a chunk y_t does not depend on tokens of the same chunk (it reads W_c)."""
    q, k, v, theta, eta, alpha, init = make_inputs(L=16, depth=2)
    y, _ = memory_scan(q, k, v, theta, eta, alpha, init, chunk_size=8)
    v2 = v.clone()
    v2[:, :, 3] += 1.0
    y2, _ = memory_scan(q, k, v2, theta, eta, alpha, init, chunk_size=8)
    assert torch.equal(y[:, :, :8], y2[:, :, :8])
    assert not torch.allclose(y[:, :, 8:], y2[:, :, 8:])
    assert torch.allclose(y[:, :, :8], mlp_forward(init, q[:, :, :8]))


def test_bf16_inputs_keep_fp32_state():
    args = make_inputs(L=20, depth=2, dtype=torch.float32)
    bf = [t.bfloat16() for t in args[:6]]
    y, s = memory_scan(*bf, args[6], chunk_size=8)
    assert y.dtype == torch.bfloat16 and all(w.dtype == torch.float32 for w in s.weights)
    y32, _ = memory_scan(*[t.float() for t in bf], args[6], chunk_size=8)
    assert rel_err(y.float(), y32) < 1e-2


def test_bad_arguments_name_the_argument():
    q, k, v, theta, eta, alpha, init = make_inputs(L=10, depth=2)
    with pytest.raises(MemoryArgumentError, match="chunk_size"):
        memory_scan(q, k, v, theta, eta, alpha, init, chunk_size=0)
    with pytest.raises(MemoryArgumentError, match="^k has shape"):
        memory_scan(q, k[:, :, :5], v, theta, eta, alpha, init)
    with pytest.raises(MemoryArgumentError, match="theta"):
        memory_scan(q, k, v, theta[:, :, :5], eta, alpha, init)
    with pytest.raises(MemoryArgumentError, match=r"init\[0\]"):
        memory_scan(q, k, v, theta, eta, alpha, [init[0][:, :1]] + init[1:])
    with pytest.raises(MemoryArgumentError, match="impl"):
        memory_scan(q, k, v, theta, eta, alpha, init, impl="cuda")
    _, state = memory_scan(q, k, v, theta, eta, alpha, init, chunk_size=4)
    with pytest.raises(MemoryArgumentError, match="chunk_size=8 differs"):
        memory_scan(q, k, v, theta, eta, alpha, state, chunk_size=8)
