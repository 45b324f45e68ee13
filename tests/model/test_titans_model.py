"""TitansLM: streaming equals one call, causality, attention patterns vs dense masks, config errors."""

import pytest
import torch
import torch.nn.functional as F

from titans_scale.model import MIXERS, ModelConfig, ModelConfigError, TitansLM
from titans_scale.model.attention import segment_attention, sliding_window_attention
from titans_scale.model.memory import NeuralMemory


def tiny_cfg(mixer, **kw):
    base = dict(d_model=32, n_heads=2, layers=[mixer, mixer], chunk_size=4, window=6, segment_len=8,
                n_persistent=2, mem_expansion=2)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(mixer, seed=0, **kw):
    torch.manual_seed(seed)
    return TitansLM(tiny_cfg(mixer, **kw)).double()


@pytest.mark.parametrize("mixer", MIXERS)
def test_streaming_in_pieces_equals_one_call(mixer):
    model = tiny_model(mixer)
    tok = torch.randint(0, 259, (2, 29))
    full, _ = model(tok)
    for cuts in ([5, 13, 14], [8, 16, 24], [1, 2, 3, 27], [20]):
        state, outs, bounds = None, [], [0, *cuts, 29]
        for a, b in zip(bounds[:-1], bounds[1:]):
            logits, state = model(tok[:, a:b], state)
            outs.append(logits)
        assert (torch.cat(outs, 1) - full).abs().max() < 1e-10, cuts
        assert state.position == 29


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("depth", [1, 2])
def test_causality(mixer, depth):
    model = tiny_model(mixer, mem_depth=depth)
    tok = torch.randint(0, 259, (1, 30))
    ref, _ = model(tok)
    for j in (1, 7, 8, 17, 29):              # mid-chunk, chunk and segment boundaries, last
        t2 = tok.clone()
        t2[0, j] = (t2[0, j] + 1) % 259
        out, _ = model(t2)
        assert torch.equal(out[:, :j], ref[:, :j]), f"token {j} changed an earlier output"
        assert not torch.allclose(out[:, j:], ref[:, j:])


