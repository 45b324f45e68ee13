"""The CUDA FP8 path: Transformer Engine's te.Linear under its autocast, built from Fp8Recipe.

transformer_engine is imported lazily inside functions only: it has no CPU build and
importing it needs CUDA (ENVIRONMENT.md). Written against TE's public API:
  * transformer_engine.common.recipe.DelayedScaling(margin, fp8_format, amax_history_len,
    amax_compute_algo) and Format.{E4M3, HYBRID}; Float8CurrentScaling(fp8_format) from
    TE 2.2 (megatron-core 0.16 fp8_utils.get_fp8_recipe uses the same constructors).
  * transformer_engine.pytorch.autocast(enabled, recipe, amax_reduction_group) where it
    exists (recent TE 2.x), else fp8_autocast(enabled, fp8_recipe, fp8_group) (TE 1.x-2.x;
    in recent TE a deprecated alias of autocast).
  * transformer_engine.pytorch.Linear(in_features, out_features, bias, init_method,
    params_dtype, device, parallel_mode, tp_group, sequence_parallel).
  * FP8 GEMM shapes (transformer_engine/pytorch/utils.py assert_dim_for_fp8_exec): every
    operand's leading dims multiply to a multiple of 8 and its last dim is a multiple of 16.
  * megatron-core 0.16's TE layers (megatron/core/extensions/transformer_engine.py) and
    TransformerConfig fp8 fields (fp8, fp8_recipe, fp8_margin, fp8_amax_history_len,
    fp8_amax_compute_algo); its get_fp8_context passes the amax reduction group from
    parallel_state.get_amax_reduction_group.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Iterable

import torch
from torch import nn

from titans_scale.errors import ConfigError
from titans_scale.precision.recipe import Fp8Recipe

# Megatron-core module classes for a TE-backed layer spec (import paths, resolved lazily).
MEGATRON_TE_LAYER_SPEC: dict[str, str] = {
    "column_parallel_linear": "megatron.core.extensions.transformer_engine.TEColumnParallelLinear",
    "row_parallel_linear": "megatron.core.extensions.transformer_engine.TERowParallelLinear",
    "layernorm_column_parallel_linear": (
        "megatron.core.extensions.transformer_engine.TELayerNormColumnParallelLinear"
    ),
    "dot_product_attention": "megatron.core.extensions.transformer_engine.TEDotProductAttention",
    "norm": "megatron.core.extensions.transformer_engine.TENorm",
}
# Megatron's ready-made GPT spec with TE modules (for reference and the baseline model).
MEGATRON_GPT_TE_SPEC_FN = (
    "megatron.core.models.gpt.gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec"
)


def _import_te() -> Any:
    try:
        import transformer_engine.pytorch as te  # noqa: PLC0415 (lazy on purpose)
    except Exception as exc:  # ImportError, or an OSError/RuntimeError from missing CUDA libs
        raise ConfigError(
            f"fp8_backend='te' needs transformer_engine, which failed to import ({exc}); "
            "install the 'gpu' extra on a CUDA machine or use fp8_backend='emulated'"
        ) from exc
    return te


def te_available() -> tuple[bool, str]:
    """(True, "") when transformer_engine.pytorch imports, else (False, why)."""
    try:
        _import_te()
    except ConfigError as exc:
        return False, str(exc)
    return True, ""


def te_fp8_supported() -> tuple[bool, str]:
    """TE's own FP8 check (compute capability >= 8.9, and cuBLASLt/CUDA >= 12.1 on Ada)."""
    te = _import_te()
    if hasattr(te, "is_fp8_available"):  # newer TE 2.x
        try:
            ok, reason = te.is_fp8_available(return_reason=True)
            return bool(ok), str(reason)
        except TypeError:  # a signature without return_reason
            pass
    # TE 1.x-2.x keep the check on FP8GlobalStateManager (module renamed fp8 -> quantization).
    for module_name in (
        "transformer_engine.pytorch.quantization",
        "transformer_engine.pytorch.fp8",
    ):
        try:
            manager = importlib.import_module(module_name).FP8GlobalStateManager
        except (ImportError, AttributeError):
            continue
        ok, reason = manager.is_fp8_available()
        return bool(ok), str(reason)
    return False, "could not find Transformer Engine's FP8 support check"


