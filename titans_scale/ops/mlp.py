"""The memory model f_W and the explicit per-token gradient of its associative loss.

docs/design.md section 3: depth 1 is f(k) = k @ W; depth >= 2 is
f(k) = k + gelu(...gelu(k @ W1) @ W2 ...) @ WL with exact (erf) GELU.
Weights are lists of [B, H, in, out] tensors; activations are [B, H, n, d].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_grad(h: torch.Tensor) -> torch.Tensor:
    """d/dh [h * Phi(h)] = Phi(h) + h * phi(h), the exact (erf) GELU's derivative."""
    cdf = 0.5 * (1.0 + torch.erf(h * _INV_SQRT2))
    pdf = torch.exp(-0.5 * h * h) * _INV_SQRT2PI
    return cdf + h * pdf


def mlp_forward(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """f_W(x) for every token of x: [B, H, n, in] -> [B, H, n, out]."""
    if len(weights) == 1:
        return x @ weights[0]
    z = x
    for w in weights[:-1]:
        z = F.gelu(z @ w)
    return x + z @ weights[-1]


class _Read2(torch.autograd.Function):
    """f(x) = x + gelu(x W1) W2 keeping x, h = x W1 and the weights for backward, not also
    gelu(h): autograd would keep both [.., n, hidden] tensors (MAC reads the memory every
    segment; at 16k tokens that is ~100 MiB per memory layer)."""

    @staticmethod
    def forward(ctx, x, w1, w2):
        h = x @ w1
        ctx.save_for_backward(x, w1, w2, h)
        return x + F.gelu(h) @ w2                     # as mlp_forward computes it: equal bits

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, h = ctx.saved_tensors
        z = F.gelu(h)
        dh = torch.ops.aten.gelu_backward(dy @ w2.transpose(-1, -2), h)
        dx = dy + dh @ w1.transpose(-1, -2)
        dw1 = x.transpose(-1, -2) @ dh
        dw2 = z.transpose(-1, -2) @ dy
        return dx, dw1, dw2


def mlp_read(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """mlp_forward for reads (no update): equal values and gradients, and a depth-2 memory
    keeps one [.., n, hidden] activation for backward instead of two."""
    if len(weights) == 2 and x.shape[:-2] == weights[0].shape[:-2] == weights[1].shape[:-2]:
        return _Read2.apply(x, *weights)
    return mlp_forward(weights, x)


def mlp_grad_factors(
    weights: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-token gradients of l_t = 1/2 ||f_W(k_t) - v_t||^2, as rank-1 factors.

    For every layer l, grad_{W_l} l_t = left_l[t]^T right_l[t] (an outer product), so a
    weighted sum over tokens is one matmul: sum_t c_t u_t = left^T (c * right).
    Returns [(left_1, right_1), ..., (left_L, right_L)]; no autograd is used here, the
    formulas are the hand-written backward of the MLP (differentiable for the outer loss).
    """
    if len(weights) == 1:
        return [(k, k @ weights[0] - v)]
    inputs, pre = [k], []
    z = k
    for w in weights[:-1]:
        h = z @ w
        pre.append(h)
        z = F.gelu(h)
        inputs.append(z)
    err = k + z @ weights[-1] - v                     # d l / d f  (the skip adds k)
    factors = [(inputs[-1], err)]
    grad_z = err
    for i in range(len(weights) - 2, -1, -1):
        grad_h = (grad_z @ weights[i + 1].transpose(-1, -2)) * gelu_grad(pre[i])
        factors.append((inputs[i], grad_h))
        grad_z = grad_h
    factors.reverse()
    return factors
