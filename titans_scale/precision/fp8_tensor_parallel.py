"""Emulated FP8 for megatron-core's tensor-parallel linears, applied from outside the model.

    convert_tp_linears_to_fp8(chunk, recipe, filter_fn)      # after tensor_parallel.py built it
    with fp8_autocast(True, recipe, amax_reduction_group=ps.get_amax_reduction_group(True)):
        ...forward and backward...

A ColumnParallelLinear / RowParallelLinear (or a subclass, e.g. tensor_parallel.ColumnParallel)
gets the FP8 state of Fp8Linear (Fp8MetaMixin: amax history, scales, the same quantize /
delayed-scaling code) and, inside an enabled fp8_autocast, runs its GEMM on this rank's shard
with FP8 operands; outside one it is the unchanged megatron layer. Only megatron's GEMM
(`_forward_impl`) is replaced, with the same communication around it: under sequence
parallelism the input is all-gathered along the sequence (reduce-scattered in the backward),
otherwise a column layer's input gradient is all-reduced over TP. The layer's own forward
(the row layer's all-reduce / reduce-scatter of its output, gather_output, bias handling)
is megatron's.

Why every TP rank uses the scales one process would (Transformer Engine's rule): each rank
records the amax of what it holds: a column layer's replicated input, a row layer's input
slice along the hidden dim, its weight shard, its slice of the output gradient (column) or
the whole one (row). fp8_autocast all-reduces these amaxes with MAX over the reduction group
before the delayed-scaling update, and the max over shards is the amax of the whole tensor,
so the amax history and the scale of each layer equal the single-process ones on every rank.
Cast with one scale, a shard of the quantized tensor is the quantized shard, so the FP8
operands are the single-process operands cut into shards; only the fp32 sums of the GEMMs
(and the row layer's all-reduce) add up in another order.

The reduction group must hold every rank that runs a layer on part of the same data: the TP
group, and the DP (and CP) ranks too if the scales are to be those of the whole global batch
(megatron's get_amax_reduction_group, TP x DP x CP, as Megatron-LM passes to TE).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce
from torch import nn

from titans_scale.errors import ConfigError
from titans_scale.precision.fp8_emulation import Fp8MetaMixin, fp8_enabled
from titans_scale.precision.recipe import Fp8Recipe

__all__ = ["TP_LINEARS", "convert_tp_linears_to_fp8"]

TP_LINEARS = (ColumnParallelLinear, RowParallelLinear)
# The arguments megatron's layers pass to their _forward_impl (megatron-core 0.16).
_GEMM_SIGNATURE = inspect.signature(linear_with_grad_accumulation_and_async_allreduce)


class _Fp8TPGemm(Fp8MetaMixin):
    """Mixed in before a megatron TP linear: its GEMM in FP8 inside an enabled fp8_autocast."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if not fp8_enabled():
            return super()._forward_impl(input, weight, *args, **kwargs)
        a = _GEMM_SIGNATURE.bind(input, weight, *args, **kwargs)
        a.apply_defaults()
        a = a.arguments
        if a["gradient_accumulation_fusion"] or a["grad_output_buffer"] is not None:
            raise ConfigError(
                "FP8 tensor-parallel layers do not support megatron's gradient_accumulation_fusion "
                "or deferred embedding wgrad (defer_embedding_wgrad_compute); turn them off"
            )
        x = input
        if a["sequence_parallel"]:      # all-gather the sequence; backward: reduce-scatter
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True,
                                                     group=a["tp_group"])
        elif a["allreduce_dgrad"]:      # replicated input; backward: all-reduce its gradient
            x = copy_to_tensor_model_parallel_region(x, group=a["tp_group"])
        return self._fp8_linear(x, weight, a["bias"])


_FP8_CLASSES: dict[type, type] = {}


def _fp8_class(cls: type) -> type:
    if cls not in _FP8_CLASSES:
        _FP8_CLASSES[cls] = type(f"Fp8{cls.__name__}", (_Fp8TPGemm, cls), {"__module__": __name__})
    return _FP8_CLASSES[cls]


def convert_tp_linears_to_fp8(
    module: nn.Module,
    recipe: Fp8Recipe | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> list[str]:
    """Give megatron's Column/RowParallelLinear layers in `module` an (emulated) FP8 GEMM, in
    place: the same module objects and Parameters (their class becomes an Fp8 subclass, as
    FSDP2's fully_shard does), plus fresh FP8 buffers `fp8_amax_history` / `fp8_scale`.
    filter_fn(fully_qualified_name, layer) selects layers (default: all). Returns the names of
    the converted layers. Build with the recipe you will pass to fp8_autocast."""
    recipe = Fp8Recipe() if recipe is None else recipe
    converted: list[str] = []
    for name, layer in module.named_modules():
        if not isinstance(layer, TP_LINEARS) or isinstance(layer, Fp8MetaMixin):
            continue
        if filter_fn is not None and not filter_fn(name, layer):
            continue
        params = list(layer.parameters(recurse=False))
        device = params[0].device if params else torch.device("cpu")   # a tied head has none
        layer.__class__ = _fp8_class(type(layer))
        layer._init_fp8_meta(recipe, device)
        converted.append(name)
    return converted
