"""The token mixers of a Titans block (docs/design.md section 4; paper Sec. 4).

Every mixer maps (x, state, pos0) -> (out, state): x [B, L, D] are normalised inputs whose
first token sits at absolute position pos0; the state lets a long document be fed in pieces
and give exactly the outputs of one call. Attention states keep the raw inputs still in
view (the window's tail or the current partial segment) and recompute from them: exact,
and simple enough to trust.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

from .attention import Attention
from .config import ModelConfig
from .layers import RMSNorm
from .memory import MemoryLayerState, NeuralMemory


def _tail(state, x):
    return x[:, :0] if state is None else state


def _attention(cfg: ModelConfig) -> Attention:
    return Attention(cfg.d_model, cfg.n_heads, cfg.n_persistent, cfg.rope_base, cfg.init_std)


class SlidingWindow(nn.Module):
    """swa: sliding-window causal attention with a persistent-token prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn, self.window = _attention(cfg), cfg.window

    def forward(self, x, state, pos0):
        xx = torch.cat([_tail(state, x), x], dim=1)
        out = self.attn.sliding(xx, pos0 + x.shape[1] - xx.shape[1], x.shape[1], self.window)
        return out, xx[:, max(0, xx.shape[1] - (self.window - 1)):]


class FullAttention(nn.Module):
    """attn: plain causal attention over everything so far (the dense Transformer baseline)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = _attention(cfg)

    def forward(self, x, state, pos0):
        xx = torch.cat([_tail(state, x), x], dim=1)
        return self.attn.causal(xx, pos0 + x.shape[1] - xx.shape[1], x.shape[1]), xx


class SegmentAttention(nn.Module):
    """seg: causal attention inside fixed segments (MAC with its memory switched off)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn, self.segment = _attention(cfg), cfg.segment_len

    def forward(self, x, state, pos0):
        xx = torch.cat([_tail(state, x), x], dim=1)       # starts on a segment boundary
        out = self.attn.segments(xx, pos0 + x.shape[1] - xx.shape[1], self.segment)
        return out[:, -x.shape[1]:], xx[:, xx.shape[1] - xx.shape[1] % self.segment:]


class LMM(nn.Module):
    """lmm: the memory alone, out = W_O(norm(y) * sigmoid(x W_G))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.memory = NeuralMemory(cfg)

    def forward(self, x, state, pos0):
        return self.memory(x, state)


@dataclass
class MAGState:
    tail: torch.Tensor
    memory: MemoryLayerState


@dataclass
class MALState:
    memory: MemoryLayerState
    tail: torch.Tensor             # the memory outputs still in the window


class MAG(nn.Module):
    """mag: o = norm(SWA(x)) * sigmoid(norm(M(x))) (paper Eqs. 26-28), + M(x) with model.mem_residual
    (the default; without it the read only gates attention and MAG does not learn recall)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swa = SlidingWindow(cfg)
        self.memory = NeuralMemory(cfg)
        self.norm_y, self.norm_m = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.residual = cfg.mem_residual

    def forward(self, x, state, pos0):
        y, tail = self.swa(x, state and state.tail, pos0)
        m, mem = self.memory(x, state and state.memory)
        o = self.norm_y(y) * torch.sigmoid(self.norm_m(m))
        return (o + m if self.residual else o), MAGState(tail, mem)


