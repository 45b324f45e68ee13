"""The SwiGLU gate, silu(g) * u (the FFN's elementwise middle).

`naive` keeps g, silu(g) and u for backward; `swiglu` keeps g and u and recomputes the
sigmoid: one [tokens, hidden] tensor less per FFN (46 MiB at 16k x 704 fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        s = torch.sigmoid(g)
        silu = g * s
        dg = grad * u * s * (1 + g * (1 - s))                  # silu'(g) = s (1 + g (1 - s))
        return dg, grad * silu


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """As naive, saving g and u only."""
    return _SwiGLU.apply(g, u)
