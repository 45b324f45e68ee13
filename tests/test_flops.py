"""titans_scale.flops against FLOPs measured by torch.utils.flop_counter on real training steps.

FlopCounterMode counts matmuls (mm/addmm/bmm), convolutions and fused SDPA kernels. Two
settings make it count what the code really executes: SDPA on the math backend (explicit
bmm's; on CPU the 4-D fused kernel is not in the counter's table and would count 0), and a
depthwise-conv backward counted per group (torch's formula ignores `groups`).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from titans_scale.errors import ConfigError
from titans_scale.flops import attention_pairs, model_flops_per_token, param_count, step_flops
from titans_scale.model import ModelConfig, TitansLM
from titans_scale.model.layers import CausalDepthwiseConv
from titans_scale.model.memory import NeuralMemory

aten = torch.ops.aten


def conv_backward_per_group(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                            transposed, _output_padding, _groups, output_mask, out_shape=None, **kw):
    """grad-input and grad-weight each cost one forward conv (w_shape holds in/groups)."""
    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


def measured_step_flops(cfg: ModelConfig, batch: int, seq_len: int, fix_conv: bool = True) -> int:
    torch.manual_seed(0)
    model = TitansLM(cfg)
    # the count models the reference paths: autograd through the chunk step, conv via F.conv1d
    # (impl="fused" adds a backward recompute of the inner forward; the shifted conv is elementwise)
    for m in model.modules():
        if isinstance(m, NeuralMemory):
            m.impl = "chunked"
        elif isinstance(m, CausalDepthwiseConv):
            m.impl = "naive"
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    mapping = {aten.convolution_backward: conv_backward_per_group} if fix_conv else {}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        logits, _ = model(tokens)
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    return fc.get_total_flops()


SMALL = dict(d_model=64, n_heads=4, chunk_size=16, window=32, segment_len=32, n_persistent=4, mem_expansion=2)

# Lengths chosen so the partial-chunk / partial-segment / dead-backward terms matter: without
# them the deep-memory MAL config is 3.8% off and MAC 1.7%.
NAMED = {
    "mag": (dict(layers=["swa", "mag"]), 72),
    "mac": (dict(layers=["mac", "mac"]), 72),
    "mac_stores_y": (dict(layers=["mac", "mac"], mac_memory_input="attention"), 72),
    "lmm": (dict(layers=["lmm", "swa"], mem_depth=1), 64),
    "mal": (dict(layers=["mal"], mem_depth=3), 64),
}


@pytest.mark.parametrize("name", list(NAMED))
def test_executed_flops_match_flop_counter(name):
    kw, L = NAMED[name]
    cfg = ModelConfig(**{**SMALL, **kw})
    measured = measured_step_flops(cfg, 2, L)
    predicted = step_flops(cfg, 2, L, count="executed").total
    assert measured > 0
    assert predicted == pytest.approx(measured, rel=0.02), (name, predicted / measured - 1)


def test_executed_flops_random_configs():
    """Edge cases: sequences shorter than a chunk / window / segment, partial pieces, depths 1-3,
    fewer memory heads, no persistent tokens, untied head, memory recompute, every mixer."""
    rng = random.Random(7)
    for _ in range(8):
        C = rng.choice([4, 8, 16])
        layers = [rng.choice(["mac", "mag", "mal", "lmm", "swa", "seg", "attn"]) for _ in range(rng.choice([1, 2]))]
        cfg = ModelConfig(d_model=32, n_heads=rng.choice([2, 4]), chunk_size=C, segment_len=C * rng.choice([1, 2, 3]),
                          window=rng.choice([4, 8, 12]), n_persistent=rng.choice([0, 2]), mem_expansion=2,
                          layers=layers, mem_depth=rng.choice([1, 2, 3]), mem_heads=rng.choice([0, 1, 2]),
                          conv_kernel=rng.choice([2, 4]), tie_embeddings=rng.choice([True, False]),
                          recompute_group=rng.choice([0, 0, 1, 2]))
        L, B = rng.randint(1, 40), rng.choice([1, 3])
        measured = measured_step_flops(cfg, B, L)
        assert step_flops(cfg, B, L, count="executed").total == pytest.approx(measured, rel=0.02), (cfg, L, B)


def test_stock_counter_overcounts_depthwise_conv_backward():
    """Why the tests register their own conv-backward formula: torch's ignores groups.
    If this starts failing, torch fixed it and the custom mapping can go."""
    cfg = ModelConfig(**{**SMALL, "layers": ["lmm"]})
    assert measured_step_flops(cfg, 1, 32, fix_conv=False) > 1.2 * measured_step_flops(cfg, 1, 32)


@pytest.mark.parametrize("mixer, lengths", [("swa", [32, 64, 96]), ("mag", [64]), ("mal", [32]),
                                            ("seg", [20, 32, 72]), ("mac", [8, 40, 64]), ("attn", [1, 17, 50])])
def test_attention_pairs_match_the_masks(monkeypatch, mixer, lengths):
    """Model pairs = the True entries of the masks SDPA receives; executed = the full q x k
    blocks. (The sliding window pads queries to whole windows, whose mask rows are not
    useful work, so its lengths are multiples of the window here.)"""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape, k.shape, attn_mask))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    cfg = ModelConfig(**{**SMALL, "layers": [mixer]})
    model = TitansLM(cfg)
    for L in lengths:
        calls.clear()
        with torch.no_grad():
            model(torch.randint(0, 259, (2, L)))
        per_seq_head = 2 * cfg.n_heads
        executed = sum(q[:-1].numel() * k[-2] for q, k, _ in calls) / per_seq_head
        useful = sum(m.expand(*q[:-1], k[-2]).sum().item() for q, k, m in calls) / per_seq_head
        if mixer in ("swa", "mag", "mal") and L > cfg.window:
            # block 0 ran once more with the mask the later blocks share, its output discarded:
            # w queries x (w in-window keys + persistent ones) that are not useful work
            useful -= cfg.window * (cfg.window + cfg.n_persistent)
        assert attention_pairs(cfg, mixer, L, "executed") == executed, (mixer, L)
        assert attention_pairs(cfg, mixer, L, "model") == useful, (mixer, L)
        assert useful <= executed


def test_model_count_is_the_standard_convention():
    """Plain causal Transformer, no persistent tokens: 6 x (matmul params + head) per token
    plus 6 x 2 d x (average keys per query) per layer (Kaplan et al.'s 6N + 12 l d n_ctx,
    with the causal half)."""
    cfg = ModelConfig(d_model=128, n_heads=4, layers=["attn"] * 3, n_persistent=0, vocab_size=300)
    L = 256
    matmul_params = 3 * (4 * 128 * 128 + 3 * 128 * cfg.resolved_mlp_hidden) + 300 * 128
    expected = 6 * matmul_params + 3 * 6 * 2 * 128 * (L + 1) / 2
    assert model_flops_per_token(cfg, L) == pytest.approx(expected, rel=1e-12)
    assert model_flops_per_token(cfg, L, training=False) == pytest.approx(expected / 3, rel=1e-12)


def test_model_count_below_executed_and_batch_terms():
    cfg = ModelConfig(**{**SMALL, "layers": ["mac", "mag", "mal", "lmm"]})
    for L in (64, 72, 256):
        model, executed = (step_flops(cfg, 4, L, count=c) for c in ("model", "executed"))
        assert model.total < executed.total
        assert model.total == 3 * model.forward
    # Per token without a batch size leaves out the batch-independent persistent projection.
    with_batch = model_flops_per_token(cfg, 64, batch_size=8)
    assert model_flops_per_token(cfg, 64) < with_batch
    assert with_batch == pytest.approx(step_flops(cfg, 8, 64).per_token)
    assert with_batch == pytest.approx(model_flops_per_token(cfg, 64), rel=1e-2)


def test_param_count_matches_the_model():
    for kw in (dict(layers=["mac", "mag", "mal", "lmm", "swa", "seg", "attn"]),
               dict(layers=["mag"], mem_depth=1, tie_embeddings=False, n_persistent=0),
               dict(layers=["lmm", "mac"], mem_depth=3, mem_heads=2, conv_kernel=3)):
        cfg = ModelConfig(**{**SMALL, **kw})
        model = TitansLM(cfg)
        assert param_count(cfg) == model.num_params()
        assert param_count(cfg, non_embedding=False) == model.num_params(non_embedding=False)


def test_bad_arguments():
    cfg = ModelConfig(**SMALL)
    with pytest.raises(ConfigError, match="count"):
        step_flops(cfg, 1, 64, count="hardware")
    with pytest.raises(ConfigError, match="seq_len"):
        step_flops(cfg, 1, 0)
