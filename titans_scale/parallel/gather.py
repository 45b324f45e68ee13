"""Gather a parallel model's shards back into single-device TitansLM tensors.

``gather_full(chunks, values)`` returns, on every rank, one full tensor per TitansLM parameter
name: TP shards are all-gathered along their ``partition_dim`` (megatron's attribute),
pipeline stages exchange their pieces, and the vocabulary padding is cut off. ``values``
picks what to gather for each parameter (the weights, their gradients, an optimizer moment).
Meant for tests, consolidated exports and debugging: it moves the whole model through every
rank, so keep it off the training hot path.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from titans_scale.device import collective_device

__all__ = ["gather_full"]


def _all_gather_tp(t: torch.Tensor, dim: int) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return t
    t = t.to(collective_device(group)).contiguous()
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=dim)


def gather_full(chunks, values: Callable[[str, torch.nn.Parameter], torch.Tensor | None] | None = None
                ) -> dict[str, torch.Tensor]:
    """{TitansLM parameter name: full tensor} on every rank (a collective over the model-parallel
    ranks: call it on all of them). values(name, param) -> tensor or None (default: the weight)."""
    values = values or (lambda name, p: p.detach())
    mine: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        stage = _unwrap(chunk)
        for name, p in stage.named_parameters():
            full_name = stage.full_name(name)
            if full_name is None:
                continue
            t = values(full_name, p)
            if t is None:
                continue
            shape = getattr(p, "ds_shape", p.shape)     # ZeRO-3 keeps an empty local tensor
            t = t.detach().reshape(shape).float()
            if getattr(p, "tensor_model_parallel", False):
                t = _all_gather_tp(t, p.partition_dim)
            t = t.cpu().clone()                                   # a copy: grads get reused
            if full_name in ("embed.weight", "head.weight"):
                t = t[: stage.vocab_size]
            mine[full_name] = t
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) == 1:
        return mine
    everyone: list[dict] = [None] * dist.get_world_size(pp_group)  # type: ignore[list-item]
    dist.all_gather_object(everyone, mine, group=pp_group)
    out: dict[str, torch.Tensor] = {}
    for part in everyone:
        out.update(part)
    return out


def _unwrap(module):
    """The TitansStage inside megatron's DDP or DeepSpeed's engine wrappers."""
    while not hasattr(module, "full_name"):
        module = module.module
    return module
