"""FLOPs and parameter counts of a Titans model, from its config alone (no model is built).

What is counted: matmul FLOPs (2 per multiply-add) of every product the model runs —
nn.Linear layers (attention, memory, gates, SwiGLU, the output head), the depthwise conv of
the memory projections, attention scores and weighted values, and the memory update of
ops/chunked.py per chunk piece (retrieval f_{W_c}(q), the inner forward/backward at the
chunk-start weights, the two coefficient-weighted outer-product sums, and the n x n decay
matrix product of decay_coefficients). Elementwise work (norms, RoPE, softmax, GELU, gates)
is left out, as MFU conventions do and as torch.utils.flop_counter does. Training adds a
backward of 2x the forward: every product needs the gradients of both operands.

Two counts, because attention as written computes more than it needs:

* ``count="model"`` (the default; what MFU and the scaling-law compute C use): only the
  (query, key) pairs the causal / window / segment mask lets through, no padding, no
  unused projections; training = exactly 3x forward. This is the work the model's
  mathematics needs, whatever the kernel.
* ``count="executed"``: what the reference PyTorch paths run (memory impl="chunked", the
  conv through F.conv1d; the default impl="fused" runs the same forward and reruns the
  inner forward at W_c in its hand-written backward, about 4 of ~22 matmul units). The blocked
  sliding window attends each block of w queries to 2w keys (about w of them masked), padded to
  whole blocks, and the first block a second time with its own mask when there are more
  (model/attention.py); segment and full causal attention compute their whole square (half
  masked); MAC projects a query for
  every retrieved memory token it never uses; autograd skips the backward of the last
  chunk's state update (nothing reads the final state); with model.recompute_group the
  backward reruns the memory scan's forward. This equals FlopCounterMode's count
  of a training step to the FLOP (tests/test_flops.py) when SDPA runs as explicit matmuls
  (the math backend, as the tests ask for) and depthwise-conv backward is
  counted per group (torch's formula ignores `groups` and overcounts it ~channels-fold).
  Fused kernels (flash / memory-efficient SDPA) also recompute Q K^T in the backward, which
  FlopCounterMode adds as 0.5x the attention forward; neither count includes that recompute.

Per-call work that does not grow with the batch (projecting the persistent tokens, once per
attention call) is in step_flops; model_flops_per_token leaves it out unless given the
batch size (it is Np/(B L) of one projection: below 0.1% for any real run).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from titans_scale.errors import ConfigError
from titans_scale.model.config import MEMORY_MIXERS, ModelConfig

COUNTS = ("model", "executed")
_SLIDING = ("swa", "mag", "mal")


# ----------------------------------------------------------------------------- parameters


def memory_layer_dims(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of each layer of one head's memory MLP."""
    d = cfg.mem_head_dim
    if cfg.mem_depth == 1:
        return [(d, d)]
    hid = cfg.mem_expansion * d
    return [(d, hid)] + [(hid, hid)] * (cfg.mem_depth - 2) + [(hid, d)]


def _attention_params(cfg: ModelConfig) -> int:
    D = cfg.d_model
    return 4 * D * D + cfg.n_persistent * D                  # qkv, out, persistent tokens


def _memory_params(cfg: ModelConfig) -> int:
    D, H, d = cfg.d_model, cfg.resolved_mem_heads, cfg.mem_head_dim
    Hd = H * d
    return (3 * Hd * D                                       # q, k, v projection
            + 3 * Hd * (cfg.conv_kernel + 1)                 # depthwise conv weight + bias
            + 3 * H * (D + 1)                                # theta, eta, alpha gates
            + H * sum(i * o for i, o in memory_layer_dims(cfg))   # W^0
            + (2 * Hd if cfg.mem_norm else 0)                # ln_weight, ln_bias of the normalised memory
            + d                                              # output RMSNorm
            + 2 * Hd * D)                                    # output gate + output projection


def _mixer_params(cfg: ModelConfig, mixer: str) -> int:
    n = 0
    if mixer != "lmm":
        n += _attention_params(cfg)
    if mixer in MEMORY_MIXERS:
        n += _memory_params(cfg)
    if mixer == "mag":
        n += 2 * cfg.d_model                                 # the two output norms
    return n


def param_count(cfg: ModelConfig, non_embedding: bool = True) -> int:
    """Parameters of TitansLM(cfg) (equal to model.num_params(non_embedding))."""
    D = cfg.d_model
    block = 2 * D + 3 * D * cfg.resolved_mlp_hidden                   # two RMSNorms + SwiGLU
    n = sum(block + _mixer_params(cfg, m) for m in cfg.layers) + D     # + final norm
    if not cfg.tie_embeddings:
        n += cfg.vocab_size * D                              # the untied head counts as a layer
    return n if non_embedding else n + cfg.vocab_size * D


# ----------------------------------------------------------------------------- attention


