"""Precision: fp32 / bf16 / FP8 (Transformer Engine on CUDA, an exact-recipe emulation elsewhere).

    plan = resolve_precision(cfg.precision, cfg.fp8_backend)
    if plan.fp8_backend == "emulated":
        convert_linears_to_fp8(model, recipe, filter_fn)
        ctx = fp8_autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    elif plan.fp8_backend == "te":
        convert_linears_to_te(model, filter_fn)          # or megatron-core TE layer specs
        ctx = te_fp8_autocast(enabled=True, recipe=recipe, amax_reduction_group=group)

Under tensor parallelism fp8_tensor_parallel.convert_tp_linears_to_fp8 gives megatron's
Column/RowParallelLinear the same emulated GEMM (imported on demand: it needs megatron-core).

te_backend imports transformer_engine lazily, so importing this package never needs it.
"""

from titans_scale.precision.fp8_emulation import (
    FP8_META_BUFFERS,
    FP8_META_COLUMNS,
    Fp8Linear,
    Fp8MetaMixin,
    convert_linears_to_fp8,
    dequantize,
    fp8_autocast,
    fp8_enabled,
    quantize,
    reduce_and_update_fp8_meta,
    strip_fp8_meta,
)
from titans_scale.precision.recipe import Fp8Recipe
from titans_scale.precision.select import HardwareProbe, PrecisionPlan, resolve_precision
from titans_scale.precision.te_backend import (
    convert_linears_to_te,
    te_available,
    te_fp8_autocast,
    to_te_recipe,
)

__all__ = [
    "FP8_META_BUFFERS",
    "FP8_META_COLUMNS",
    "Fp8Linear",
    "Fp8MetaMixin",
    "Fp8Recipe",
    "HardwareProbe",
    "PrecisionPlan",
    "convert_linears_to_fp8",
    "convert_linears_to_te",
    "dequantize",
    "fp8_autocast",
    "fp8_enabled",
    "quantize",
    "reduce_and_update_fp8_meta",
    "resolve_precision",
    "strip_fp8_meta",
    "te_available",
    "te_fp8_autocast",
    "to_te_recipe",
]