def to_te_recipe(recipe: Fp8Recipe) -> Any:
    """The transformer_engine.common.recipe object equal to `recipe`."""
    from transformer_engine.common import recipe as te_recipe  # noqa: PLC0415

    formats = te_recipe.Format
    fp8_format = formats.HYBRID if recipe.format == "hybrid" else formats.E4M3
    if recipe.scaling == "delayed":
        return te_recipe.DelayedScaling(
            margin=recipe.margin,
            fp8_format=fp8_format,
            amax_history_len=recipe.amax_history_len,
            amax_compute_algo=recipe.amax_compute_algo,
        )
    if not hasattr(te_recipe, "Float8CurrentScaling"):
        raise ConfigError(
            "fp8 scaling='current' needs transformer_engine >= 2.2 (Float8CurrentScaling); "
            "upgrade it or use scaling='delayed'"
        )
    return te_recipe.Float8CurrentScaling(fp8_format=fp8_format)


def te_fp8_autocast(
    enabled: bool = True,
    recipe: Fp8Recipe | None = None,
    amax_reduction_group: Any = None,
    *,
    te_recipe: Any = None,
) -> Any:
    """TE's FP8 autocast context for `recipe` (same arguments as the emulated fp8_autocast).
    TE reduces amaxes over amax_reduction_group and updates the forward scales on exit.
    te_recipe: `to_te_recipe(recipe)` built once by the caller (else built here, each call)."""
    te = _import_te()
    if te_recipe is None:
        te_recipe = to_te_recipe(Fp8Recipe() if recipe is None else recipe)
    autocast = getattr(te, "autocast", None)
    if autocast is not None and {"recipe", "amax_reduction_group"} <= set(
        inspect.signature(autocast).parameters
    ):
        return autocast(
            enabled=enabled, recipe=te_recipe, amax_reduction_group=amax_reduction_group
        )
    return te.fp8_autocast(
        enabled=enabled, fp8_recipe=te_recipe, fp8_group=amax_reduction_group
    )


def te_fp8_shape_problems(named_linears: Iterable[tuple[str, int, int]]) -> list[str]:
    """From (name, in_features, out_features) triples, the layers whose weight [out, in]
    TE cannot run in FP8 (needs out % 8 == 0 and in % 16 == 0), as 'name (out=.., in=..)'.
    At run time the token count (batch x seq) must also be a multiple of 8."""
    return [
        f"{name} (out={out_f}, in={in_f})"
        for name, in_f, out_f in named_linears
        if out_f % 8 or in_f % 16
    ]


def make_te_linear(
    in_features: int,
    out_features: int,
    bias: bool = True,
    *,
    params_dtype: torch.dtype | None = None,
    device: torch.device | str = "cuda",
    init_method: Callable[[torch.Tensor], Any] | None = None,
    parallel_mode: str | None = None,
    tp_group: Any = None,
    sequence_parallel: bool = False,
) -> nn.Module:
    """A te.Linear; parallel_mode 'column'/'row' with tp_group gives TE's own TP layer."""
    te = _import_te()
    bad = te_fp8_shape_problems([("te.Linear", in_features, out_features)])
    if bad:
        raise ConfigError(
            f"{bad[0]}: TE FP8 GEMMs need out_features % 8 == 0 and in_features % 16 == 0"
        )
    kwargs: dict[str, Any] = {"bias": bias, "device": device}
    if params_dtype is not None:
        kwargs["params_dtype"] = params_dtype
    if init_method is not None:
        kwargs["init_method"] = init_method
    if parallel_mode is not None:
        kwargs.update(
            parallel_mode=parallel_mode, tp_group=tp_group, sequence_parallel=sequence_parallel
        )
    return te.Linear(in_features, out_features, **kwargs)


