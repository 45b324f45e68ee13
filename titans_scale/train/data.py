"""The run's data: tokenizer, prepared shards, the train/val loaders and the recall mixture."""

from __future__ import annotations

import torch

from titans_scale.config import RunConfig
from titans_scale.data.loader import TokenLoader
from titans_scale.data.shards import prepare_corpus
from titans_scale.data.synthetic import recall_batch
from titans_scale.data.tokenizer import load_tokenizer
from titans_scale.errors import ConfigError


def sources_of(spec: str):
    return "embedded" if spec == "embedded" else [s.strip() for s in spec.split(",") if s.strip()]


class RunData:
    def __init__(self, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        d = cfg.data
        self.cfg = cfg
        self.tokenizer = load_tokenizer(d.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({self.tokenizer.vocab_size}); set model.vocab_size >= "
                              f"{self.tokenizer.vocab_size}")
        if rank == 0:
            prepare_corpus(d.shard_dir, self.tokenizer, sources_of(d.source), max_bytes=d.max_bytes)
        if world_size > 1:
            torch.distributed.barrier()
        self.train = TokenLoader(d.shard_dir, "train", d.seq_len, d.batch_size, seed=cfg.train.seed,
                                 rank=rank, world_size=world_size, tokenizer=self.tokenizer)
        self.rank, self.world_size = rank, world_size
        self.n_recall = round(d.recall_fraction * d.batch_size)

    def next_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = next(self.train)
        if self.n_recall:          # replace the last rows with recall samples (seeded by step, rank)
            ri, rt, _ = recall_batch(self.tokenizer, self.n_recall, self.cfg.data.seq_len,
                                     seed=self.cfg.train.seed + 7919 * self.rank, step=step)
            inputs, targets = inputs.clone(), targets.clone()
            inputs[-self.n_recall:], targets[-self.n_recall:] = ri, rt
        return inputs, targets

    def unigram_entropy(self, max_tokens: int = 1 << 24) -> float:
        """Cross-entropy (nats/token) of the best context-free model of the train split: the
        baseline a language model must beat to have learned anything beyond token counts."""
        import numpy as np
        stream = self.train._stream
        n = min(len(stream), max_tokens)
        counts = np.bincount(stream.read(0, n), minlength=self.tokenizer.vocab_size).astype(np.float64)
        p = counts[counts > 0] / n
        return float(-(p * np.log(p)).sum())

    def val_loader(self, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed set of validation batches (same for every evaluation of a run)."""
        d = self.cfg.data
        val = TokenLoader(d.shard_dir, "val", d.seq_len, d.batch_size, seed=0, rank=self.rank,
                          world_size=self.world_size, tokenizer=self.tokenizer)
        return [next(val) for _ in range(batches)]

    def state_dict(self) -> dict:
        return self.train.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.train.load_state_dict(state)