class MAL(nn.Module):
    """mal: the memory as a layer, then sliding-window attention on its output (Eqs. 29-31);
    with model.mem_attn_norm that output is RMS-normed first; model.mem_residual (default) adds M(x) to the
    output (without it MAL does not learn recall)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.memory = NeuralMemory(cfg)
        self.swa = SlidingWindow(cfg)
        self.m_norm, self.residual = cfg.mem_attn_norm, cfg.mem_residual

    def forward(self, x, state, pos0):
        m, mem = self.memory(x, state and state.memory)
        a = F.rms_norm(m, m.shape[-1:]) if self.m_norm else m   # attention's input at a normed stream's scale
        y, tail = self.swa(a, state and state.tail, pos0)
        return (y + m if self.residual else y), MALState(mem, tail)


@dataclass
class MACState:
    memory: MemoryLayerState       # memory (and conv of the stream it stores) at the current segment's start
    conv_x: torch.Tensor           # conv cache of the x stream (queries for h) at that start, when the
                                   # memory stores y (storing x, the memory's own cache is that stream's)
    tail: torch.Tensor             # inputs of the current, unfinished segment


for _state in (MAGState, MALState, MACState):   # flatten to their tensors in a fixed order (torch pytree)
    pytree.register_dataclass(_state)


class MAC(nn.Module):
    """mac: memory as context (paper Eqs. 21-25). Per segment s:
    h = f_{W before s}(q(x_s)); y = Attn([persistent || h || x_s]);
    the memory is updated chunk by chunk and read back, o = y (x) M(.) (Eqs. 24-25).
    The defaults depart from the paper where it does not learn recall (docs/design.md section 4):
    model.mac_memory_input = "input" stores x_s (paper: y), model.mac_output = "add" is o = y + M(x_s)
    (paper: the gate y * sigmoid(M(y))), model.mem_residual adds h to o. With mem_attn_norm, h and
    a stored y are RMS-normed."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn, self.segment = _attention(cfg), cfg.segment_len
        self.memory = NeuralMemory(cfg)
        self.norm, self.combine, self.residual = cfg.mem_attn_norm, cfg.mac_output, cfg.mem_residual
        self.store_input = cfg.mac_memory_input == "input"

    def initial_state(self, x: torch.Tensor) -> MACState:
        """The state before a sequence's first token (x: a piece of it, for batch, device, dtype)."""
        mem = self.memory.initial_state(x.shape[0], x.device)
        conv_x = mem.conv.new_zeros(*mem.conv.shape[:2], mem.conv.shape[2] // 3)     # q's rows: a third
        return MACState(mem, conv_x, x[:, :0])

    def forward(self, x, state, pos0):
        state = state or self.initial_state(x)
        xx = torch.cat([state.tail, x], dim=1)
        start = pos0 + x.shape[1] - xx.shape[1]
        mem, conv_x, outs = state.memory, state.conv_x, []
        # split, not slicing: each slice's backward would zero-fill a gradient the size of xx
        # (O(L^2 / segment) work over a sequence); split's backward concatenates once
        for i, xs in enumerate(xx.split(self.segment, dim=1)):
            s0 = i * self.segment
            if self.store_input:  # the update projects x_s too: one projection serves both
                projected = self.memory.project(xs, mem.conv)
                q, conv_x_next = projected[0][0], conv_x
            else:                 # the read projects x_s, the update y: q's rows alone here
                (q,), conv_x_next = self.memory.project(xs, conv_x, parts=1)
                projected = None
            r = self.memory.output(self.memory.read(mem.memory.chunk_start, q), xs)  # Eq. 21
            # h at the scale of the (RMS-normed) segment tokens it joins
            h = F.rms_norm(r, r.shape[-1:]) if self.norm else r
            y = self.attn.segments(xs, start + s0, self.segment, h)                      # Eqs. 22-23
            if self.store_input:  # the memory stores the segment's inputs (as titans-pytorch does)
                ym = xs
            else:                 # Eq. 24: it stores y, at the scale of its other inputs (a normed
                # stream): a raw attention output is ~1e-2 at init, its values ~1e-4 against f's k of norm 1
                ym = F.rms_norm(y, y.shape[-1:]) if self.norm else y
            m, mem_next = self.memory.scan(ym, mem, projected)                            # Eq. 24
            g = self.memory.output(m, ym)
            o = (y * torch.sigmoid(g) if self.combine == "gate" else                        # Eq. 25
                 y * g if self.combine == "product" else y + g)
            outs.append(o + r if self.residual else o)
            if xs.shape[1] == self.segment:       # a finished segment moves the state on
                mem, conv_x = mem_next, conv_x_next
        tail = xx[:, xx.shape[1] - xx.shape[1] % self.segment:]
        return torch.cat(outs, dim=1)[:, -x.shape[1]:], MACState(mem, conv_x, tail)


MIXER_CLASSES = {"swa": SlidingWindow, "attn": FullAttention, "seg": SegmentAttention,
                 "lmm": LMM, "mag": MAG, "mal": MAL, "mac": MAC}
