"""Small building blocks: RMSNorm, SwiGLU, RoPE, the causal depthwise conv."""

from __future__ import annotations

import torch
import torch.nn as nn

from titans_scale.ops import conv as conv_ops
from titans_scale.ops.rmsnorm import rms_norm
from titans_scale.ops.swiglu import swiglu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)        # statistics in >= fp32 (ops/rmsnorm.py)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(swiglu(self.w_gate(x), self.w_up(x)))


def rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding (rotate-half form). x: [B, h, L, dh]; positions: [L] absolute."""
    dh = x.shape[-1]
    inv = base ** (-torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh)
    ang = positions.to(torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalDepthwiseConv(nn.Module):
    """Depthwise conv over time that only looks back; streams with a (kernel-1)-token cache."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.impl = "shifted"       # or "naive" (F.conv1d; the FLOP-counter tests read it)
        self.weight = nn.Parameter(torch.randn(channels, kernel) / kernel)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None, weight=None, bias=None):
        """x: [B, L, C]; cache: [B, kernel-1, C] of the previous inputs (zeros at the start).

        weight/bias override the parameters with a channel slice of them (MAC reads q only).
        Returns the conv output [B, L, C] and the new cache.
        """
        w = self.weight if weight is None else weight
        b = self.bias if bias is None else bias
        if cache is None:
            cache = x.new_zeros(x.shape[0], self.kernel - 1, x.shape[2])
        xx = torch.cat([cache, x], dim=1)
        out = getattr(conv_ops, self.impl)(xx, w, b)
        return out, xx[:, xx.shape[1] - (self.kernel - 1):]
