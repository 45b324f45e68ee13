"""Length x depth sweeps of the recall suites, streamed so length is bounded by time only.

    spec = EvalSweepSpec("niah", lengths=[1024, 32768], depths=[0.0, 0.5, 1.0], samples=10, digits=2)
    result = run_sweep(model, tokenizer, spec)          # one Cell per (length, depth)

* niah: S-NIAH-style needles (a pass key, or a magic number / word keyed by a pseudo-word)
  in a haystack of noise sentences or corpus text; `depth` places the needle (0 = start).
* recall: multi-query associative recall (MQAR); pairs sit at random places, so there is
  no depth axis (one cell per length, depth None).

Every sample is fed to the model `piece` tokens at a time with the state passed on
(train/evaluate.py stream_predictions): the largest tensor ever built is one piece's
activations plus the model's state, whose size does not grow with the length (the sweep
records both), and the largest norm the memory's weights reached in each cell (a diverging
inner loop shows there first). Sample i of every cell uses seed + i, so depths are compared on the same
pass keys and haystacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from titans_scale.data.synthetic import RecallSample
from titans_scale.eval.baselines import attention_reach, beyond_attention, chance_accuracy
from titans_scale.eval.spec import EvalSweepSpec
from titans_scale.ops.state import MemoryState
from titans_scale.train.evaluate import stream_predictions
from titans_scale.train.hardware import peak_rss_bytes


def _ratio(num: str, den: str, doc: str) -> property:
    """A read-only share num / den of two counters (0 while den is 0)."""
    return property(lambda self: getattr(self, num) / max(1, getattr(self, den)), doc=doc)


@dataclass
class Cell:
    length: int
    depth: float | None                # None for MQAR (pairs at random places)
    samples: int = 0
    correct: int = 0                   # samples with every answer exactly right
    answers: int = 0                   # answers asked (one per needle sample, several per MQAR sample)
    answers_correct: int = 0           # answers exactly right: `accuracy`, comparable with chance
    tokens: int = 0
    tokens_correct: int = 0            # answer tokens right (greedy, teacher-forced)
    distance_sum: int = 0
    min_distance: int = 1 << 62        # tokens from the needle's end to the first answer token
    seconds: float = 0.0
    memory_weight_norm: float = 0.0    # the largest Frobenius norm of one sequence's memory weights

    accuracy = _ratio("answers_correct", "answers", "Share of answers exactly right (for needles: of samples).")
    sample_accuracy = _ratio("correct", "samples",
                             "Share of samples with every answer right (differs from accuracy for MQAR only).")
    token_accuracy = _ratio("tokens_correct", "tokens", "Share of answer tokens right.")
    distance = _ratio("distance_sum", "samples", "Mean tokens from the needle's end to the first answer token.")

    def add(self, sample: RecallSample, preds: np.ndarray) -> None:
        right = preds == sample.answer_tokens
        # answers are the runs of consecutive answer positions (MQAR's are split by queries)
        cuts = np.flatnonzero(np.diff(sample.answer_positions) > 1) + 1
        per_answer = [bool(r.all()) for r in np.split(right, cuts)]
        self.samples += 1
        self.correct += int(all(per_answer))
        self.answers += len(per_answer)
        self.answers_correct += sum(per_answer)
        self.tokens += len(right)
        self.tokens_correct += int(right.sum())
        # the nearest needle (MQAR: the last key-value sentence) to the first answer
        gap = int(sample.answer_positions[0]) - max(end for _, end in sample.needle_spans)
        self.distance_sum += gap
        self.min_distance = min(self.min_distance, gap)

    def to_json(self, beyond: float) -> dict:
        return {"length": self.length, "depth": self.depth, "samples": self.samples,
                "answers": self.answers, "correct": self.answers_correct, "accuracy": self.accuracy,
                "sample_accuracy": self.sample_accuracy, "token_accuracy": self.token_accuracy,
                "mean_distance": self.distance, "min_distance": self.min_distance,
                "beyond_attention": bool(self.min_distance > beyond), "seconds": round(self.seconds, 3),
                "memory_weight_norm": self.memory_weight_norm}


@dataclass
class SweepResult:
    spec: EvalSweepSpec
    cells: list[Cell]
    chance: float                      # exact-match accuracy of a uniform guess of one answer
    attention_reach: float             # tokens attention alone can carry information
    beyond: float                      # distance past which a needle is beyond every window
    max_piece: int                     # the most tokens the model was given at once
    state_bytes: int                   # the largest model state carried between pieces
    peak_rss_bytes: int

    def cell(self, length: int, depth: float | None) -> Cell:
        return next(c for c in self.cells if c.length == length and c.depth == depth)

    def accuracy_at(self, length: int) -> float:
        """Mean accuracy over the depths of one length."""
        cs = [c for c in self.cells if c.length == length]
        return sum(c.accuracy for c in cs) / max(1, len(cs))

    def beyond_accuracy(self) -> float | None:
        """Pooled accuracy over the cells whose every needle lies beyond all attention windows."""
        cs = [c for c in self.cells if c.min_distance > self.beyond]
        return sum(c.answers_correct for c in cs) / sum(c.answers for c in cs) if cs else None

    def to_json(self) -> dict:
        return {"spec": dataclasses.asdict(self.spec), "chance": self.chance,
                "attention_reach": _finite(self.attention_reach), "beyond_distance": _finite(self.beyond),
                "beyond_accuracy": self.beyond_accuracy(), "max_piece": self.max_piece,
                "state_bytes": self.state_bytes, "peak_rss_bytes": self.peak_rss_bytes,
                "cells": [c.to_json(self.beyond) for c in self.cells]}


def _finite(x: float) -> float | None:
    return None if x == float("inf") else x


def state_bytes(obj) -> int:
    """Bytes of every tensor inside a (nested) model state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(state_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(state_bytes(x) for x in obj.values())
    return 0


def memory_weight_norm(obj) -> float:
    """The largest Frobenius norm of any memory weight tensor of any sequence inside a model state."""
    if isinstance(obj, MemoryState):
        return max((w.detach().flatten(1).norm(dim=1).max().item() for w in obj.weights), default=0.0)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return max((memory_weight_norm(getattr(obj, f.name)) for f in dataclasses.fields(obj)), default=0.0)
    if isinstance(obj, (list, tuple)):
        return max((memory_weight_norm(x) for x in obj), default=0.0)
    return 0.0


class _Recorder:
    """Calls the model and records what streaming costs: the largest piece and state."""

    def __init__(self, model, autocast=contextlib.nullcontext):
        self.model, self.autocast = model, autocast
        self.max_piece = self.state_bytes = 0
        self.weight_norm = 0.0             # reset per cell by run_sweep

    def __call__(self, tokens: torch.Tensor, state):
        with self.autocast():
            logits, state = self.model(tokens, state)
        self.max_piece = max(self.max_piece, tokens.shape[1])
        self.state_bytes = max(self.state_bytes, state_bytes(state))
        self.weight_norm = max(self.weight_norm, memory_weight_norm(state))
        return logits.float(), state


def run_sweep(model, tokenizer, spec: EvalSweepSpec, log=None) -> SweepResult:
    """Accuracy of `model` per (length, depth) cell of `spec`; `log(cell)` is called after each."""
    spec.validate()
    was = model.training
    model.eval()
    autocast = getattr(getattr(model, "precision", None), "autocast", contextlib.nullcontext)
    rec = _Recorder(model, autocast)
    depths: list[float | None] = list(spec.depths) if spec.suite == "niah" else [None]
    cells = []
    for length in spec.lengths:
        for depth in depths:
            cell, t0 = Cell(length, depth), time.perf_counter()
            rec.weight_norm = 0.0
            for i in range(spec.samples):
                s = spec.sample(tokenizer, length, depth, i)
                cell.add(s, stream_predictions(rec, s, spec.piece))
            cell.seconds = time.perf_counter() - t0
            cell.memory_weight_norm = rec.weight_norm
            cells.append(cell)
            if log is not None:
                log(cell)
    model.train(was)
    cfg = model.cfg
    return SweepResult(spec, cells, chance_accuracy(spec.answer_kind, spec.digits), attention_reach(cfg),
                       beyond_attention(cfg), rec.max_piece, rec.state_bytes, peak_rss_bytes())


__all__ = ["EvalSweepSpec", "SweepResult", "Cell", "run_sweep", "state_bytes", "memory_weight_norm"]
