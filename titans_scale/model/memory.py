"""The neural long-term memory layer (docs/design.md section 3; paper Sec. 3.1).

Projections -> causal depthwise conv -> SiLU -> heads, q/k L2-normalised; data-dependent
gates theta (inner lr), eta (momentum), alpha (forgetting); learned initial weights W^0;
memory_scan does the test-time update; the output is W_O(norm(y) * sigmoid(x W_G)).
Every projection's output is laid out head-major ([H, 3, d], [H, 3]) so tensor parallelism
can split heads by slicing rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

from titans_scale.ops.memory import MemoryState, memory_scan
from titans_scale.ops.mlp import mlp_read
from titans_scale.ops.state import state_dtype

from .config import ModelConfig
from .layers import CausalDepthwiseConv, RMSNorm


@dataclass
class MemoryLayerState:
    memory: MemoryState
    conv: torch.Tensor          # [B, kernel-1, 3*H*d] cache of the projections

    def detach(self) -> "MemoryLayerState":
        return MemoryLayerState(self.memory.detach(), self.conv.detach())


pytree.register_dataclass(MemoryLayerState)     # its tensors flatten in a fixed order (torch pytree)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class NeuralMemory(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H, d = cfg.d_model, cfg.resolved_mem_heads, cfg.mem_head_dim
        self.d, self.chunk_size, self.max_lr = d, cfg.chunk_size, cfg.max_lr
        self.recompute_group = cfg.recompute_group or None
        self.impl = "auto"
        self.qkv = nn.Linear(D, 3 * H * d, bias=False)
        self.conv = CausalDepthwiseConv(3 * H * d, cfg.conv_kernel)
        self.gates = nn.Linear(D, 3 * H)               # [H, (theta, eta, alpha)]
        # W^0, shared across the batch (Eq. 12's initial memory), random at 1/sqrt(fan-in). A plain
        # linear memory starts at zero so it first returns nothing; a normalised one cannot (LN of
        # a zero g divides by sqrt(eps): a 300x inner step, docs/long_context.md).
        empty = cfg.mem_depth == 1 and not cfg.mem_norm
        if cfg.mem_depth == 1:
            shapes = [(d, d)]
        else:
            hid = cfg.mem_expansion * d
            shapes = [(d, hid)] + [(hid, hid)] * (cfg.mem_depth - 2) + [(hid, d)]
        self.init_weights = nn.ParameterList(
            [nn.Parameter(torch.randn(H, i, o) / math.sqrt(i) * (0.0 if empty else 1.0))
             for i, o in shapes])
        # The normalised residual memory's outer affine (docs/design.md section 3), per head;
        # trained by the outer loss, never by the inner update.
        self.ln_weight = nn.Parameter(torch.ones(H, d)) if cfg.mem_norm else None
        self.ln_bias = nn.Parameter(torch.zeros(H, d)) if cfg.mem_norm else None
        self.out_norm = RMSNorm(d, cfg.norm_eps)
        self.out_gate = nn.Linear(D, H * d, bias=False)
        self.out = nn.Linear(H * d, D, bias=False)
        # Input of MAC's q-only read, which uses self.qkv's weight directly: identity here;
        # tensor parallelism puts megatron's TP-region entry in its place (parallel/tensor_parallel.py).
        self.q_input = nn.Identity()
        # That read takes the q rows of qkv's weight (a third of the GEMM). A layer that cannot run
        # on a subset of its rows (Transformer Engine's, parallel/tensor_parallel.py) sets this: the
        # read then runs the whole layer and keeps its q rows (the same numbers, 3x the GEMM).
        self.q_rows_from_layer = False
        # The memory op (the update and retrieval of Eqs. 13-15) is a seam: None runs memory_scan;
        # context parallelism puts one here that runs on a rank's shard of the sequence.
        self.scan_fn = None
        self.reset_gates(cfg.init_std)

    @torch.no_grad()
    def reset_gates(self, std: float) -> None:
        """Gates start so the memory keeps what it stores over thousands of tokens and the
        inner step stays small (docs/design.md section 3): alpha = 1e-4 per token (78% of a stored value
        survives 2048 tokens of forgetting; alpha = e^-5 would keep 1e-6 of it), eta = 0.9,
        theta = max_lr * sigmoid(-2). Inside a chunk every gradient is taken at W_c and the
        momentum sums them, so one chunk moves W by about theta * C / (1 - eta) times a
        gradient: with theta ~ 1e-3 that stays below 1 for C = 64."""
        nn.init.normal_(self.gates.weight, std=std)
        b = self.gates.bias.view(-1, 3)
        b[:, 0], b[:, 1], b[:, 2] = -2.0, _logit(0.9), _logit(1e-4)

    # -- pieces, used alone by MAC --------------------------------------------------------
    def project(self, x: torch.Tensor, cache: torch.Tensor | None, parts: int = 3):
        """x [B, L, D] -> the first `parts` of (q, k, v) as [B, H, L, d] and the conv cache.
        parts=1 computes q only (its rows of the projection and conv)."""
        B, L, _ = x.shape
        d = self.d
        if parts == 3:            # through the module, so FP8 / TP layer swaps apply
            h, cache = self.conv(self.qkv(x), cache)
        else:                     # MAC's q-only read: the q rows of the projection and conv
            w, cw, cb = self.qkv.weight, self.conv.weight, self.conv.bias
            H = w.shape[0] // (3 * d)
            cw = cw.view(H, 3, d, -1)[:, :parts].reshape(H * parts * d, -1)
            cb = cb.view(H, 3, d)[:, :parts].reshape(-1)
            if self.q_rows_from_layer:    # the layer enters its TP region itself: no q_input
                h = self.qkv(x).view(B, L, H, 3, d)[:, :, :, :parts].reshape(B, L, H * parts * d)
            else:
                h = F.linear(self.q_input(x), w.view(H, 3, d, -1)[:, :parts].reshape(H * parts * d, -1))
            h, cache = self.conv(h, cache, cw, cb)
        # unbind, not indexing: its backward writes one contiguous gradient, not `parts` zero-filled ones
        h = [x.transpose(1, 2) for x in F.silu(h).view(B, L, -1, parts, d).unbind(3)]   # [B, H, L, d] each
        out = [F.normalize(x, dim=-1) for x in h[:2]] + h[2:]    # q, k normalised; v as is
        return out, cache

    def gate_values(self, x: torch.Tensor):
        return self.gates_from(self.gates(x))

    def gates_from(self, g: torch.Tensor):
        """(theta, eta, alpha) [B, H, L] each from the gate projection's output g [B, L, H*3]."""
        g = torch.sigmoid(g.to(state_dtype(g)))              # [B, L, H*3], fp32 or wider
        g = g.view(*g.shape[:2], -1, 3).permute(3, 0, 2, 1)  # [3, B, H, L]
        return self.max_lr * g[0], g[1], g[2]

    def initial_state(self, batch: int, device=None, before: torch.Tensor | None = None) -> MemoryLayerState:
        """The memory W^0 and an empty conv cache; with `before` [B, n, D], the n <= kernel-1
        inputs just before the stream, the cache holds their projections (zero rows for the
        positions before those, as at a sequence start: the projection has no bias)."""
        w0 = [w.to(state_dtype(w)).unsqueeze(0).expand(batch, *w.shape) for w in self.init_weights]
        k = self.conv.kernel - 1
        if before is None or k == 0:
            conv = torch.zeros(batch, k, self.qkv.weight.shape[0],
                               device=device or w0[0].device, dtype=self.qkv.weight.dtype)
        else:
            conv = self.qkv(torch.cat([before.new_zeros(batch, k - before.shape[1], before.shape[2]), before], 1))
        return MemoryLayerState(MemoryState.fresh(w0, self.chunk_size), conv)

    def norm(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(ln_weight, ln_bias) in the state's precision, or None for the plain memory."""
        if self.ln_weight is None:
            return None
        return self.ln_weight.to(dtype), self.ln_bias.to(dtype)

    def read(self, weights: list[torch.Tensor], q: torch.Tensor) -> torch.Tensor:
        """f_W(q) without an update (the retrieval M*(q) of Eq. 15), in the state's precision."""
        return mlp_read(weights, q.to(weights[0].dtype), self.norm(weights[0].dtype))

    def output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """W_O(norm(y) * sigmoid(x W_G)); y: [B, H, L, d] retrieved, x: [B, L, D] gate input."""
        B, H, L, d = y.shape
        y = self.out_norm(y.to(x.dtype)).transpose(1, 2).reshape(B, L, H * d)
        return self.out(y * torch.sigmoid(self.out_gate(x)))

    def scan(self, x: torch.Tensor, state: MemoryLayerState, projected=None):
        """Read and update the memory with x [B, L, D]; returns retrieved y [B, H, L, d].
        `projected`: project(x, state.conv)'s result, when the caller needed q before the update (MAC)."""
        (q, k, v), conv = projected or self.project(x, state.conv)
        theta, eta, alpha = self.gate_values(x)
        scan = self.scan_fn or memory_scan
        norm = {} if self.ln_weight is None else {"ln_weight": self.ln_weight, "ln_bias": self.ln_bias}
        y, mem = scan(q, k, v, theta, eta, alpha, state.memory, self.chunk_size, impl=self.impl,
                      recompute_group=self.recompute_group, **norm)
        return y, MemoryLayerState(mem, conv)

    def forward(self, x: torch.Tensor, state: MemoryLayerState | None = None):
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        y, state = self.scan(x, state)
        return self.output(y, x), state
