"""The memory model f_W and the explicit per-token gradient of its associative loss.

docs/design.md section 3: depth 1 is f(k) = k @ W; depth >= 2 is
f(k) = k + gelu(...gelu(k @ W1) @ W2 ...) @ WL with exact (erf) GELU.
The normalised residual memory (norm = (ln_weight, ln_bias), each [H, d]) is
f(k) = k + ln_weight * LN(g(k)) + ln_bias, g the linear map or the MLP without its skip,
LN without affine (eps 1e-5, biased variance over d).
Weights are lists of [B, H, in, out] tensors; activations are [B, H, n, d].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
LN_EPS = 1e-5

# (ln_weight, ln_bias), each [H, d]: the outer parameters of the normalised residual memory
MemoryNorm = tuple[torch.Tensor, torch.Tensor]


def _per_head(p: torch.Tensor) -> torch.Tensor:
    """[H, d] -> [H, 1, d], broadcasting against [B, H, n, d] activations."""
    return p.unsqueeze(-2)


def layer_norm_parts(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LN(g) over the last dim without affine, and 1/sqrt(var + eps) (kept for its backward)."""
    centred = g - g.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + LN_EPS)
    return centred * rstd, rstd


def layer_norm_backward(grad: torch.Tensor, normed: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """d/dg of <grad, LN(g)>: rstd (grad - mean(grad) - LN(g) mean(grad LN(g)))."""
    return rstd * (grad - grad.mean(-1, keepdim=True) - normed * (grad * normed).mean(-1, keepdim=True))


def gelu_grad(h: torch.Tensor) -> torch.Tensor:
    """d/dh [h * Phi(h)] = Phi(h) + h * phi(h), the exact (erf) GELU's derivative."""
    cdf = 0.5 * (1.0 + torch.erf(h * _INV_SQRT2))
    pdf = torch.exp(-0.5 * h * h) * _INV_SQRT2PI
    return cdf + h * pdf


def mlp_forward(weights: list[torch.Tensor], x: torch.Tensor, norm: MemoryNorm | None = None) -> torch.Tensor:
    """f_W(x) for every token of x: [B, H, n, in] -> [B, H, n, out]."""
    z = x
    for w in weights[:-1]:
        z = F.gelu(z @ w)
    g = z @ weights[-1]
    if norm is not None:
        return x + _per_head(norm[0]) * layer_norm_parts(g)[0] + _per_head(norm[1])
    return g if len(weights) == 1 else x + g


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


def mlp_read(weights: list[torch.Tensor], x: torch.Tensor, norm: MemoryNorm | None = None) -> torch.Tensor:
    """mlp_forward for reads (no update): equal values and gradients, and a depth-2 memory
    keeps one [.., n, hidden] activation for backward instead of two."""
    if norm is not None:
        return mlp_forward(weights, x, norm)
    if len(weights) == 2 and x.shape[:-2] == weights[0].shape[:-2] == weights[1].shape[:-2]:
        return _Read2.apply(x, *weights)
    return mlp_forward(weights, x)


def mlp_grad_factors(
    weights: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, norm: MemoryNorm | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-token gradients of l_t = 1/2 ||f_W(k_t) - v_t||^2, as rank-1 factors.

    For every layer l, grad_{W_l} l_t = left_l[t]^T right_l[t] (an outer product), so a
    weighted sum over tokens is one matmul: sum_t c_t u_t = left^T (c * right).
    Returns [(left_1, right_1), ..., (left_L, right_L)]; no autograd is used here, the
    formulas are the hand-written backward of the MLP (differentiable for the outer loss).
    """
    inputs, pre = [k], []
    z = k
    for w in weights[:-1]:
        h = z @ w
        pre.append(h)
        z = F.gelu(h)
        inputs.append(z)
    g = z @ weights[-1]
    if norm is None:                                  # d l / d g = d l / d f  (a skip adds k)
        err = (g if len(weights) == 1 else k + g) - v
    else:                                             # through f = k + w LN(g) + b
        normed, rstd = layer_norm_parts(g)
        w_ln = _per_head(norm[0])
        err = layer_norm_backward(w_ln * (k + w_ln * normed + _per_head(norm[1]) - v), normed, rstd)
    factors = [(inputs[-1], err)]
    grad_z = err
    for i in range(len(weights) - 2, -1, -1):
        grad_h = (grad_z @ weights[i + 1].transpose(-1, -2)) * gelu_grad(pre[i])
        factors.append((inputs[i], grad_h))
        grad_z = grad_h
    factors.reverse()
    return factors
