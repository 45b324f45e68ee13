"""What a model can do without its memory: the chance level of a recall suite and how far
attention alone carries information.

Chance is the exact-match accuracy of a model that knows the answer's format but not its
value, i.e. that guesses it uniformly from the generator's distribution
(titans_scale/data/synthetic.py):

* a pass key or magic number of D digits is uniform in [10^(D-1), 10^D): 1 / (9 * 10^(D-1));
* a magic word is three consonant-vowel syllables: 1 / (14 * 5)^3;
* an MQAR answer is a D-digit value: 1 / (9 * 10^(D-1)) per query.

Attention reach is the longest distance a token's information can travel through the
attention (and conv) layers alone: a needle farther than that from its question can only be
recalled through the memory, so a memory-off model is at chance there.
"""

from __future__ import annotations

import math

from titans_scale.data.synthetic import _CONSONANTS, _VOWELS
from titans_scale.errors import ConfigError
from titans_scale.model.config import ModelConfig


def chance_accuracy(needle: str, digits: int) -> float:
    """Exact-match accuracy of a uniform guess of one answer (needle: passkey|number|word|mqar)."""
    if needle in ("passkey", "number", "mqar"):
        if digits < 1:
            raise ConfigError(f"digits={digits} must be >= 1")
        return 1.0 / (9 * 10 ** (digits - 1))
    if needle == "word":
        return 1.0 / (len(_CONSONANTS) * len(_VOWELS)) ** 3
    raise ConfigError(f"needle='{needle}' is not known; use passkey, number, word or mqar")


def layer_reach(cfg: ModelConfig, mixer: str) -> float:
    """Tokens back that one layer's attention or conv lets a position see (the memory aside)."""
    conv = cfg.conv_kernel - 1
    if mixer == "attn":
        return math.inf
    if mixer in ("swa", "mag", "mal"):
        return max(cfg.window - 1, conv if mixer != "swa" else 0)
    if mixer in ("seg", "mac"):
        return max(cfg.segment_len - 1, conv if mixer == "mac" else 0)
    if mixer == "lmm":
        return conv
    raise ConfigError(f"model.layers: unknown mixer {mixer!r}")


def attention_reach(cfg: ModelConfig) -> float:
    """Longest distance attention alone can carry a token's information: the layers' reaches add."""
    return sum(layer_reach(cfg, m) for m in cfg.layers)


def beyond_attention(cfg: ModelConfig) -> float:
    """The distance past which a needle is out of reach of every attention window: more than
    the stacked reach and more than twice the widest window or segment."""
    widest = max([cfg.window if m in ("swa", "mag", "mal") else cfg.segment_len if m in ("seg", "mac") else 0
                  for m in cfg.layers])
    return max(attention_reach(cfg), 2 * widest)


__all__ = ["chance_accuracy", "attention_reach", "beyond_attention", "layer_reach"]