def _dense(q, k, v, mask, pk, pv):
    B, h = q.shape[:2]
    k = torch.cat([pk.expand(B, h, -1, -1), k], 2)
    v = torch.cat([pv.expand(B, h, -1, -1), v], 2)
    mask = torch.cat([torch.ones(mask.shape[0], pk.shape[2], dtype=torch.bool), mask], 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("Lk,Lq,w", [(23, 23, 5), (23, 7, 5), (9, 1, 4), (16, 16, 16), (3, 3, 8)])
def test_sliding_window_equals_dense_mask(Lk, Lq, w):
    q = torch.randn(2, 3, Lq, 8, dtype=torch.float64)
    k, v = torch.randn(2, 3, Lk, 8, dtype=torch.float64), torch.randn(2, 3, Lk, 8, dtype=torch.float64)
    pk, pv = torch.randn(1, 3, 2, 8, dtype=torch.float64), torch.randn(1, 3, 2, 8, dtype=torch.float64)
    qpos = torch.arange(Lk - Lq, Lk)[:, None]
    diff = qpos - torch.arange(Lk)[None]
    ref = _dense(q, k, v, (diff >= 0) & (diff < w), pk, pv)
    out = sliding_window_attention(q, k, v, w, pk, pv)
    assert (out - ref).abs().max() < 1e-12


def test_segment_attention_with_memory_tokens_equals_dense_mask():
    S, L = 4, 10
    q, k, v, hk, hv = (torch.randn(1, 2, L, 8, dtype=torch.float64) for _ in range(5))
    pk, pv = torch.randn(1, 2, 3, 8, dtype=torch.float64), torch.randn(1, 2, 3, 8, dtype=torch.float64)
    out = segment_attention(q, k, v, S, pk, pv, hk, hv)
    for i in range(L):
        s0 = i // S * S
        keys = torch.cat([hk[:, :, s0:i + 1], k[:, :, s0:i + 1]], 2)
        vals = torch.cat([hv[:, :, s0:i + 1], v[:, :, s0:i + 1]], 2)
        mask = torch.ones(1, keys.shape[2], dtype=torch.bool)
        ref = _dense(q[:, :, i:i + 1], keys, vals, mask, pk, pv)
        assert (out[:, :, i:i + 1] - ref).abs().max() < 1e-12


@pytest.mark.parametrize("mixer", ["mac", "mag", "mal", "lmm"])
def test_outer_loss_trains_every_memory_parameter(mixer):
    model = tiny_model(mixer)
    tok = torch.randint(0, 259, (2, 24))
    logits, _ = model(tok)
    F.cross_entropy(logits.flatten(0, 1), tok.flatten()).backward()
    for name, p in model.named_parameters():
        if ".memory." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kw,field", [
    (dict(n_heads=3), "model.n_heads"),
    (dict(mem_heads=5), "model.mem_heads"),
    (dict(layers=["mag", "transformer"]), r"model.layers\[1\]: unknown mixer 'transformer'"),
    (dict(segment_len=6), "model.segment_len"),
    (dict(chunk_size=0), "model.chunk_size"),
    (dict(max_lr=2.0), "model.max_lr"),
    (dict(layers=[]), "model.layers"),
    (dict(mac_output="sum"), "model.mac_output"),
    (dict(mac_memory_input="y"), "model.mac_memory_input"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ModelConfigError, match=field):
        tiny_cfg("mag", **kw)


def test_gate_initialisation_keeps_memory_long():
    """docs/design.md section 3: at init the memory keeps most of what it stores over thousands of tokens
    and the inner step is bounded, so a 1k-token sequence neither forgets nor blows up."""
    model = tiny_model("lmm")
    mem = model.blocks["0"].mixer.memory
    with torch.no_grad():
        theta, eta, alpha = mem.gate_values(torch.randn(1, 64, 32, dtype=torch.float64) * 0.1)
    assert (1 - alpha).log().sum(-1).mean().mul(2048 / 64).exp() > 0.5     # kept after 2048 tokens
    assert eta.mean().item() == pytest.approx(0.9, abs=0.03)
    assert theta.max() <= mem.max_lr
    with torch.no_grad():                     # correlated inputs (repeated tokens) stay finite
        out, state = model(torch.full((1, 1024), 7))
    assert torch.isfinite(out).all() and all(w.abs().max() < 1e3 for w in state.layers[0].memory.weights)


@pytest.mark.parametrize("norm", [True, False])
def test_only_a_plain_linear_memory_starts_empty(norm):
    """docs/design.md, memory defaults: LN of a zero g divides by sqrt(eps), so a normalised linear
    memory starts random like a deep one; the plain linear memory starts at W^0 = 0."""
    w0 = lambda depth: NeuralMemory(ModelConfig(d_model=32, n_heads=2, mem_depth=depth, mem_norm=norm)).init_weights  # noqa: E731
    assert all(w.abs().max() > 0 for w in w0(2))
    assert bool((w0(1)[0] == 0).all()) is not norm


@pytest.mark.parametrize("mixer", ["mag", "mac"])
def test_memory_recompute_gives_the_same_gradients(mixer):
    tok = torch.randint(0, 259, (1, 40))
    grads = []
    for g in (0, 2):
        model = tiny_model(mixer, recompute_group=g)
        logits, _ = model(tok)
        F.cross_entropy(logits.flatten(0, 1), tok.flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


PAPER_FORMS = dict(mem_residual=False, mac_memory_input="attention", mac_output="gate")


@pytest.mark.parametrize("mixer,kw", [("mac", PAPER_FORMS), ("mag", PAPER_FORMS), ("mal", PAPER_FORMS),
                                      ("mac", dict(mac_output="product")), ("mac", dict(mac_output="gate")),
                                      ("mac", dict(mem_attn_norm=False)),
                                      ("mal", dict(mem_attn_norm=False)),
                                      ("mac", dict(mac_memory_input="attention")),
                                      ("mac", dict(mem_residual=False))])
def test_memory_attention_options_stream_and_stay_causal(mixer, kw):
    """The non-default ways the memory meets attention (the paper's forms among them) keep streaming exact
    and the model causal."""
    model = tiny_model(mixer, **kw)
    tok = torch.randint(0, 259, (2, 29))
    full, _ = model(tok)
    a, state = model(tok[:, :13])
    b, _ = model(tok[:, 13:], state)
    assert (torch.cat([a, b], 1) - full).abs().max() < 1e-10
    t2 = tok.clone()
    t2[:, 17] = (t2[:, 17] + 1) % 259
    out, _ = model(t2)
    assert torch.equal(out[:, :17], full[:, :17]) and not torch.allclose(out[:, 17:], full[:, 17:])


@pytest.mark.parametrize("mixer", ["mac", "mal"])
def test_memory_reads_enter_attention_normalised(mixer):
    """mem_attn_norm: the memory's read reaches attention at unit RMS (a raw read is ~1e-2 at init,
    which starved MAC's and MAL's attention of the memory; docs/long_context.md)."""
    mix = tiny_model(mixer).blocks["1"].mixer
    attn, name, arg = (mix.attn, "segments", 3) if mixer == "mac" else (mix.swa.attn, "sliding", 0)
    orig, seen = getattr(attn, name), []

    def spy(*args):
        seen.append(args[arg])
        return orig(*args)
    setattr(attn, name, spy)                  # an instance attribute shadows the method
    mix(torch.randn(1, 20, 32, dtype=torch.float64), None, 0)
    rms = torch.cat([t.flatten(0, 1) for t in seen]).pow(2).mean(-1).sqrt()
    assert len(seen) and torch.allclose(rms, torch.ones_like(rms), atol=1e-3)


@pytest.mark.parametrize("mixer", ["mag", "mal", "mac"])
def test_mem_residual_adds_the_memory_read_to_the_output(mixer):
    """model.mem_residual: the layer's output is the paper's plus the memory's read (M(x) for MAG and
    MAL, MAC's retrieved h), so a change of that read alone moves the output by exactly as much."""
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    outs = {}
    for residual in (False, True):
        torch.manual_seed(0)
        mix = tiny_model(mixer, mem_residual=residual).blocks["1"].mixer
        reads = []
        orig = mix.memory.output

        def spy(y, xx):
            out = orig(y, xx)
            reads.append(out)
            return out
        mix.memory.output = spy
        outs[residual] = mix(x, None, 0)[0]
    added = outs[True] - outs[False]
    # MAC reads once per segment (h) and once per update (its Eq. 25 gate): h is the first of each pair
    read = torch.cat(reads[::2], 1) if mixer == "mac" else reads[-1]
    assert added.abs().max() > 1e-6 and torch.allclose(added, read, atol=1e-12)


@pytest.mark.parametrize("store", ["attention", "input"])
def test_mac_memory_stores_what_mac_memory_input_names(store):
    """model.mac_memory_input: MAC's memory is updated with the attention output y (Eq. 24, normed),
    or with the segment's own inputs x (as titans-pytorch's MAC stores the residual stream)."""
    mix = tiny_model("mac", mac_memory_input=store).blocks["1"].mixer
    orig, seen = mix.memory.scan, []

    def spy(x, state, *projected):
        seen.append(x)
        return orig(x, state, *projected)
    mix.memory.scan = spy
    x = torch.randn(1, 16, 32, dtype=torch.float64)
    mix(x, None, 0)
    stored = torch.cat(seen, 1)
    assert torch.equal(stored, x) is (store == "input")
    if store == "attention":      # RMS-normed y
        assert torch.allclose(stored.pow(2).mean(-1), torch.ones(1, 16, dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize("store,calls", [("input", [3]), ("attention", [1, 3])])
def test_mac_projects_each_segment_once_when_it_stores_its_inputs(store, calls):
    """Storing x_s, the read's q and the update's q, k, v come from one projection of x_s (the
    same numbers: the streaming and parity tests hold them); storing y, the read projects q alone."""
    mix = tiny_model("mac", mac_memory_input=store).blocks["1"].mixer
    orig, seen = mix.memory.project, []

    def spy(x, cache, parts=3):
        seen.append(parts)
        return orig(x, cache, parts)
    mix.memory.project = spy
    mix(torch.randn(1, 16, 32, dtype=torch.float64), None, 0)
    assert seen == calls * (16 // mix.segment)