def _segments(L: int, S: int) -> list[int]:
    """Lengths of the segments a sequence of L tokens is cut into."""
    return [S] * (L // S) + ([L % S] if L % S else [])


def attention_pairs(cfg: ModelConfig, mixer: str, seq_len: int, count: str = "model") -> float:
    """(query, key) pairs of one head over one sequence of seq_len tokens fed in one call,
    persistent tokens included; 0 for a mixer without attention."""
    _check_count(count)
    L, p = seq_len, cfg.n_persistent
    if mixer in _SLIDING:
        w = cfg.window
        if count == "executed":                              # blocks of w queries x (p + 2w) keys,
            nb = -(-L // w)                                  # the first one twice when there are more
            return (nb + (nb > 1)) * w * (p + 2 * w)
        m = min(w, L)                                        # query t sees min(t + 1, w) tokens
        return L * p + m * (m + 1) / 2 + (L - m) * w
    if mixer in ("seg", "mac"):
        k = 2 if mixer == "mac" else 1                       # MAC also sees h_j, j <= i
        segs = _segments(L, cfg.segment_len)
        if count == "executed":
            return sum(s * (p + k * s) for s in segs)
        return sum(s * p + k * s * (s + 1) / 2 for s in segs)
    if mixer == "attn":
        return L * (p + L) if count == "executed" else L * p + L * (L + 1) / 2
    return 0.0


def _attention_calls(cfg: ModelConfig, mixer: str, seq_len: int) -> int:
    """Attention calls per forward; each projects the persistent tokens once."""
    if mixer == "lmm" or cfg.n_persistent == 0:
        return 0
    return len(_segments(seq_len, cfg.segment_len)) if mixer == "mac" else 1


# ----------------------------------------------------------------------------- memory


def memory_update_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of memory_scan (chunked path) over one sequence, all memory heads:
    per token the retrieval, the inner forward and backprop at W_c and the two outer-product
    sums; per chunk piece of n tokens the n x n decay product (2 n^2)."""
    dims = memory_layer_dims(cfg)
    mlp = sum(2 * i * o for i, o in dims)                    # one pass of one token through f_W
    backprop = sum(2 * i * o for i, o in dims[1:])           # error pushed back through W_2..W_L
    outer = sum(2 * 2 * i * o for i, o in dims)              # left^T [c_s right, c_w right]
    C = cfg.chunk_size
    pieces = [C] * (seq_len // C) + ([seq_len % C] if seq_len % C else [])
    decay = sum(2 * n * n for n in pieces if n > 1)         # n = 1: einsum multiplies, no matmul
    return cfg.resolved_mem_heads * (seq_len * (2 * mlp + backprop + outer) + decay)


def memory_update_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs of memory_scan per token of a sequence of whole chunks, all heads."""
    return memory_update_flops(cfg, cfg.chunk_size) / cfg.chunk_size


def _scan_calls(cfg: ModelConfig, seq_len: int, mixer: str) -> list[int]:
    """Lengths of the memory_scan calls over one sequence: MAC scans segment by segment."""
    return _segments(seq_len, cfg.segment_len) if mixer == "mac" else [seq_len]


def memory_recompute_flops(cfg: ModelConfig, seq_len: int, mixer: str = "lmm") -> float:
    """Forward FLOPs the backward reruns with model.recompute_group = g > 0: every scan call of
    more than g chunk pieces runs under checkpoint, its forward once more (ops/recompute.py)."""
    g = cfg.recompute_group
    if not g:
        return 0.0
    return sum(memory_update_flops(cfg, n) for n in _scan_calls(cfg, seq_len, mixer)
               if -(-n // cfg.chunk_size) > g)


def memory_dead_backward_flops(cfg: ModelConfig, seq_len: int, mixer: str = "lmm") -> float:
    """Backward FLOPs autograd skips in one sequence's memory update, all memory heads.

    The last chunk piece's state update feeds nothing the loss reads (the state after the
    sequence is discarded in training), so the backward of its outer-product sums never
    runs, nor (deep memory) that of its gradient factors at W_c. Whole ops are skipped only
    where that piece has them to itself: its n x n decay product when it is a partial chunk
    or the only chunk of its memory_scan call (or of its recompute group), and its gate
    projection when the call holds nothing else (MAC scans segment by segment, the other
    mixers the whole sequence)."""
    dims = memory_layer_dims(cfg)
    C, g = cfg.chunk_size, cfg.recompute_group
    call = _scan_calls(cfg, seq_len, mixer)[-1]
    n = call % C or min(C, call)                             # tokens of the last piece
    pieces = -(-call // C)
    span = call                                              # tokens sharing the last decay product
    if g and pieces > g:
        span = call - C * (g * ((pieces - 1) // g))          # the last recompute group
    per_token = sum(2 * 2 * i * o for i, o in dims)          # outer-product sums
    if len(dims) > 1:                                        # mlp_grad_factors is its own pass
        per_token += sum(2 * i * o for i, o in dims) + sum(2 * i * o for i, o in dims[1:])
    dead = n * per_token
    if (n < C or span == C) and n > 1:
        dead += 2 * n * n
    if call == n:
        dead += n * 2 * cfg.d_model * 3                      # theta, eta, alpha of this head
    return cfg.resolved_mem_heads * 2 * dead


def memory_read_flops(cfg: ModelConfig) -> float:
    """f_W(q) for one token, all memory heads (MAC's retrieval of h)."""
    return cfg.resolved_mem_heads * sum(2 * i * o for i, o in memory_layer_dims(cfg))


# ----------------------------------------------------------------------------- totals


@dataclass
class FlopCount:
    """Forward FLOPs of one step by component (whole batch); training adds a backward of
    twice the forward, less what autograd skips and plus what it recomputes (executed only)."""

    parts: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    training: bool = True
    backward_skipped: float = 0.0        # what autograd never runs (executed count)
    backward_recomputed: float = 0.0     # forward work rerun in the backward (executed count)

    def add(self, name: str, flops: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + flops

    @property
    def forward(self) -> float:
        return sum(self.parts.values())

    @property
    def backward(self) -> float:
        if not self.training:
            return 0.0
        return 2 * self.forward - self.backward_skipped + self.backward_recomputed

    @property
    def total(self) -> float:
        return self.forward + self.backward

    @property
    def per_token(self) -> float:
        return self.total / self.tokens


def _check_count(count: str) -> None:
    if count not in COUNTS:
        raise ConfigError(f"count: must be one of {COUNTS}, got {count!r}")


def step_flops(cfg: ModelConfig, batch_size: int, seq_len: int, *, training: bool = True,
               count: str = "model") -> FlopCount:
    """FLOPs of one forward (x3 when training) over a [batch_size, seq_len] batch fed in one
    call from an empty state; see the module docstring for what each count includes."""
    _check_count(count)
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch_size={batch_size}, seq_len={seq_len}: both must be >= 1")
    B, L, D = batch_size, seq_len, cfg.d_model
    H, Hd, K = cfg.resolved_mem_heads, cfg.resolved_mem_heads * cfg.mem_head_dim, cfg.conv_kernel
    BL = B * L
    out = FlopCount(tokens=BL, training=training)
    out.add("head", 2 * D * cfg.vocab_size * BL)
    for m in cfg.layers:
        out.add("ffn", 2 * 3 * D * cfg.resolved_mlp_hidden * BL)
        if m != "lmm":
            out.add("attention_proj", 2 * 4 * D * D * BL)    # qkv + out
            out.add("attention", 2 * 2 * D * B * attention_pairs(cfg, m, L, count))   # scores + values
            out.add("persistent_proj", 2 * 3 * D * D * cfg.n_persistent * _attention_calls(cfg, m, L))
        if m in MEMORY_MIXERS:
            out.add("memory_proj", (2 * D * 3 * Hd + 2 * 3 * Hd * K + 2 * D * 3 * H) * BL)  # qkv, conv, gates
            out.add("memory_out", 2 * 2 * D * Hd * BL)      # output gate + output projection
            out.add("memory_update", B * memory_update_flops(cfg, L))
            if count == "executed":
                out.backward_skipped += B * memory_dead_backward_flops(cfg, L, m)
                out.backward_recomputed += B * memory_recompute_flops(cfg, L, m)
        if m == "mac":
            # h = W_O-path(f_W(q(x))) per token: the read, the output path, then h's keys and values
            # (the code also computes h's unused queries). Storing y, the read projects q itself (its
            # rows and conv); storing x, it takes q from the update's projection.
            kv = 3 if count == "executed" else 2
            q_proj = 0 if cfg.mac_memory_input == "input" else 2 * D * Hd + 2 * Hd * K
            out.add("mac_memory_tokens", (q_proj + memory_read_flops(cfg)
                                          + 2 * 2 * D * Hd + 2 * kv * D * D) * BL)
    return out


def model_flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True, count: str = "model",
                          batch_size: int | None = None) -> float:
    """FLOPs per token of a training step (forward only with training=False), output head
    included. batch_size=None leaves out the per-call persistent-token projection."""
    c = step_flops(cfg, batch_size or 1, seq_len, training=training, count=count)
    if batch_size is None:
        c.parts.pop("persistent_proj", None)
    return c.per_token


__all__ = ["COUNTS", "FlopCount", "attention_pairs", "memory_dead_backward_flops", "memory_layer_dims",
           "memory_read_flops", "memory_recompute_flops", "memory_update_flops", "memory_update_flops_per_token",
           "model_flops_per_token", "param_count", "step_flops"]
