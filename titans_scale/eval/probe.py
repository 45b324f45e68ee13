"""The memory's signal at a needle's answer, without training (docs/long_context.md, issue 19).

needle_signal: the relative change of the logits that predict a pass key's tokens when only the
needle's digits change (every digit +5 mod 10), averaged over samples. With the needle beyond
every attention window only the memory can carry that change; an untrained model whose signal is
~1e-4 gives the outer loss nothing to learn recall from, and a memory-off model's is exactly 0.
"""

from __future__ import annotations

import torch

from titans_scale.data.synthetic import needle_sample
from titans_scale.data.tokenizer import ByteTokenizer


def needle_signal(model, seq_len: int, seeds, *, digits: int = 2, depth: float = 0.0) -> float:
    """Mean over `seeds` of |logits(a) - logits(b)| / |logits(a)| at the answer positions, for a
    pass-key sample a of `seq_len` tokens and its copy b with the needle's digits changed."""
    tok, zero = ByteTokenizer(), ord("0")
    sig = []
    with torch.no_grad():
        for seed in seeds:
            smp = needle_sample(tok, seq_len + 1, seed, needle="passkey", digits=digits, depth=depth)
            a = torch.from_numpy(smp.tokens())[:-1]
            b = a.clone()
            (lo, hi), = smp.needle_spans
            part = b[lo:hi]
            is_digit = (part >= zero) & (part <= zero + 9)
            part[is_digit] = (part[is_digit] - zero + 5) % 10 + zero
            pos = torch.from_numpy(smp.answer_positions - 1)
            la, lb = model(a[None])[0][0, pos], model(b[None])[0][0, pos]
            sig.append(((la - lb).norm() / la.norm()).item())
    return sum(sig) / len(sig)
