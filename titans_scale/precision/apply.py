"""Apply the run's precision to a built model from outside: which layers go FP8, and the
context every forward runs in (autocast + the FP8 region). The model code never changes."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from titans_scale.precision.fp8_emulation import convert_linears_to_fp8, fp8_autocast
from titans_scale.precision.recipe import Fp8Recipe
from titans_scale.precision.select import PrecisionPlan, resolve_precision
from titans_scale.precision.te_backend import convert_linears_to_te, te_fp8_autocast, te_layer_names, to_te_recipe

# The large projections (docs/design.md section 7). Gates (3 outputs per head) are too small to
# gain anything and need their precision; the memory state and update are never FP8.
FP8_LAYERS = ("attn.qkv", "attn.out", "memory.qkv", "memory.out", "memory.out_gate",
              "ffn.w_gate", "ffn.w_up", "ffn.w_down")


def fp8_filter(include_head: bool):
    def keep(name: str, _linear: nn.Linear) -> bool:
        return name.endswith(FP8_LAYERS) or (include_head and name == "head")
    return keep


def recipe_from(cfg) -> Fp8Recipe:
    f = cfg.fp8
    return Fp8Recipe(format=f.format, scaling=f.scaling, amax_history_len=f.amax_history_len,
                     amax_compute_algo=f.amax_compute_algo, margin=f.margin)


class Precision:
    """Built once per run: converts the model's layers, then `with precision.autocast():`.

    model: the model, or a list of model chunks (the parallel runtime's, each converted with
    its own names). tensor_parallel: the linears are megatron's Column/RowParallelLinear (every
    parallel-runtime layout, TP=1 included): the emulated backend gives them its FP8 GEMM
    (fp8_tensor_parallel.py); under TE the tensor-parallel swap already built megatron's TE
    layers (parallel/tensor_parallel.py), run here inside TE's autocast. amax_group should then be
    megatron's amax reduction group, so every rank uses the single-process scales.
    """

    def __init__(self, model, cfg, amax_group=None, tensor_parallel: bool = False):
        self.plan: PrecisionPlan = resolve_precision(cfg.train.precision, cfg.fp8.backend)
        self.recipe = recipe_from(cfg) if self.plan.fp8_backend else None
        self.amax_group = amax_group
        self.converted: list[str] = []
        # A tied model has no head layer on one device (logits = x @ embed^T): under TP its
        # head is a ColumnParallel reading the embedding, kept high precision the same way.
        keep = fp8_filter(cfg.fp8.include_head and not cfg.model.tie_embeddings)
        modules = list(model) if isinstance(model, (list, tuple)) else [model]
        # TE's recipe object, built once (not at every autocast entry)
        self.te_recipe = to_te_recipe(self.recipe) if self.plan.fp8_backend == "te" else None
        for m in modules:
            if self.plan.fp8_backend == "emulated":
                self.converted += convert_linears_to_fp8(m, self.recipe, keep)
                if tensor_parallel:
                    from titans_scale.precision.fp8_tensor_parallel import convert_tp_linears_to_fp8
                    self.converted += convert_tp_linears_to_fp8(m, self.recipe, keep)
            elif self.plan.fp8_backend == "te" and tensor_parallel:
                # the tensor-parallel swap built megatron's TE layers (parallel/tensor_parallel.py)
                self.converted += te_layer_names(m)
            elif self.plan.fp8_backend == "te":   # builds new parameters: optimizer after this
                self.converted += convert_linears_to_te(m, keep)
        # autocast where the model lives (train.device): CUDA's autocast over CPU tensors is a no-op
        self.device_type = next(modules[0].parameters()).device.type

    def autocast(self):
        stack = contextlib.ExitStack()
        if self.plan.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device_type, dtype=self.plan.autocast_dtype))
        if self.plan.fp8_backend == "emulated":
            stack.enter_context(fp8_autocast(True, self.recipe, self.amax_group))
        elif self.plan.fp8_backend == "te":
            stack.enter_context(te_fp8_autocast(True, self.recipe, self.amax_group, te_recipe=self.te_recipe))
        return stack
