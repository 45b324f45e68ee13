"""The run's data: tokenizer, prepared shards, the train/val loaders and the recall mixture.

A batch is (inputs, targets) [B, L] int64, or with data.pack (inputs, targets, cu_seqlens):
cu_seqlens int32, the document starts in the flattened B * L tokens from 0 to B * L (every
row start among them), and the targets whose token is the next document's first are IGNORE
unless data.loss_across_docs (docs/data.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from titans_scale.config import RunConfig
from titans_scale.data.blend import BlendLoader
from titans_scale.data.loader import TokenLoader
from titans_scale.data.packing import cu_seqlens
from titans_scale.data.shards import prepare_corpus
from titans_scale.data.synthetic import recall_batch
from titans_scale.data.tokenizer import load_tokenizer
from titans_scale.errors import ConfigError

IGNORE = -100          # F.cross_entropy's ignore_index: targets that carry no loss


def sources_of(spec: str):
    return "embedded" if spec == "embedded" else [s.strip() for s in spec.split(",") if s.strip()]


@dataclass(frozen=True)
class RecallMix:
    """The recall rows of each batch (data.recall_*; defaults keep the original MQAR mixture).

    loss = "answers" keeps only the answer tokens' targets (the rest become IGNORE), so the
    recall rows teach recall, not the haystack; "lm" trains on every token.
    corpus_loss < 1 keeps that share of the corpus rows' targets (a subset seeded by the step):
    a row of corpus text holds ~100x more targets than a row's answers, so this is how a
    mixture weights recall up without a second loss term.
    """

    rows: int                      # rows per batch replaced by recall samples
    task: str = "mqar"             # mqar | needle (pass key)
    loss: str = "lm"               # lm | answers
    digits: int = 0                # pass-key / value digits; 0 = the task's default
    haystack: str = "noise"        # noise | corpus
    corpus_loss: float = 1.0       # share of corpus-row targets that carry loss

    @classmethod
    def of(cls, cfg: RunConfig) -> "RecallMix":
        d = cfg.data
        mix = cls(rows=round(d.recall_fraction * d.batch_size), task=d.recall_task, loss=d.recall_loss,
                  digits=d.recall_digits, haystack=d.recall_haystack,
                  corpus_loss=d.corpus_loss_fraction)
        return mix              # its choices and ranges are checked by DataConfig

    def task_kwargs(self) -> dict:
        kw: dict = {"haystack": self.haystack}
        if self.digits:
            kw["digits" if self.task == "needle" else "value_digits"] = self.digits
        return kw


def prepare_data(cfg: RunConfig, tokenizer=None) -> None:
    """Prepare the shards of data.source (once; a no-op when they are there). A blend reads
    data prepared beforehand."""
    d = cfg.data
    if not d.blend:
        prepare_corpus(d.shard_dir, tokenizer or load_tokenizer(d.tokenizer), sources_of(d.source),
                       max_bytes=d.max_bytes)


class RunData:
    def __init__(self, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        d = cfg.data
        self.cfg = cfg
        self.tokenizer = load_tokenizer(d.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({self.tokenizer.vocab_size}); set model.vocab_size >= "
                              f"{self.tokenizer.vocab_size}")
        self.recall = RecallMix.of(cfg)
        if rank == 0:
            prepare_data(cfg, self.tokenizer)
        if world_size > 1:
            torch.distributed.barrier()
        self.rank, self.world_size = rank, world_size
        self.train = self._loader("train", cfg.train.seed)
        self.n_recall = self.recall.rows

    def _loader(self, split: str, seed: int) -> TokenLoader | BlendLoader:
        d = self.cfg.data
        if d.blend:
            return BlendLoader(d.blend, split, d.seq_len, d.batch_size, seed=seed, rank=self.rank,
                               world_size=self.world_size, tokenizer=self.tokenizer)
        return TokenLoader(d.shard_dir, split, d.seq_len, d.batch_size, seed=seed, rank=self.rank,
                           world_size=self.world_size, tokenizer=self.tokenizer)

    def _tensors(self, data: np.ndarray, begins: np.ndarray | None) -> tuple[torch.Tensor, ...]:
        """Windows [B, L + 1] -> (inputs, targets), and with packing cu_seqlens and the boundary targets ignored."""
        t = torch.from_numpy(data)
        inputs, targets = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        if begins is None:
            return inputs, targets
        b = torch.from_numpy(begins)
        if not self.cfg.data.loss_across_docs:       # the target here is the next document's first token
            targets = targets.masked_fill(b[:, 1:], IGNORE)
        return inputs, targets, cu_seqlens(b[:, :-1])

    def next_batch(self, step: int) -> tuple[torch.Tensor, ...]:
        data, begins = self.train.rows(begins=self.cfg.data.pack)
        if begins is not None and self.n_recall:
            begins[-self.n_recall:] = False            # a recall row is one document
        inputs, targets, *packed = self._tensors(data, begins)
        if self.n_recall:          # replace the last rows with recall samples (seeded by step, rank)
            r = self.recall
            ri, rt, mask = recall_batch(self.tokenizer, r.rows, self.cfg.data.seq_len,
                                        seed=self.cfg.train.seed + 7919 * self.rank, step=step,
                                        task=r.task, **r.task_kwargs())
            if r.loss == "answers":
                rt = rt.masked_fill(~mask, IGNORE)
            inputs, targets = inputs.clone(), targets.clone()
            inputs[-self.n_recall:], targets[-self.n_recall:] = ri, rt
        if self.recall.corpus_loss < 1.0:
            rows = targets.shape[0] - self.n_recall
            g = torch.Generator().manual_seed(self.cfg.train.seed + 7919 * self.rank + 104729 * step)
            drop = torch.rand(rows, targets.shape[1], generator=g) >= self.recall.corpus_loss
            targets = targets.clone()
            targets[:rows] = targets[:rows].masked_fill(drop, IGNORE)
        return (inputs, targets, *packed)

    def unigram_entropy(self, max_tokens: int = 1 << 24) -> float:
        """Cross-entropy (nats/token) of the best context-free model of the train split: the
        baseline a language model must beat to have learned anything beyond token counts."""
        tokens = self.train.head(max_tokens)
        counts = np.bincount(tokens, minlength=self.tokenizer.vocab_size).astype(np.float64)
        p = counts[counts > 0] / len(tokens)
        return float(-(p * np.log(p)).sum())

    def val_loader(self, batches: int) -> list[tuple[torch.Tensor, ...]]:
        """A fixed set of validation batches (same for every evaluation of a run), packed like the train ones."""
        val = self._loader("val", seed=0)
        return [self._tensors(*val.rows(begins=self.cfg.data.pack)) for _ in range(batches)]

    def state_dict(self) -> dict:
        return self.train.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.train.load_state_dict(state)
