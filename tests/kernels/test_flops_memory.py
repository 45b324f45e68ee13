"""The FLOP and byte counts the kernel benchmark reports (titans_scale/flops_memory.py)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from titans_scale import flops_memory as fm
from titans_scale.ops.chunked import chunk_step, decay_coefficients
from tests.helpers import make_inputs


@pytest.mark.parametrize("depth,E,C,d", [(1, 1, 16, 8), (1, 1, 64, 32), (2, 4, 16, 8), (2, 3, 8, 16)])
def test_flops_equal_torch_flop_counter_of_chunk_step(depth, E, C, d):
    q, k, v, th, et, al, init = make_inputs(B=1, H=1, L=C, d=d, depth=depth, expansion=E,
                                            dtype=torch.float32, requires_grad=True)
    coefs = [c.detach().requires_grad_(True) for c in decay_coefficients(th, et, al)]
    s0 = [torch.zeros_like(w, requires_grad=True) for w in init]
    with FlopCounterMode(display=False) as fwd:
        y, w, s = chunk_step(init, init, s0, q, k, v, coefs)
    with FlopCounterMode(display=False) as bwd:
        (y.sum() + sum(x.sum() for x in w + s)).backward()
    assert fm.chunk_flops_fwd(C, d, depth, E) == fwd.get_total_flops()
    assert fm.chunk_flops_bwd(C, d, depth, E) == bwd.get_total_flops()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_forward_bytes_are_the_tensors_it_touches(dtype):
    """Depth 1 keeps the state in registers: one chunk moves q, k, v, y, the coefficients
    and one saved (W, S) pair, nothing else."""
    C, d, d_out = 16, 8, 12
    tensors = [torch.empty(C, d, dtype=dtype), torch.empty(C, d, dtype=dtype), torch.empty(C, d_out, dtype=dtype),
               torch.empty(C, d_out), torch.empty(C), torch.empty(C), torch.empty(3),
               torch.empty(d, d_out), torch.empty(d, d_out)]
    want = sum(t.numel() * t.element_size() for t in tensors)
    assert fm.chunk_bytes_fwd(C, d, 1, d_out=d_out, in_bytes=torch.empty(0, dtype=dtype).element_size()) == want


def test_bytes_follow_recompute_and_dtype():
    C, d, E = 64, 64, 4
    w = fm.state_numel(d, 2, E) * 4
    assert w == 2 * 64 * 256 * 4
    # saving one state in g chunks removes (1 - 1/g) of the saved-state writes
    assert fm.chunk_bytes_fwd(C, d, 2, E, save_stride=1) - fm.chunk_bytes_fwd(C, d, 2, E, save_stride=8) \
        == pytest.approx(2 * w * (1 - 1 / 8))
    # bf16 inputs halve the bytes of q, k, v only
    assert fm.chunk_bytes_fwd(C, d, 2, E, in_bytes=4) - fm.chunk_bytes_fwd(C, d, 2, E, in_bytes=2) == 3 * C * d * 2
    # recompute reruns the forward (without y) inside backward
    assert fm.chunk_bytes_bwd(C, d, 2, E, save_stride=4) - fm.chunk_bytes_bwd(C, d, 2, E, save_stride=1) \
        == pytest.approx(fm.chunk_bytes_fwd(C, d, 2, E) - C * d * 4)


def test_scan_cost_totals():
    cost = fm.scan_cost(L=4096, C=64, d=64, heads=4, batch=2, depth=2, expansion=4, recompute_group=8)
    n = 2 * 4 * 64
    assert cost.flops_fwd == n * fm.chunk_flops_fwd(64, 64, 2, 4)
    assert cost.flops == cost.flops_fwd * 3
    assert cost.bytes_bwd == n * fm.chunk_bytes_bwd(64, 64, 2, 4, save_stride=8)
    with pytest.raises(ValueError, match="depth"):
        fm.state_numel(8, 3)
