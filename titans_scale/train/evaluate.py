"""Evaluation: perplexity, and the predictions recall accuracy is scored on (titans_scale/eval/).

Recall samples are streamed through the model `piece` tokens at a time with the state passed
on, so the sequence length is bounded by time, not by activation memory.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from titans_scale.data.synthetic import RecallSample


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in fp32 (targets -100 do not count): the training objective and
    the held-out loss."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def forward_batch(model, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) of a batch (inputs, targets) or packed rows (inputs, targets, cu_seqlens)."""
    inputs, targets, *packed = batch
    logits, _ = model(inputs, cu_seqlens=packed[0] if packed else None)
    return logits, targets


@torch.no_grad()
def evaluate_loss(model, batches, autocast=contextlib.nullcontext) -> float:
    was = model.training
    model.eval()
    total = 0.0
    for batch in batches:
        with autocast():
            logits, targets = forward_batch(model, batch)
        total += lm_loss(logits, targets).item()
    model.train(was)
    return total / max(1, len(batches))


@torch.no_grad()
def stream_predictions(model, sample: RecallSample, piece: int = 2048) -> np.ndarray:
    """Greedy predictions at the answer positions (teacher-forced), streaming the sample."""
    want = sample.answer_positions - 1            # the logits at t predict token t + 1
    preds = np.empty(len(want), dtype=np.int64)
    state, start = None, 0
    for chunk in sample.stream(piece, stop=int(sample.answer_positions[-1])):
        logits, state = model(torch.from_numpy(chunk).unsqueeze(0), state)
        state = _detach(state)
        sel = (want >= start) & (want < start + len(chunk))
        if sel.any():
            preds[sel] = logits[0, torch.from_numpy(want[sel] - start)].argmax(-1).numpy()
        start += len(chunk)
    return preds


def _detach(state):
    for i, st in enumerate(state.layers):
        if hasattr(st, "detach"):
            state.layers[i] = st.detach()
    return state


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
