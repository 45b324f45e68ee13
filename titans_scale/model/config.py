"""The model's hyper-parameters: one typed dataclass, checked before anything is built."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from titans_scale.errors import ConfigError

MemoryMixer = Literal["mac", "mag", "mal", "lmm"]
AttentionMixer = Literal["swa", "seg", "attn"]   # memory-off baselines: sliding window, segments, full
Mixer = Literal[MemoryMixer, AttentionMixer]
MacOutput = Literal["gate", "product", "add"]
MacMemoryInput = Literal["attention", "input"]
MEMORY_MIXERS = typing.get_args(MemoryMixer)
ATTENTION_MIXERS = typing.get_args(AttentionMixer)
MIXERS = typing.get_args(Mixer)


class ModelConfigError(ConfigError):
    """A bad model hyper-parameter; the message names the field and the fix."""


@dataclass
class ModelConfig:
    vocab_size: int = 259                 # byte tokenizer: 256 bytes + bos/eos/pad
    d_model: int = 256
    n_heads: int = 4                      # attention heads
    layers: list[Mixer] = field(default_factory=lambda: ["swa", "mag", "swa", "mag"])
    mlp_hidden: int = 0                   # SwiGLU width; 0 = 8/3 * d_model rounded up to 32
    # neural memory (docs/design.md section 3)
    mem_heads: int = 0                    # 0 = n_heads
    mem_depth: int = 2
    mem_expansion: int = 4
    chunk_size: int = 64
    max_lr: float = 0.01                  # bound on the inner learning rate theta
    mem_norm: bool = True                 # normalised residual memory f(k) = k + w LN(g(k)) + b (false: f = k + g(k))
    conv_kernel: int = 4
    recompute_group: int = 0              # memory op keeps one state per g chunks in backward (0 = all)
    # attention (docs/design.md section 4)
    window: int = 128                     # sliding window (swa, mag, mal), tokens seen incl. self
    segment_len: int = 128                # mac / seg segment length, a multiple of chunk_size
    n_persistent: int = 4
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    # how the memory meets attention (docs/long_context.md, "What made MAG, MAL and MAC recall").
    # The defaults are the forms that learn recall; the paper's forms are mem_residual = false,
    # mac_memory_input = "attention", mac_output = "gate" (with them no variant recalls, measured)
    mem_attn_norm: bool = True            # RMS-normalise memory reads entering attention (MAC's h, MAL's M(x))
    mac_output: MacOutput = "add"         # MAC Eq. 25 o = y (x) M(.): "add" y + M(.) (the read joins the residual
                                          # stream), "gate" y*sigmoid(M(y)) (the paper's), "product" y*M(y)
    mac_memory_input: MacMemoryInput = "input"  # what MAC's memory stores and reads in Eqs. 24-25: the
                                          # segment's inputs x (as titans-pytorch) or the attention output y (paper)
    mem_residual: bool = True             # also add the memory's read to the layer's output: M(x) (MAG, MAL),
                                          # MAC's retrieved h (Eq. 21); false: the paper's forms

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # `resolved_x` is field x with its 0 ("derive it") replaced by the derived value
    @property
    def resolved_mem_heads(self) -> int:
        return self.mem_heads or self.n_heads

    @property
    def mem_head_dim(self) -> int:
        return self.d_model // self.resolved_mem_heads

    @property
    def resolved_mlp_hidden(self) -> int:
        """The SwiGLU width: mlp_hidden, or 8/3 * d_model rounded up to a multiple of 32."""
        return self.mlp_hidden or 32 * -(-(8 * self.d_model // 3) // 32)

    @property
    def has_memory(self) -> bool:
        return any(m in MEMORY_MIXERS for m in self.layers)

    def validate(self) -> None:
        def bad(field_name, msg):
            raise ModelConfigError(f"model.{field_name}: {msg}")

        for name in ("vocab_size", "d_model", "n_heads", "mem_depth", "mem_expansion", "chunk_size",
                     "conv_kernel", "window", "segment_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, f"must be a positive integer, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            bad("n_heads", f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.d_model % self.resolved_mem_heads:
            bad("mem_heads", f"mem_heads={self.resolved_mem_heads} must divide d_model={self.d_model}")
        if self.head_dim % 2:
            bad("n_heads", f"head_dim d_model/n_heads={self.head_dim} must be even for RoPE")
        if not self.layers:
            bad("layers", "needs at least one layer, e.g. [\"swa\", \"mag\"]")
        for i, m in enumerate(self.layers):
            if m not in MIXERS:
                bad(f"layers[{i}]", f"unknown mixer {m!r}; choose from {', '.join(MIXERS)}")
        if self.segment_len % self.chunk_size:
            bad("segment_len", f"segment_len={self.segment_len} must be a multiple of "
                f"chunk_size={self.chunk_size} (MAC reads the memory at segment starts)")
        if not 0 < self.max_lr <= 1:
            bad("max_lr", f"must be in (0, 1], got {self.max_lr} (the inner step must stay bounded)")
        if self.mac_output not in typing.get_args(MacOutput):
            bad("mac_output", f"unknown {self.mac_output!r}; choose from {', '.join(typing.get_args(MacOutput))}")
        if self.mac_memory_input not in typing.get_args(MacMemoryInput):
            bad("mac_memory_input", f"unknown {self.mac_memory_input!r}; choose from "
                f"{', '.join(typing.get_args(MacMemoryInput))}")
        if self.n_persistent < 0:
            bad("n_persistent", f"must be >= 0, got {self.n_persistent}")
