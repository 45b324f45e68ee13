"""One model chunk of a parallel TitansLM: what a pipeline (virtual) stage runs on one rank.

A chunk is a pruned TitansLM (the model's own forward, blocks and names) with its layers
swapped for tensor-parallel ones, in sequence-first layout [L(/tp), B, D] (megatron's p2p
buffers and sequence-parallel layers are sequence-first):
* the first stage: the vocabulary-parallel embedding (megatron's VocabParallelEmbedding; with
  sequence parallelism it reduce-scatters straight into sequence shards); later stages have no
  embedding and read the previous stage's activations (set_input_tensor);
* its blocks (tensor_parallel.parallelize_block), kept under their global index so every
  parameter has the same name as in the single-device TitansLM;
* the last stage: the final norm, the vocabulary-parallel output head (column-parallel; the
  embedding's weight when tied and on the same stage, else a copy kept in sync by megatron's
  embedding-group all-reduce) and megatron's vocab_parallel_cross_entropy. It returns the
  per-token losses [L, B]; other stages have no final norm and return their activations.

The vocabulary is padded (layout.padded_vocab_size) so it splits over TP; padded rows start at
zero and their logits are masked to -inf, so the loss equals the unpadded model's exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy

from titans_scale.model import TitansLM
from titans_scale.parallel.tensor_parallel import (
    ColumnParallel,
    TPSummedRMSNorm,
    autocast_input,
    mark_tp,
    parallelize_block,
    shard,
    tp_rank_size,
)

__all__ = ["TitansStage"]


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([w.detach(), w.new_zeros(rows - w.shape[0], *w.shape[1:])]) if rows > w.shape[0] else w


class SequenceFirstEmbedding(VocabParallelEmbedding):
    """megatron's vocabulary-parallel embedding returning [L(/tp), B, D] (with sequence
    parallelism megatron's own reduce-scatter already transposes)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = super().forward(tokens)
        return x if self.reduce_scatter_embeddings else x.transpose(0, 1).contiguous()


def _embedding(full: TitansLM, config, vocab_padded: int) -> SequenceFirstEmbedding:
    embed = SequenceFirstEmbedding(vocab_padded, full.cfg.d_model, init_method=lambda w: None, config=config,
                                   reduce_scatter_embeddings=config.sequence_parallel)
    with torch.no_grad():
        embed.weight.copy_(shard(_pad_rows(full.embed.weight, vocab_padded), 0))
    mark_tp(embed.weight, 0)
    return embed


def _head(full: TitansLM, config, vocab_padded: int, with_embedding: bool) -> ColumnParallel:
    """The vocabulary-parallel output head. Tied to an embedding on the same stage it holds no
    weight (TitansStage.output passes the embedding's)."""
    tied = full.cfg.tie_embeddings
    own_weight = not (tied and with_embedding)
    head = ColumnParallel(full.cfg.d_model, vocab_padded, config=config, init_method=lambda w: None,
                          bias=False, gather_output=False, skip_weight_param_allocation=not own_weight)
    if own_weight:
        with torch.no_grad():
            head.weight.copy_(shard(_pad_rows(full.embed.weight if tied else full.head.weight, vocab_padded), 0))
        mark_tp(head.weight, 0)
        if tied:    # a copy of the first stage's embedding (megatron's naming)
            head.weight.shared = True
            head.weight.shared_embedding = True
            head.weight.ds_pipe_replicated = True       # DeepSpeed: count it once in norms
    return head


class TitansStage(TitansLM):
    """Model chunk for megatron's schedules (set_input_tensor, config, model_type): a pruned
    TitansLM, plus the vocabulary-parallel head and loss. `full` is consumed (its blocks and
    final norm are reused)."""

    def __init__(self, full: TitansLM, layer_ids: list[int], *, first: bool, last: bool, config,
                 layer_config, vocab_padded: int):
        nn.Module.__init__(self)        # not TitansLM's: the parts are taken from `full`, built once
        self.cfg = full.cfg
        self.embed = self.norm = self.head = None           # pruned unless this stage holds them
        if first:
            self.embed = _embedding(full, config, vocab_padded)
            if full.cfg.tie_embeddings and not last:
                # As megatron marks both copies: its DDP then gives each its own bucket, so the
                # first and last stages shard the weight alike in the DP x CP reduce-scatter, and
                # the embedding all-reduce after it adds matching shards.
                self.embed.weight.shared_embedding = True
        self.blocks = nn.ModuleDict({str(i): parallelize_block(full.blocks[str(i)], layer_config, config)
                                     for i in layer_ids})
        if last:
            self.norm = TPSummedRMSNorm.from_norm(full.norm) if config.sequence_parallel else full.norm
            self.head = _head(full, config, vocab_padded, with_embedding=first)

        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = first, last
        self.vocab_size, self.vocab_padded = full.cfg.vocab_size, vocab_padded
        self.tied = full.cfg.tie_embeddings
        # megatron's finalize_model_grads all-reduces this weight's gradient between the first and
        # last pipeline stage when they hold separate copies.
        self.share_embeddings_and_output_weights = self.tied
        self.input_tensor: torch.Tensor | None = None

    # -- megatron schedule / finalize_model_grads API ------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.pre_process else self.head.weight

    # -- forward ----------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, targets: [B, L] (only the first / last stage reads them); cu_seqlens: packed
        rows' document starts (every stage reads them: each block re-lays its mixer's input).
        Returns per-token losses [L, B] on the last stage (any value where targets are -100:
        the loss masks them), else activations [L(/tp), B, D]."""
        out, _ = super().forward(tokens if self.pre_process else self.input_tensor, cu_seqlens=cu_seqlens)
        if not self.post_process:
            return out
        return vocab_parallel_cross_entropy(out, targets.clamp_min(0).t().contiguous())

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's fp32 logits [L, B, V_padded / tp], the vocabulary padding masked."""
        weight = self.embed.weight if (self.tied and self.pre_process) else None
        logits = self.head(autocast_input(x), weight=weight)
        return self._mask_padding(logits.float())

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab_padded == self.vocab_size:
            return logits
        rank, _ = tp_rank_size()
        per = logits.shape[-1]
        col = torch.arange(rank * per, (rank + 1) * per, device=logits.device)
        return logits.masked_fill(col >= self.vocab_size, float("-inf"))

    def full_name(self, name: str) -> str | None:
        """The single-device TitansLM name of this chunk's parameter `name`, or None for the
        last stage's copy of a tied embedding (the first stage owns it)."""
        if name == "head.weight" and self.tied:
            return None
        return name