def convert_linears_to_te(
    module: nn.Module,
    filter_fn: Callable[[str, nn.Linear], bool] | None = None,
) -> list[str]:
    """Replace nn.Linear layers of a CUDA model in place by te.Linear with copied weights
    (same selection rules as convert_linears_to_fp8). New Parameters are created, so build
    the optimizer after converting. Returns the converted names."""
    if type(module) is nn.Linear:
        raise ConfigError(
            "convert_linears_to_te: module is itself an nn.Linear; pass its parent module"
        )
    targets = []
    for parent_name, parent in module.named_modules():
        for child_name, child in parent.named_children():
            if type(child) is not nn.Linear:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if filter_fn is None or filter_fn(name, child):
                targets.append((parent, child_name, name, child))
    bad = te_fp8_shape_problems((n, c.in_features, c.out_features) for _, _, n, c in targets)
    if bad:
        raise ConfigError(
            "TE FP8 needs out_features % 8 == 0 and in_features % 16 == 0; exclude these "
            f"layers with filter_fn or resize them: {', '.join(bad)}"
        )
    for parent, child_name, name, child in targets:
        if child.weight.device.type != "cuda":
            raise ConfigError(
                f"convert_linears_to_te: {name} is on {child.weight.device}; "
                "move the model to CUDA first"
            )
        new = make_te_linear(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            params_dtype=child.weight.dtype,
            device=child.weight.device,
        )
        with torch.no_grad():
            new.weight.copy_(child.weight)
            if child.bias is not None:
                new.bias.copy_(child.bias)
        new.train(child.training)
        setattr(parent, child_name, new)
    return [name for _, _, name, _ in targets]


def megatron_fp8_config_kwargs(recipe: Fp8Recipe) -> dict[str, Any]:
    """megatron.core TransformerConfig fields that select this recipe for its TE layers
    (megatron's own defaults differ: history 1, 'most_recent')."""
    return {
        "fp8": recipe.format,
        "fp8_recipe": "delayed" if recipe.scaling == "delayed" else "tensorwise",
        "fp8_margin": recipe.margin,
        "fp8_amax_history_len": recipe.amax_history_len,
        "fp8_amax_compute_algo": recipe.amax_compute_algo,
    }


def megatron_te_linears() -> tuple[type, type]:
    """megatron-core's TEColumnParallelLinear and TERowParallelLinear (the tensor-parallel swap's
    layers when FP8 runs through TE), or a ConfigError naming why they cannot be built."""
    try:
        from megatron.core.extensions import transformer_engine as mte  # noqa: PLC0415
    except Exception as exc:  # megatron's TE extension failed beyond its own ImportError guard
        why = f"megatron.core.extensions.transformer_engine failed to import ({exc})"
    else:
        if mte.HAVE_TE:
            return mte.TEColumnParallelLinear, mte.TERowParallelLinear
        why = "megatron-core found no importable transformer_engine (HAVE_TE is False)"
    raise ConfigError(f"fp8.backend='te' under a parallel layout needs megatron-core's Transformer Engine "
                      f"layers: {why}; set fp8.backend='emulated'")


def te_layer_names(module: nn.Module) -> list[str]:
    """The names of `module`'s Transformer Engine linears (te.Linear and megatron's TE layers)."""
    te = _import_te()
    return [name for name, m in module.named_modules() if isinstance(m, te.Linear)]


def megatron_te_modules() -> dict[str, type]:
    """MEGATRON_TE_LAYER_SPEC resolved to classes (imports megatron's TE extension, so TE)."""
    _import_te()
    out = {}
    for role, path in MEGATRON_TE_LAYER_SPEC.items():
        module_name, cls_name = path.rsplit(".", 1)
        out[role] = getattr(importlib.import_module(module_name), cls_name)
    return out


__all__ = [
    "MEGATRON_GPT_TE_SPEC_FN",
    "MEGATRON_TE_LAYER_SPEC",
    "convert_linears_to_te",
    "make_te_linear",
    "megatron_fp8_config_kwargs",
    "megatron_te_linears",
    "megatron_te_modules",
    "te_available",
    "te_fp8_autocast",
    "te_fp8_shape_problems",
    "te_fp8_supported",
    "te_layer_names",
    "to_te_recipe",
]
