"""The megatron engine's patches for torch's AdamW (its per-parameter 'step', which megatron's
distributed optimizer mishandles on load) apply to torch's optimizer only: with Transformer
Engine importable megatron builds TE's FusedAdam, which keeps 'step' in its param groups, and
the patches must leave it alone (the parity tests cover the torch path end to end)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from titans_scale.parallel.megatron_engine import MegatronEngine, _torch_adam


class FusedAdam(torch.optim.Optimizer):
    """Stands for transformer_engine.pytorch.optimizers.FusedAdam: 'step' in the param group."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1e-3, "step": 0})


FusedAdam.__module__ = "transformer_engine.pytorch.optimizers.fused_adam"


def _engine_with(inner) -> tuple[MegatronEngine, SimpleNamespace]:
    def init_state_fn(opt, config=None):
        for g in opt.param_groups:
            for p in g["params"]:
                opt.state[p]["exp_avg"] = torch.zeros_like(p)

    dist_opt = SimpleNamespace(optimizer=inner, init_state_fn=init_state_fn, config=None)
    engine = MegatronEngine.__new__(MegatronEngine)
    engine.optimizer = dist_opt
    return engine, dist_opt


def test_fresh_state_gets_torchs_per_parameter_step_only_for_torch_adam():
    p = torch.nn.Parameter(torch.zeros(3))
    torch_engine, torch_opt = _engine_with(torch.optim.AdamW([p]))
    te_engine, te_opt = _engine_with(FusedAdam([torch.nn.Parameter(torch.zeros(3))]))
    assert _torch_adam(torch_opt) and not _torch_adam(te_opt)
    torch_engine._allocate_state()
    te_engine._allocate_state()
    assert set(torch_opt.optimizer.state[p]) == {"exp_avg", "step"}
    (te_state,) = te_opt.optimizer.state.values()
    assert set(te_state) == {"exp_avg"}, "FusedAdam's state got torch's per-parameter step"
