"""TitansLM: a stack of pre-norm residual blocks whose mixers the config's layer pattern picks.

    x += mixer(RMSNorm(x));  x += SwiGLU(RMSNorm(x))          (docs/design.md section 4)

forward(tokens, state) -> (logits, state): pass the returned state back with the next piece
of a document and the outputs equal one call on the whole document.
forward(tokens, cu_seqlens=...) -> (logits, None): packed rows of several documents (document
starts in the flattened batch, ops/varlen.py); every document gives exactly its logits alone.
One seam does it for every mixer: Block re-lays the mixer's input one document per row (a few
length buckets, no per-document loop), runs the mixer unchanged on them as fresh sequences from
position 0 (memory from W^0, own chunk and segment grids, conv and attention within the
document, persistent tokens seen by all) and lays the outputs back. Norms and the FFN are
per token and need nothing.

Parallelism reuses this code from outside (parallel/): a Block's seams (``mixer_in``,
``mixer_out``, ``ffn_in``; identities here) take tensor/sequence-parallel layout changes, and a
pipeline stage is a pruned TitansLM: no embedding (it reads hidden states), no final norm and
head (it returns hidden states), blocks kept under their global index (same parameter names).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from titans_scale.ops.varlen import Documents, PackedBatchError

from .config import ModelConfig
from .layers import RMSNorm, SwiGLU
from .mixers import MIXER_CLASSES


@dataclass
class ModelState:
    position: int = 0                                  # tokens consumed so far
    layers: list = field(default_factory=list)         # one mixer state per layer


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mixer: str):
        super().__init__()
        self.kind = mixer
        self.norm_mix = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MIXER_CLASSES[mixer](cfg)
        self.norm_ffn = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.resolved_mlp_hidden)
        # Seams for tensor/sequence parallelism (parallel/tensor_parallel.py swaps them): the
        # mixers take whole batch-first sequences; a TP residual stream is sequence-first and
        # may be split along the sequence.
        self.mixer_in, self.mixer_out, self.ffn_in = nn.Identity(), nn.Identity(), nn.Identity()

    def forward(self, x, state, pos0, docs: Documents | None = None):
        h = self.mixer_in(self.norm_mix(x))
        if docs is None:
            h, state = self.mixer(h, state, pos0)
        else:       # packed rows: each document is a fresh sequence (module docstring)
            h = docs.map(lambda rows: self.mixer(rows, None, 0)[0], h)
        x = x + self.mixer_out(h)
        return x + self.ffn(self.ffn_in(self.norm_ffn(x))), state


class TitansLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # keyed by global index ("blocks.3.…", as a ModuleList names them): a pipeline stage
        # keeps some of them under the same names
        self.blocks = nn.ModuleDict({str(i): Block(cfg, m) for i, m in enumerate(cfg.layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith(("qkv.weight", "w_gate.weight", "w_up.weight", "out_gate.weight", "embed.weight",
                              "head.weight")):
                nn.init.normal_(p, std=std)
            elif name.endswith(("out.weight", "w_down.weight")):     # residual outputs, GPT-2 style
                nn.init.normal_(p, std=std / (2 * len(self.blocks)) ** 0.5)

    def forward(self, tokens: torch.Tensor, state: ModelState | None = None, cu_seqlens: torch.Tensor | None = None):
        """tokens: [B, L] token ids, or hidden states where the embedding was pruned (a later
        pipeline stage). Returns (logits, state), or (hidden states, state) where the final
        norm was pruned. Parallel stages run fresh sequences and drop the state.
        cu_seqlens: packed rows (int32 document starts into the flattened B*L tokens, every row
        start among them); the state is then None in and out."""
        if self.embed is not None and tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, length] token ids, got shape {tuple(tokens.shape)}")
        if cu_seqlens is not None and state is not None:
            raise PackedBatchError("packed rows (cu_seqlens) start every document fresh: pass state=None")
        docs = None if cu_seqlens is None else Documents(cu_seqlens)
        state = state or ModelState(0, [None] * len(self.blocks))
        x = tokens if self.embed is None else self.embed(tokens)
        new_layers = []
        for block, st in zip(self.blocks.values(), state.layers):
            x, st = block(x, st, state.position, docs)
            new_layers.append(st)
        state = None if docs is not None else ModelState(state.position + tokens.shape[1], new_layers)
        return (x, state) if self.norm is None else (self.output(self.norm(x)), state)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the final normalised hidden states (the tied head reuses the embedding)."""
        return x @ self.embed.weight.t() if self.head is None else self.head(x)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n
