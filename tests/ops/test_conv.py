"""The causal depthwise conv (ops/conv.py): shifted multiply-adds equal F.conv1d."""

import pytest
import torch

from titans_scale.ops import conv
from tests.helpers import rel_err


@pytest.mark.parametrize("K", [1, 2, 4, 8])
def test_shifted_equals_conv1d_with_gradients(K):
    g = torch.Generator().manual_seed(K)
    x = torch.randn(2, 29 + K - 1, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, K, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 29, 12, generator=g, dtype=torch.float64)
    outs = {}
    for name, f in (("naive", conv.naive), ("shifted", conv.shifted)):
        y = f(x, w, b)
        outs[name] = (y, *torch.autograd.grad((y * probe).sum(), (x, w, b)))
    for what, a, ref in zip(("y", "dx", "dw", "db"), outs["shifted"], outs["naive"]):
        assert a.shape == ref.shape and rel_err(a, ref) < 1e-12, what


def test_follows_the_input_dtype():
    x = torch.randn(1, 10, 4, dtype=torch.bfloat16)
    y = conv.shifted(x, torch.randn(4, 3), torch.randn(4))
    assert y.dtype == torch.bfloat16 and y.shape == (1, 8, 4)
