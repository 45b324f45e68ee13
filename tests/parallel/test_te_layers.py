"""Transformer Engine in the parallel layouts: with fp8.backend resolving to TE, the tensor-parallel
swap builds megatron-core's TEColumnParallelLinear / TERowParallelLinear (the FP8 projections;
the memory gates and the head stay megatron's own), megatron's config carries the FP8 recipe,
and where TE cannot run the refusal names the reason and the emulated backend.

TE is not installable here (no CUDA): the choice is tested as a function of "TE can run", and
the swap with stand-ins for megatron's TE classes (megatron's own parallel linears plus TE's
extra constructor argument), so the layers built, their weights and the chunk's output are
checked on a real one-rank gloo world. The TE layers themselves run in the GPU suite
(tests/gpu/, bench/gpu_acceptance.py's fp8 section).
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from tests.helpers import make_cfg
from titans_scale.errors import ConfigError
from titans_scale.parallel.build import megatron_config
from titans_scale.parallel.layout import plan_layout
from titans_scale.parallel.launch_utils import run_distributed
from titans_scale.parallel.tensor_parallel import ColumnParallel, RowParallel, linear_classes, linear_impl
from titans_scale.precision.select import HardwareProbe, te_unavailable

H100_TE = HardwareProbe(cuda=True, capability=(9, 0), te_ok=True, te_reason="")
H100_NO_TE = HardwareProbe(cuda=True, capability=(9, 0), te_ok=False, te_reason="No module named 'transformer_engine'")
CPU = HardwareProbe(cuda=False, capability=None, te_ok=False, te_reason="no CUDA device")
A100 = HardwareProbe(cuda=True, capability=(8, 0), te_ok=True, te_reason="")


@pytest.mark.parametrize("backend", [None, "emulated"])
@pytest.mark.parametrize("why", ["", "no CUDA device"])
def test_megatron_layers_unless_fp8_runs_through_te(backend, why):
    assert linear_impl(backend, why) == "local"


def test_te_layers_when_fp8_runs_through_te():
    assert linear_impl("te", "") == "transformer_engine"


@pytest.mark.parametrize("hw, words", [(CPU, "no CUDA device"), (A100, "8.0 < 8.9"),
                                       (H100_NO_TE, "No module named 'transformer_engine'")])
def test_te_that_cannot_run_is_refused_with_the_reason_and_the_emulated_backend(hw, words):
    with pytest.raises(ConfigError) as err:
        linear_impl("te", te_unavailable(hw))
    msg = str(err.value)
    assert words in msg and "fp8.backend='emulated'" in msg and "\n" not in msg, msg


def test_te_unavailable_is_empty_where_te_runs():
    assert te_unavailable(H100_TE) == ""


def test_without_transformer_engine_megatron_te_layers_are_refused_by_name():
    assert linear_classes("local") == (ColumnParallel, RowParallel)
    with pytest.raises(ConfigError, match=r"HAVE_TE is False.*fp8\.backend='emulated'"):
        linear_classes("transformer_engine")


def test_plan_layout_refuses_te_where_it_cannot_run_and_accepts_it_where_it_can(monkeypatch):
    import titans_scale.parallel.layout as layout_mod

    cfg = make_cfg(dp=2)
    cfg.train.precision, cfg.fp8.backend = "fp8", "te"
    with pytest.raises(ConfigError, match=r"fp8\.backend='te'.*no CUDA device.*fp8\.backend='emulated'"):
        plan_layout(cfg, 2)
    monkeypatch.setattr(layout_mod, "te_unavailable", lambda: "")
    assert plan_layout(cfg, 2).dp == 2        # pure DP (and every other layout) takes TE now


@pytest.mark.parametrize("precision, backend, hw, impl", [
    ("bf16", "auto", H100_TE, "local"),
    ("fp8", "emulated", H100_TE, "local"),
    ("fp8", "auto", H100_NO_TE, "local"),
    ("fp8", "auto", H100_TE, "transformer_engine"),
    ("fp8", "te", H100_TE, "transformer_engine"),
])
def test_megatron_config_names_the_layer_family_and_te_recipe(precision, backend, hw, impl, monkeypatch):
    import titans_scale.parallel.layout as layout_mod

    monkeypatch.setattr(layout_mod, "te_unavailable", lambda: te_unavailable(hw))
    cfg = make_cfg()
    cfg.train.precision, cfg.fp8.backend = precision, backend
    cfg.fp8.amax_history_len = 7
    config = megatron_config(cfg, plan_layout(cfg, 1), probe=hw)
    assert config.transformer_impl == impl
    if impl == "transformer_engine":          # the run's recipe, not megatron's defaults
        assert (config.fp8, config.fp8_amax_history_len, config.fp8_recipe) == (cfg.fp8.format, 7, "delayed")
    else:
        assert config.fp8 is None


# ------------------------------------------------- the swap with stand-ins for TE's classes


class FakeTEColumn(ColumnParallelLinear):
    def __init__(self, *args, is_expert: bool, **kwargs):
        assert is_expert is False
        super().__init__(*args, **kwargs)


class FakeTERow(RowParallelLinear):
    def __init__(self, *args, is_expert: bool, **kwargs):
        assert is_expert is False
        super().__init__(*args, **kwargs)


def _build_with_fake_te() -> dict:
    import torch.nn.functional as F

    import titans_scale.parallel.build as build_mod
    import titans_scale.parallel.layout as layout_mod
    import titans_scale.parallel.tensor_parallel as tp_mod
    from titans_scale.model import TitansLM
    from titans_scale.parallel.state import init_parallel

    tp_mod.megatron_te_linears = lambda: (FakeTEColumn, FakeTERow)
    build_mod.probe_hardware = lambda: H100_TE
    layout_mod.te_unavailable = lambda: ""
    init_parallel(seed=0)
    cfg = make_cfg(layers=("mac", "swa"))
    cfg.train.precision, cfg.fp8.backend = "fp8", "te"
    (chunk,) = build_mod.build_chunks(cfg, plan_layout(cfg, 1))
    kinds = {name: type(m).__name__ for name, m in chunk.named_modules()
             if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}
    through_layer = {getattr(m, "q_rows_from_layer", None) for m in chunk.modules() if hasattr(m, "q_input")}
    x = torch.randint(0, 259, (2, 33), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(cfg.train.seed)
    model = TitansLM(cfg.model)
    with torch.no_grad():
        got = chunk(x[:, :-1], x[:, 1:])                     # per-token losses [L, B]
        logits, _ = model(x[:, :-1])
        want = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").t()
    return {"kinds": kinds, "losses": got, "want": want, "through_layer": through_layer}


def test_the_swap_builds_te_layers_for_the_fp8_projections_only():
    (out,) = run_distributed(_build_with_fake_te, 1, backend=None, timeout_s=300)
    kinds = out["kinds"]
    te = {n for n, k in kinds.items() if k.startswith("FakeTE")}
    assert te and all(n.endswith(("qkv", "out", "out_gate", "w_gate", "w_up", "w_down")) for n in te), kinds
    assert {n for n in kinds if n.endswith(("gates", "head"))} <= set(kinds) - te, kinds
    assert any(n.endswith("memory.gates") for n in kinds), kinds
    assert out["through_layer"] == {True}, "MAC's q-only read should run through the TE layer"
    # the TE layers hold the single-device weights: the chunk computes the model's losses (MAC's
    # q-only read included, through the whole layer)
    torch.testing.assert_close(out["losses"], out["want"], rtol=1e-5, atol=1e-5)


def test_q_only_read_through_the_layer_equals_the_row_subset():
    """MAC's q-only memory read: through the whole qkv layer (TE) or on its q rows, the same q,
    conv cache and input gradient; only the first calls the layer."""
    from titans_scale.model import ModelConfig
    from titans_scale.model.memory import NeuralMemory

    torch.manual_seed(0)
    mem = NeuralMemory(ModelConfig(d_model=32, n_heads=2, mem_heads=2, chunk_size=8))
    calls = []
    mem.qkv.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 12, 32)
    outs = []
    for through in (False, True):
        mem.q_rows_from_layer = through
        xi = x.clone().requires_grad_(True)
        (q,), cache = mem.project(xi, None, parts=1)
        q.pow(2).sum().backward()
        outs.append((q, cache, xi.grad))
    assert len(calls) == 1
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
