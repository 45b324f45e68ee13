"""Context parallelism (titans_scale.parallel.context) against the single-process run.

Each distributed test spawns its ranks once and runs many checks in them (starting processes
is the slow part). Every rank recomputes the single-process reference on the full sequence
from the same seed, runs the context-parallel version on its shard, and returns its errors;
the assertions happen here.

Op level (float64, 1e-10): cp_memory_scan's outputs, final memory state and the gradients of
every input and of the start state, for a2a / state_passing / ring, memory depth 1 and 2
(state_passing: 1), even shards and uneven shards that cut chunks, starting fresh or from a
mid-chunk MemoryState. Measured bytes equal the analytical formulas; state_passing's do not
change with the sequence length, a2a's grow linearly.
Model level (fp32, 1e-5): logits, final memory states and every parameter gradient of a
TitansLM holding every mixer a strategy supports (plus the attention-only ones), including
a split whose shard is shorter than the window (two halo rounds) and MAC segments that
straddle shards. TP=2 x CP=2: the same through the tensor-parallel stage (megatron layers).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from titans_scale.model import ModelConfig, TitansLM
from titans_scale.model.mixers import MIXER_CLASSES
from titans_scale.ops.memory import MemoryState, memory_scan
from titans_scale.parallel.context import CPComm, CPConfigError, check_cp_config, cp_memory_scan, shard_bounds
from titans_scale.parallel.context.apply import (CPLayerState, apply_context_parallel, cp_allreduce_grads,
                                                 mixer_strategy, remove_context_parallel)
from titans_scale.parallel.context.cost import MemoryShape, memory_bytes
from titans_scale.parallel.context.halo import _rounds
from titans_scale.parallel.launch_utils import run_distributed

OP_TOL, MODEL_TOL = 1e-10, 1e-5
OP_CASES = [("a2a", 1), ("a2a", 2), ("state_passing", 1), ("ring", 1), ("ring", 2)]
B, H, D_HEAD, C = 2, 4, 4, 4


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _cuts(L: int, P: int, uneven: bool) -> list[int]:
    if not uneven:
        return [0] + [b for _, b in shard_bounds(L, P, C)]
    return {2: [0, 9, L], 4: [0, 3, 9, 14, L]}[P]           # chunk (C=4) boundaries cut anywhere


# ------------------------------------------------------------------ op level (in the ranks)


def _op_inputs(L, depth, seed, start_mid_chunk):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k = F.normalize(r(B, H, L, D_HEAD), dim=-1), F.normalize(r(B, H, L, D_HEAD), dim=-1)
    v = r(B, H, L, D_HEAD)
    theta = torch.rand(B, H, L, generator=g, dtype=torch.float64) * 0.6
    eta = torch.rand(B, H, L, generator=g, dtype=torch.float64)
    alpha = torch.rand(B, H, L, generator=g, dtype=torch.float64) * 0.4
    dims = [D_HEAD] + [2 * D_HEAD] * (depth - 1) + [D_HEAD]
    init = [r(B, H, dims[i], dims[i + 1]) * 0.3 for i in range(depth)]
    if start_mid_chunk:        # continue a stream: a MemoryState 6 tokens in (2 into a chunk)
        pre = [F.normalize(r(B, H, 6, D_HEAD), dim=-1) for _ in range(2)] + [r(B, H, 6, D_HEAD)]
        gates = [torch.rand(B, H, 6, generator=g, dtype=torch.float64) * 0.5 for _ in range(3)]
        _, st = memory_scan(*pre, *gates, init, C, "chunked")
        init = st.tensors()
    weights = [r(*t.shape) for t in init]                 # loss weights of the final state
    return [q, k, v, theta, eta, alpha], init, r(B, H, L, D_HEAD), weights, start_mid_chunk


def _as_init(ts, depth, mid):
    return MemoryState(ts[:depth], ts[depth:2 * depth], ts[2 * depth:], 2, C) if mid else list(ts)


def _op_case(comm, strategy, depth, L, cuts, mid, seed=0):
    ins, init, dy, wts, mid = _op_inputs(L, depth, seed + 10 * depth + L, mid)
    leaves = [t.clone().requires_grad_(True) for t in ins + init]
    y, st = memory_scan(*leaves[:6], _as_init(leaves[6:], depth, mid), C, "chunked")
    loss = (y * dy).sum() + sum((a * w).sum() for a, w in zip(st.tensors(), wts))
    ref = torch.autograd.grad(loss, leaves)

    a, b = cuts[comm.rank], cuts[comm.rank + 1]
    loc = [t[:, :, a:b].clone().requires_grad_(True) for t in ins] + [t.clone().requires_grad_(True) for t in init]
    comm.reset_stats()
    y_cp, st_cp = cp_memory_scan(*loc[:6], _as_init(loc[6:], depth, mid), C, comm, strategy, "chunked")
    # each rank adds its share of the final-state loss; every rank holds the same final state
    loss = (y_cp * dy[:, :, a:b]).sum() + sum((s * w).sum() for s, w in zip(st_cp.tensors(), wts)) / comm.size
    grads = torch.autograd.grad(loss, loc, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, loc)]
    for g in grads[6:]:                                    # the start state is replicated: sum
        dist.all_reduce(g, group=comm.group)
    lengths = [cuts[i + 1] - cuts[i] for i in range(comm.size)]
    shape = MemoryShape(B, H, D_HEAD, D_HEAD, D_HEAD * D_HEAD if depth == 1 else 4 * D_HEAD * D_HEAD,
                        ndims=12 * depth, x_bytes=8, state_bytes=8)
    return {
        "y": _rel(y_cp, y[:, :, a:b]),
        "state": max(_rel(s, r) for s, r in zip(st_cp.tensors(), st.tensors())),
        "position": st_cp.position == st.position,
        "grad_inputs": max(_rel(g, r[:, :, a:b]) for g, r in zip(grads[:6], ref[:6])),
        "grad_init": max(_rel(g, r) for g, r in zip(grads[6:], ref[6:])),
        "bytes": {p: comm.total_bytes(p) for p in ("fwd", "bwd")},
        "bytes_formula": memory_bytes(strategy, shape, lengths, comm.rank, micro_batches=2 * comm.size),
    }


# --------------------------------------------------------------- model level (in the ranks)


def _model_cfg(layers, depth, mem_heads=4):
    return ModelConfig(d_model=16, n_heads=2, mem_heads=mem_heads, layers=layers, mem_depth=depth, mem_expansion=2,
                       chunk_size=4, window=6, segment_len=8, n_persistent=2, vocab_size=50, mem_norm=False)


def _model(layers, depth):
    torch.manual_seed(0)
    model = TitansLM(_model_cfg(layers, depth))
    with torch.no_grad():                   # a larger inner step, so the memory matters to the output
        for m in model.modules():
            if hasattr(m, "reset_gates"):
                m.gates.bias.view(-1, 3)[:, 0] = 2.0
    return model


def _final_memory(state):
    if isinstance(state, CPLayerState):
        return state.memory
    mem = getattr(state, "memory", None)
    return getattr(mem, "memory", mem)


def _model_case(comm, strategy, layers, depth, L, cuts):
    model = _model(layers, depth)
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, 50, (2, L), generator=g)
    R = torch.randn(2, L, 50, generator=g)
    cp_model = copy.deepcopy(model)
    logits, state = model(tok)
    (logits * R).sum().backward()

    apply_context_parallel(cp_model, comm.group, strategy)
    a, b = cuts[comm.rank], cuts[comm.rank + 1]
    lg, cp_state = cp_model(tok[:, a:b])
    (lg * R[:, a:b]).sum().backward()
    cp_allreduce_grads(cp_model, comm)
    pairs = [(p2.grad, p1.grad) for p1, p2 in zip(model.parameters(), cp_model.parameters())]
    states = [(_final_memory(s2), _final_memory(s1)) for s1, s2 in zip(state.layers, cp_state.layers)]
    states = [(x, y) for s2, s1 in states if s1 is not None for x, y in zip(s2.tensors(), s1.tensors())]
    remove_context_parallel(cp_model)
    return {
        "logits": _rel(lg, logits[:, a:b]),
        "grads": max(_rel(x, y) for x, y in pairs if y is not None and y.abs().max() > 0),
        "grads_missing": sum((x is None) != (y is None) for x, y in pairs),
        "state": max(_rel(x, y) for x, y in states),
        "n_states": len(states),
    }


def _model_cuts(L, P, uneven):
    if not uneven:
        return [0] + [b for _, b in shard_bounds(L, P, C)]
    # P=4: rank 2 holds 2 tokens < window-1 (two halo rounds); offsets cut chunks and segments
    return {2: [0, 13, L], 4: [0, 10, 12, 21, L]}[P]


def _cp_checks(comm: CPComm) -> dict:
    torch.manual_seed(0)
    P, out = comm.size, {}
    for strategy, depth in OP_CASES:
        for L, uneven in ((16, False), (23, True)):
            out[("op", strategy, depth, L)] = _op_case(comm, strategy, depth, L, _cuts(L, P, uneven), mid=uneven)
    for strategy in ("a2a", "state_passing", "ring"):        # bytes at twice the length
        out[("op", strategy, 1, 32)] = _op_case(comm, strategy, 1, 32, _cuts(32, P, False), mid=False)
    attention = ["swa", "seg", "attn"]
    for strategy, depths, extra in (("a2a", (1, 2), []), ("state_passing", (1,), []), ("ring", (1, 2), ["mac"])):
        for depth in depths:
            for L, uneven in ((32, False), (29, True)):
                out[("model", strategy, depth, L)] = _model_case(
                    comm, strategy, ["mag", "mal", "lmm", *extra, *attention], depth, L, _model_cuts(L, P, uneven))
    return out


def _all_checks() -> dict:
    """One spawn of 4 ranks does everything: CP=4 over the world, CP=2 over the pairs {0, 1}
    and {2, 3} at once, then TP=2 x CP=2 through megatron's groups."""
    rank = dist.get_rank()
    out = {4: _cp_checks(CPComm())}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    out[2] = _cp_checks(CPComm(pairs[rank // 2]))
    out["tp2cp2"] = _tp_cp_checks()
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all_checks, 4, timeout_s=400)


@pytest.fixture(params=[2, 4], ids=["cp2", "cp4"])
def cp_results(request, results):
    return request.param, [r[request.param] for r in results]


def _entries(cp_results, kind: str):
    """(where, entry) of every rank's results of `kind` ("op" or "model")."""
    P, ranks = cp_results
    for key in [k for k in ranks[0] if k[0] == kind]:
        for r, res in enumerate(ranks):
            yield f"cp={P} rank {r} {key}", res[key]


def test_memory_op_matches_single_process(cp_results):
    for where, e in _entries(cp_results, "op"):
        assert e["position"], where
        for name in ("y", "state", "grad_inputs", "grad_init"):
            assert e[name] < OP_TOL, f"{where}: {name} rel err {e[name]:.2e}"


def test_measured_bytes_match_formulas_and_scale(cp_results):
    for where, e in _entries(cp_results, "op"):
        assert e["bytes"] == e["bytes_formula"], where
    P, ranks = cp_results
    for r, res in enumerate(ranks):
        short, long = (res[("op", "state_passing", 1, L)]["bytes"] for L in (16, 32))
        assert short == long and short["fwd"] > 0, f"state_passing bytes changed with L: {short} vs {long}"
        short, long = (res[("op", "ring", 1, L)]["bytes"] for L in (16, 32))
        assert short == long, f"ring bytes changed with L: {short} vs {long}"
        # a2a: everything but the final-state gather and the lengths is proportional to L
        fixed = (P - 1) * B * (H // P) * 3 * D_HEAD * D_HEAD * 8
        short, long = (res[("op", "a2a", 1, L)]["bytes"] for L in (16, 32))
        assert long["fwd"] - fixed - 8 * (P - 1) == 2 * (short["fwd"] - fixed - 8 * (P - 1)) > 0
        assert long["bwd"] - fixed == 2 * (short["bwd"] - fixed) > 0


def test_model_matches_single_process(cp_results):
    for where, e in _entries(cp_results, "model"):
        assert e["grads_missing"] == 0 and e["n_states"] > 0, where
        for name in ("logits", "grads", "state"):
            assert e[name] < MODEL_TOL, f"{where}: {name} rel err {e[name]:.2e}"


# ------------------------------------------------------------------------- TP=2 x CP=2


def _tp_cp_checks() -> dict:
    import dataclasses

    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    from titans_scale.parallel.gather import gather_full
    from titans_scale.parallel.layout import padded_vocab_size
    from titans_scale.parallel.stage import TitansStage
    from titans_scale.parallel.state import destroy_parallel, init_parallel

    info = init_parallel(tp=2, cp=2)
    comm = CPComm(parallel_state.get_context_parallel_group())
    tp_group = parallel_state.get_tensor_model_parallel_group()
    out = {"cp_rank": info.cp_rank, "tp_rank": info.tp_rank}
    L = 23
    cuts = [0, 9, L]
    a, b = cuts[comm.rank], cuts[comm.rank + 1]
    heads = slice(info.tp_rank * H // 2, (info.tp_rank + 1) * H // 2)

    # op level: this TP rank's heads, its CP shard
    for strategy, depth in (("a2a", 2), ("state_passing", 1), ("ring", 2)):
        ins, init, dy, wts, _ = _op_inputs(L, depth, 7 + depth, False)
        leaves = [t.clone().requires_grad_(True) for t in ins + init]
        y, st = memory_scan(*leaves[:6], leaves[6:], C, "chunked")
        (y * dy).sum().backward()
        loc = [t[:, heads, a:b].clone().requires_grad_(True) for t in ins] + \
              [t[:, heads].clone().requires_grad_(True) for t in init]
        y_cp, st_cp = cp_memory_scan(*loc[:6], loc[6:], C, comm, strategy, "chunked")
        (y_cp * dy[:, heads, a:b]).sum().backward()
        gi = [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in loc[6:]]
        for g in gi:
            dist.all_reduce(g, group=comm.group)
        out[("op", strategy, depth)] = max(
            [_rel(y_cp, y[:, heads, a:b]), *(_rel(s, r[:, heads]) for s, r in zip(st_cp.tensors(), st.tensors())),
             *(_rel(t.grad, leaf.grad[:, heads, a:b]) for t, leaf in zip(loc[:6], leaves[:6])),
             *(_rel(g, leaf.grad[:, heads]) for g, leaf in zip(gi, leaves[6:]))])

    # model level: the tensor-parallel stage (megatron layers), context-parallel on top
    for strategy, depth, layers in (("a2a", 2, ["mag", "lmm", "swa"]), ("state_passing", 1, ["mal", "mag"]),
                                    ("ring", 2, ["mac", "mag", "seg"])):
        full = _model(layers, depth)
        ref = copy.deepcopy(full)
        g = torch.Generator().manual_seed(3)
        tok = torch.randint(0, 50, (2, L + 1), generator=g)
        inp, tgt = tok[:, :-1], tok[:, 1:]
        logits, _ = ref(inp)
        ref_loss = F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")      # [B, L]
        ref_loss.sum().backward()
        config = TransformerConfig(num_layers=len(layers), hidden_size=16, num_attention_heads=2,
                                   ffn_hidden_size=full.cfg.resolved_mlp_hidden, tensor_model_parallel_size=2,
                                   params_dtype=torch.float32, use_cpu_initialization=True,
                                   perform_initialization=False, transformer_impl="local")   # as build.py sets it
        stage = TitansStage(full, list(range(len(layers))), first=True, last=True, config=config,
                            layer_config=dataclasses.replace(config, sequence_parallel=False),
                            vocab_padded=padded_vocab_size(50, 2))
        apply_context_parallel(stage, comm.group, strategy)
        loss = stage(inp[:, a:b], tgt[:, a:b])                                          # [L_r, B]
        loss.sum().backward()
        cp_allreduce_grads(stage, comm)
        grads = gather_full([stage], lambda name, p: p.grad)
        ref_grads = dict(ref.named_parameters())
        out[("model", strategy, depth)] = {
            "loss": _rel(loss.t(), ref_loss[:, a:b].detach()),
            "grads": max(_rel(gr, ref_grads[n].grad) for n, gr in grads.items() if ref_grads[n].grad.abs().max() > 0),
            "n_grads": len(grads),
        }
    dist.barrier(group=tp_group)
    destroy_parallel()
    return out


def test_tp2_x_cp2_matches_single_process(results):
    ranks = [r["tp2cp2"] for r in results]
    assert sorted((r["tp_rank"], r["cp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r, res in enumerate(ranks):
        for key, e in res.items():
            if key[0] == "op":
                assert e < OP_TOL, f"rank {r} {key}: rel err {e:.2e}"
            elif key[0] == "model":
                assert e["n_grads"] > 10, f"rank {r} {key}"
                assert e["loss"] < MODEL_TOL and e["grads"] < MODEL_TOL, f"rank {r} {key}: {e}"


# ------------------------------------------------------------------ single process


def test_shard_bounds_even_uneven_and_too_short():
    assert shard_bounds(16, 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert shard_bounds(100, 4, 8) == [(0, 32), (32, 56), (56, 80), (80, 100)]   # 13 units: 4,3,3,3(partial)
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(CPConfigError, match="fewer than cp=4"):
        shard_bounds(12, 4, 8)


def test_halo_rounds_reach_past_short_shards():
    assert _rounds((10, 10, 10), 5) == [[5, 5, 5]]                 # one round: shards >= window
    plan = _rounds((10, 2, 9, 8), 5)                               # rank 2 needs 5, rank 1 has 2
    assert len(plan) == 2 and [0] + plan[-1][:-1] == [0, 5, 5, 5]


def _mixer(kind, depth=2, mem_heads=4):
    return MIXER_CLASSES[kind](_model_cfg([kind], depth, mem_heads))


def test_strategy_choice_and_refusals_say_why():
    assert mixer_strategy(_mixer("mac"), "ring", 2) == "ring"
    assert mixer_strategy(_mixer("mac"), "auto", 2) == "ring"
    assert mixer_strategy(_mixer("mag"), "auto", 2) == "a2a"
    assert mixer_strategy(_mixer("swa"), "a2a", 2) == "none"
    for strategy in ("a2a", "state_passing"):
        with pytest.raises(CPConfigError, match="mixer 'mac' cannot use .*previous segment wrote.*ring"):
            mixer_strategy(_mixer("mac", depth=1), strategy, 2)
    with pytest.raises(CPConfigError, match="mixer 'mag'.*state_passing.*mem_depth=1.*not affine"):
        mixer_strategy(_mixer("mag", depth=2), "state_passing", 2)
    assert mixer_strategy(_mixer("lmm", depth=1), "state_passing", 2) == "state_passing"
    with pytest.raises(CPConfigError, match="mixer 'lmm'.*4 memory heads .* cp=8"):
        mixer_strategy(_mixer("lmm"), "a2a", 8)
    assert mixer_strategy(_mixer("lmm", depth=1, mem_heads=2), "auto", 4) == "state_passing"
    assert mixer_strategy(_mixer("lmm", depth=2, mem_heads=2), "auto", 4) == "ring"
    with pytest.raises(CPConfigError, match="strategy 'zigzag' is unknown"):
        mixer_strategy(_mixer("lmm"), "zigzag", 2)


def test_config_check_before_any_process_group():
    cfg = _model_cfg(["mac", "mag", "swa"], 2)                      # 4 memory heads, depth 2
    assert check_cp_config(cfg, cp=2, tp=2) == ["ring", "a2a", "none"]
    assert check_cp_config(cfg, cp=4, tp=2) == ["ring", "ring", "none"]       # 2 heads per TP rank
    with pytest.raises(CPConfigError, match="mixer 'mag'.*2 memory heads per tensor-parallel rank.*cp=4"):
        check_cp_config(_model_cfg(["mag", "swa"], 2), cp=4, tp=2, strategy="a2a")
    with pytest.raises(CPConfigError, match="mixer 'mac' cannot use"):
        check_cp_config(cfg, cp=2, strategy="state_passing")
    with pytest.raises(CPConfigError, match="mem_heads=4 must be divisible by parallel.tp=3"):
        check_cp_config(cfg, cp=2, tp=3)
    with pytest.raises(CPConfigError, match="fewer than cp=4"):
        check_cp_config(cfg, cp=4, seq_len=8)                        # 2 chunks of 4 for 4 ranks
