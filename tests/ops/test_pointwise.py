"""RMSNorm and the SwiGLU gate: the memory-saving autograd functions equal the formulas."""

import pytest
import torch

from titans_scale.ops import rmsnorm, swiglu
from tests.helpers import rel_err


def _grads(f, inputs, probe):
    out = f(*inputs)
    return (out, *torch.autograd.grad((out * probe).sum(), [t for t in inputs if t.requires_grad]))


def test_rms_norm_equals_formula_with_gradients():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 17, 24, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    w = torch.randn(24, generator=g, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(3, 17, 24, generator=g, dtype=torch.float64)
    ref = _grads(lambda a, b: rmsnorm.naive(a, b, 1e-6), (x, w), probe)
    got = _grads(lambda a, b: rmsnorm.rms_norm(a, b, 1e-6), (x, w), probe)
    for name, a, b in zip(("y", "dx", "dw"), got, ref):
        assert rel_err(a, b) < 1e-12, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_keeps_the_formulas_dtypes(dtype):
    x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    y, y_ref = rmsnorm.rms_norm(x, w, 1e-6), rmsnorm.naive(x, w, 1e-6)
    assert y.dtype == y_ref.dtype and torch.allclose(y, y_ref)
    y.sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32


def _full_width_saved(f, *inputs, numel: int | None = None) -> int:
    """Distinct tensors of the first input's size (or of `numel` elements) that autograd keeps
    for f's backward."""
    size = numel or inputs[0].numel()
    storages = set()
    def pack(t):
        if t.numel() == size:
            storages.add(t.untyped_storage().data_ptr())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(*inputs)
    return len(storages)


def test_fused_forms_keep_one_tensor_less():
    x, w = torch.randn(64, 32, requires_grad=True), torch.ones(32, requires_grad=True)
    assert _full_width_saved(lambda a, b: rmsnorm.naive(a, b, 1e-6), x, w) == 2
    assert _full_width_saved(lambda a, b: rmsnorm.rms_norm(a, b, 1e-6), x, w) == 1
    u = torch.randn(64, 32, requires_grad=True)
    assert _full_width_saved(swiglu.naive, x, u) == 3
    assert _full_width_saved(swiglu.swiglu, x, u) == 2


def test_swiglu_equals_formula_with_gradients():
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(5, 33, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    b = torch.randn(5, 33, generator=g, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(5, 33, generator=g, dtype=torch.float64)
    for name, x, y in zip(("y", "dg", "du"), _grads(swiglu.swiglu, (a, b), probe), _grads(swiglu.naive, (a, b), probe)):
        assert rel_err(x, y) < 1e-12, name


def test_memory_read_equals_mlp_forward_and_keeps_one_hidden_tensor():
    """ops/mlp.mlp_read (MAC's per-segment read) == mlp_forward, values and gradients in
    float64, and it keeps one [.., n, hidden] tensor for backward where autograd keeps two."""
    from titans_scale.ops import mlp

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w1 = (torch.randn(2, 3, 8, 32, generator=g, dtype=torch.float64) / 3).requires_grad_(True)
    w2 = (torch.randn(2, 3, 32, 8, generator=g, dtype=torch.float64) / 6).requires_grad_(True)
    probe = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64)
    ref = _grads(lambda a, b, c: mlp.mlp_forward([b, c], a), (x, w1, w2), probe)
    got = _grads(lambda a, b, c: mlp.mlp_read([b, c], a), (x, w1, w2), probe)
    for name, a, b in zip(("y", "dx", "dw1", "dw2"), got, ref):
        assert rel_err(a, b) < 1e-12, name

    hidden = 2 * 3 * 9 * 32                                    # an [.., n, hidden] activation
    saved = lambda f: _full_width_saved(lambda a, b, c: f([b, c], a), x, w1, w2, numel=hidden)  # noqa: E731
    assert saved(mlp.mlp_forward) == 2 and saved(mlp.mlp_read) == 1
