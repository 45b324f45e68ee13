"""Which parameters weight decay applies to: one rule for every optimizer (train/optim.py,
parallel/megatron_engine.py, parallel/deepspeed_engine.py)."""

from __future__ import annotations

import torch


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Decay 2-D+ projection weights only: not norms, biases, gates' biases, embeddings (a
    pipeline's tied head copy included), persistent tokens, W^0 (the memory's initial
    weights are a state, not a projection) or the normalised memory's per-head LN affine."""
    return (param.dim() < 2 or "init_weights" in name or name.endswith("embed.weight")
            or name.endswith(("ln_weight", "ln_bias"))
            or "persistent" in name or getattr(param, "shared_embedding", False))


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups for `module`'s trainable parameters: decayed, and not."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
