"""Sampling: the prompt is fed (in pieces if long) and each new token is one more streamed
step with the state passed on, so generation never recomputes the prefix's memory."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, piece: int = 2048, seed: int = 0, state=None):
    """prompt: [B, L] ids. Returns ([B, max_new_tokens] new ids, final state)."""
    g = torch.Generator().manual_seed(seed)
    logits = None
    for a in range(0, prompt.shape[1], piece):
        logits, state = model(prompt[:, a:a + piece], state)
    out = []
    for _ in range(max_new_tokens):
        last = logits[:, -1].float()
        if temperature <= 0:
            nxt = last.argmax(-1, keepdim=True)
        else:
            last = last / temperature
            if top_k:
                kth = last.topk(top_k, dim=-1).values[:, -1:]
                last = last.masked_fill(last < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(last, -1), 1, generator=g)
        out.append(nxt)
        logits, state = model(nxt, state)
    return torch.cat(out, dim=1), state
