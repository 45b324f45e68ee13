"""Training FLOPs of a Titans model, per token (forward + backward = 3x forward matmul FLOPs).

Counted as matmul FLOPs (2 per multiply-add) of: the token projections (attention, memory,
gates, SwiGLU, head), attention scores over the keys each query really sees (window,
segment + memory tokens, or the causal prefix), and the memory update per chunk (retrieval,
the inner forward/backward at the chunk-start weights, and the two weighted outer-product
sums of chunked.py). Elementwise work is left out, as MFU conventions do.
"""

from __future__ import annotations

from titans_scale.model.config import MEMORY_MIXERS, ModelConfig


def _memory_dims(cfg: ModelConfig) -> list[tuple[int, int]]:
    d = cfg.memory_dim
    if cfg.mem_depth == 1:
        return [(d, d)]
    hid = cfg.mem_expansion * d
    return [(d, hid)] + [(hid, hid)] * (cfg.mem_depth - 2) + [(hid, d)]


def memory_read_flops_per_token(cfg: ModelConfig) -> float:
    """f_W(q) for one token, all memory heads."""
    return cfg.memory_heads * sum(2 * i * o for i, o in _memory_dims(cfg))


def memory_update_flops_per_token(cfg: ModelConfig) -> float:
    """Forward matmul FLOPs of memory_scan per token (all memory heads)."""
    dims = _memory_dims(cfg)
    mlp = sum(2 * i * o for i, o in dims)
    backprop = sum(2 * i * o for i, o in dims[1:])     # error pushed back through W_2..W_L
    outer_products = sum(2 * 2 * i * o for i, o in dims)   # the S and W coefficient sums
    # retrieval y = f_{W_c}(q) + forward on k at W_c + backprop + outer products
    return cfg.memory_heads * (2 * mlp + backprop + outer_products)


def attention_keys(cfg: ModelConfig, mixer: str, seq_len: int) -> float:
    """Average number of keys a query attends to."""
    p = cfg.n_persistent
    if mixer in ("swa", "mag", "mal"):
        w = min(cfg.window, seq_len)
        return p + w - (w * (w - 1) / 2) / seq_len     # short prefix sees fewer keys
    if mixer in ("seg", "mac"):
        s = min(cfg.segment_len, seq_len)
        per = (s + 1) / 2
        return p + (2 * per if mixer == "mac" else per)
    if mixer == "attn":
        return (seq_len + 1) / 2
    return 0.0


def layer_flops_per_token(cfg: ModelConfig, mixer: str, seq_len: int) -> float:
    D = cfg.d_model
    Hd = cfg.memory_heads * cfg.memory_dim
    f = 2 * 3 * D * cfg.ffn_hidden                           # SwiGLU
    if mixer != "lmm":
        f += 2 * 4 * D * D                                   # qkv + out
        f += 2 * 2 * D * attention_keys(cfg, mixer, seq_len)  # scores + weighted values
    if mixer in MEMORY_MIXERS:
        f += 2 * D * 3 * Hd + 2 * D * 3 * cfg.memory_heads   # qkv projection + gates
        f += 2 * D * Hd + 2 * Hd * D                          # output gate + output projection
        f += memory_update_flops_per_token(cfg)
    if mixer == "mac":
        # h tokens: q projection, the read f_W(q), their output path, then their K and V
        f += 2 * D * Hd + memory_read_flops_per_token(cfg) + 2 * 2 * D * Hd + 2 * 2 * D * D
    return f


def model_flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Forward (x3 when training) FLOPs per token, including the output head."""
    fwd = sum(layer_flops_per_token(cfg, m, seq_len) for m in cfg.layers)
    fwd += 2 * cfg.d_model * cfg.vocab_size
    return 3 * fwd if training else fwd
