"""Causal depthwise convolution over time in [B, T, C] layout (the memory's q/k/v conv).

    out[b, t, c] = bias[c] + sum_j weight[c, j] * x[b, t + j, c]      t < T - K + 1

x already holds the K-1 tokens of left context (cache or zeros). `naive` is F.conv1d
(channels-first: two transposing copies of the activations each way); `shifted` is K
multiply-adds on contiguous time-shifted views with a hand-written backward: same result,
no layout change, about a tenth of the time at 4k x 768 on a CPU core.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [B, T, C], weight [C, K], bias [C] -> [B, T-K+1, C] via F.conv1d."""
    return F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, groups=weight.shape[0]).transpose(1, 2)


class _Shifted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        K = weight.shape[1]
        n = x.shape[1] - K + 1
        out = torch.addcmul(bias, x[:, :n], weight[:, 0])
        for j in range(1, K):
            out.addcmul_(x[:, j:j + n], weight[:, j])
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        K = weight.shape[1]
        n = g.shape[1]
        g = g.contiguous()
        dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        dw = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for j in range(K):
            if dx is not None:
                dx[:, j:j + n].addcmul_(g, weight[:, j])
            if dw is not None:
                dw[:, j] = (g * x[:, j:j + n]).sum((0, 1))
        db = g.sum((0, 1)) if ctx.needs_input_grad[2] else None
        return dx, dw, db


def shifted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """As naive, computed in place on the [B, T, C] layout."""
    return _Shifted.apply(x, weight.to(x.dtype), bias.to(x.dtype))
