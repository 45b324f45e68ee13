"""Tensor (and sequence) parallelism for TitansLM blocks, applied from outside the model.

``parallelize_block(block, layer_cfg, seq_cfg)`` takes one Block of a fully built TitansLM and
swaps its submodules for megatron-core tensor-parallel layers that hold this rank's shard of
the same weights (torchtitan's parallelize pattern; the model's maths is untouched):

* attention: ``qkv`` column-parallel (rows are head-major [h, 3, dh], so a rank's rows are its
  heads), ``out`` row-parallel. Persistent tokens are D-wide inputs: replicated, and they
  reach the heads only through ``qkv``, whose backward sums their gradient over TP.
* neural memory: ``qkv`` ([H, 3, d] rows), ``gates`` ([H, 3] rows, with bias) and
  ``out_gate`` column-parallel, ``out`` row-parallel; the depthwise ``conv`` (one channel
  per projection row), ``init_weights`` W^0 ([H, in, out]) and the normalised memory's
  ``ln_weight`` / ``ln_bias`` ([H, d]) keep the rank's heads; the
  per-head ``out_norm`` weight is shared by all heads, so it stays whole and its gradient is
  summed over TP (``TPSummedRMSNorm``). Each rank therefore runs ``memory_scan`` on whole
  heads of its own: the memory update needs no communication (tests count it).
* SwiGLU: ``w_gate`` / ``w_up`` column-parallel, ``w_down`` row-parallel.

The layers are megatron-core's own (``transformer_impl='local'``), or, when FP8 runs through
Transformer Engine (``'transformer_engine'``, chosen by ``linear_impl``), its TEColumnParallelLinear
/ TERowParallelLinear for the FP8 projections (the memory gates stay megatron's, out of FP8).

Activations between blocks are sequence-first, [L, B, D] as in Megatron. With sequence
parallelism the residual stream and the norms hold L/tp tokens per rank: the SwiGLU's megatron
layers all-gather / reduce-scatter along the sequence themselves (``seq_cfg`` has
``sequence_parallel=True``); a mixer runs on the whole sequence (MAC cuts it into segments,
MAG/MAL/MAC re-enter the head-sharded region inside), so the Block's ``mixer_in`` seam
all-gathers the mixer's input and ``mixer_out`` keeps this rank's slice of its output
(megatron's gather_from_sequence_parallel_region / scatter_to_sequence_parallel_region),
both changing between the stream's [L, B, D] and the mixers' [B, L, D]. Norm weights that
see only a slice of the sequence have their gradient summed over TP in the backward. The
Block's forward is the model's own: only its layers and seams change.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from titans_scale.errors import ConfigError
from titans_scale.model.attention import Attention
from titans_scale.model.layers import CausalDepthwiseConv, RMSNorm, SwiGLU
from titans_scale.model.memory import NeuralMemory
from titans_scale.model.titans import Block
from titans_scale.ops.rmsnorm import rms_norm
from titans_scale.precision.te_backend import megatron_te_linears

__all__ = ["AutocastInput", "ColumnParallel", "LinearImpl", "MixerInput", "MixerOutput", "RowParallel", "TPEntry",
           "TPSummedRMSNorm", "autocast_input", "column_from", "linear_classes", "linear_impl", "mark_tp",
           "tp_rank_size", "parallelize_block", "row_from", "shard"]


def tp_rank_size() -> tuple[int, int]:
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def shard(t: torch.Tensor, dim: int) -> torch.Tensor:
    """This TP rank's contiguous block of `t` along `dim` (a rank's heads are contiguous rows)."""
    rank, size = tp_rank_size()
    return t.detach().chunk(size, dim=dim)[rank]


def _no_init(weight: torch.Tensor) -> None:
    """Weights are copied from the built single-device model; nothing to draw."""


def mark_tp(param: torch.Tensor, dim: int) -> torch.Tensor:
    """Tag a TP-sharded parameter the way megatron's initialisers do (they are skipped with
    perform_initialization=False); optimizers, grad-norm code and checkpoints read the tags."""
    if not getattr(param, "tensor_model_parallel", False):
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(param, attr):
                delattr(param, attr)
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
    return param


class ColumnParallel(ColumnParallelLinear):
    """megatron's ColumnParallelLinear called like nn.Linear: returns the output only."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        out, _ = super().forward(x, weight=weight)     # bias (if any) is added inside
        return out


class RowParallel(RowParallelLinear):
    """megatron's RowParallelLinear (input already split by heads) called like nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = super().forward(x)
        return out


class TPEntry(nn.Module):
    """Entry of a head-sharded region: identity forward, gradient all-reduced over TP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return copy_to_tensor_model_parallel_region(x)


class TPSummedRMSNorm(RMSNorm):
    """RMSNorm whose (replicated) weight sees only part of the work on each TP rank: a slice of
    the sequence (sequence parallel) or the rank's heads (memory out_norm). The weight passes
    through megatron's copy_to_tensor_model_parallel_region, so autograd sums its gradient over
    TP; that works under every data-parallel engine, ZeRO's gradient hooks included."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, copy_to_tensor_model_parallel_region(self.weight), self.eps)

    @classmethod
    def from_norm(cls, norm: RMSNorm) -> "TPSummedRMSNorm":
        new = cls(norm.weight.shape[0], norm.eps)
        with torch.no_grad():
            new.weight.copy_(norm.weight)
        return new


# megatron's own names for its two layer families (TransformerConfig.transformer_impl)
LinearImpl = Literal["local", "transformer_engine"]


def linear_impl(fp8_backend: str | None, te_unavailable: str) -> LinearImpl:
    """Which layers the swap builds: megatron-core's TE layers when FP8 runs through Transformer
    Engine, its own Column/RowParallelLinear otherwise (the emulated FP8 GEMM is applied to those
    later). fp8_backend: the resolved one (PrecisionPlan.fp8_backend); te_unavailable: why TE
    cannot run here, '' when it can (precision.select.te_unavailable)."""
    if fp8_backend != "te":
        return "local"
    if te_unavailable:
        raise ConfigError(f"fp8.backend='te' under a parallel layout builds megatron-core's Transformer "
                          f"Engine layers, which cannot run here: {te_unavailable}; set fp8.backend='emulated'")
    return "transformer_engine"


class _OutputOnly:
    """Mixed in before a megatron TE linear: called like nn.Linear, returns the output only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = super().forward(x)
        return out


_TE_CLASSES: dict[type, type] = {}


def linear_classes(impl: LinearImpl) -> tuple[type, type]:
    """(column class, row class) of `impl`; TE's are imported on demand (they need TE)."""
    if impl == "local":
        return ColumnParallel, RowParallel
    column, row = megatron_te_linears()
    for cls in (column, row):
        if cls not in _TE_CLASSES:
            _TE_CLASSES[cls] = type(cls.__name__, (_OutputOnly, cls), {"__module__": __name__})
    return _TE_CLASSES[column], _TE_CLASSES[row]


def _layer_args(impl: LinearImpl) -> dict:
    return {"is_expert": False} if impl == "transformer_engine" else {}


def column_from(dense: nn.Linear, config, fp8: bool = True) -> nn.Module:
    """A column-parallel layer holding this rank's rows of `dense` (and of its bias), of the
    family config.transformer_impl names (megatron's own when fp8 is False: a layer kept out of FP8)."""
    impl = config.transformer_impl if fp8 else "local"
    layer = linear_classes(impl)[0](dense.in_features, dense.out_features, config=config, init_method=_no_init,
                                    bias=dense.bias is not None, gather_output=False, skip_bias_add=False,
                                    **_layer_args(impl))
    with torch.no_grad():
        layer.weight.copy_(shard(dense.weight, 0))
        if dense.bias is not None:
            layer.bias.copy_(shard(dense.bias, 0))
    mark_tp(layer.weight, 0)
    if dense.bias is not None:
        mark_tp(layer.bias, 0)
    return layer


def row_from(dense: nn.Linear, config) -> nn.Module:
    """A row-parallel layer holding this rank's input columns of `dense` (no bias in Titans), of
    the family config.transformer_impl names."""
    if dense.bias is not None:
        raise ValueError("row_from: Titans' output projections have no bias")
    impl = config.transformer_impl
    layer = linear_classes(impl)[1](dense.in_features, dense.out_features, config=config, init_method=_no_init,
                                    bias=False, input_is_parallel=True, skip_bias_add=False, **_layer_args(impl))
    with torch.no_grad():
        layer.weight.copy_(shard(dense.weight, 1))
    mark_tp(layer.weight, 1)
    return layer


def _head_param(p: torch.Tensor, dim: int) -> nn.Parameter:
    """A Parameter with this rank's heads of `p`, tagged like megatron's own TP params."""
    return mark_tp(nn.Parameter(shard(p, dim).clone()), dim)


def _parallelize_attention(attn: Attention, config) -> None:
    attn.qkv = column_from(attn.qkv, config)
    attn.out = row_from(attn.out, config)


def _parallelize_memory(mem: NeuralMemory, config) -> None:
    mem.qkv = column_from(mem.qkv, config)
    conv = CausalDepthwiseConv(mem.qkv.weight.shape[0], mem.conv.kernel)
    conv.weight, conv.bias = _head_param(mem.conv.weight, 0), _head_param(mem.conv.bias, 0)
    mem.conv = conv
    mem.gates = column_from(mem.gates, config, fp8=False)     # 3 outputs per head: kept out of FP8
    mem.init_weights = nn.ParameterList([_head_param(w, 0) for w in mem.init_weights])
    if mem.ln_weight is not None:                  # the normalised memory's [H, d] per-head affine
        mem.ln_weight, mem.ln_bias = _head_param(mem.ln_weight, 0), _head_param(mem.ln_bias, 0)
    mem.out_norm = TPSummedRMSNorm.from_norm(mem.out_norm)
    mem.out_gate = column_from(mem.out_gate, config)
    mem.out = row_from(mem.out, config)
    mem.q_input = TPEntry()
    # TE's layers run on all their rows: MAC's q-only read goes through the layer (and FP8)
    mem.q_rows_from_layer = config.transformer_impl == "transformer_engine"


def _parallelize_ffn(ffn: SwiGLU, config) -> None:
    ffn.w_gate = column_from(ffn.w_gate, config)
    ffn.w_up = column_from(ffn.w_up, config)
    ffn.w_down = row_from(ffn.w_down, config)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, cast the input of a sequence-parallel column layer to the autocast dtype:
    megatron's backward reduce-scatters the input gradient (autocast dtype) into a buffer of the
    input's dtype, and gloo/NCCL refuse mixed dtypes. Megatron itself runs bf16 weights, no
    autocast, so never meets this."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return x.to(torch.get_autocast_dtype(kind))
    return x


class AutocastInput(nn.Module):
    """Block.ffn_in seam: the SwiGLU's column layers take their input in the autocast dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return autocast_input(x)


class MixerInput(nn.Module):
    """Block.mixer_in seam: the sequence-first residual stream [L(/tp), B, D] -> the whole
    sequence, batch-first [B, L, D], as the mixers take it."""

    def __init__(self, sequence_parallel: bool):
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            # Every consumer of h inside the mixer is a column-parallel layer whose backward
            # already sums over TP, so the gather's backward only splits (no reduce-scatter).
            h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)
        return h.transpose(0, 1).contiguous()


class MixerOutput(nn.Module):
    """Block.mixer_out seam: the mixer's [B, L, D] output -> this rank's part of the
    sequence-first residual stream."""

    def __init__(self, sequence_parallel: bool):
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        out = out.transpose(0, 1)
        return scatter_to_sequence_parallel_region(out) if self.sequence_parallel else out


def parallelize_block(block: Block, layer_cfg, seq_cfg) -> Block:
    """Swap `block`'s submodules for TP layers and its seams for the [L(/tp), B, D] layout
    (in place; the same Block, its forward and parameter names unchanged). Returns `block`.

    layer_cfg: megatron config for the mixer's layers (sequence_parallel=False: mixers see the
    whole sequence); seq_cfg: the config for the SwiGLU (sequence_parallel as the layout says).
    """
    for module in list(block.mixer.modules()):
        if isinstance(module, Attention):
            _parallelize_attention(module, layer_cfg)
        elif isinstance(module, NeuralMemory):
            _parallelize_memory(module, layer_cfg)
    _parallelize_ffn(block.ffn, seq_cfg)
    if seq_cfg.sequence_parallel:
        block.norm_mix = TPSummedRMSNorm.from_norm(block.norm_mix)
        block.norm_ffn = TPSummedRMSNorm.from_norm(block.norm_ffn)
    block.mixer_in = MixerInput(seq_cfg.sequence_parallel)
    block.mixer_out = MixerOutput(seq_cfg.sequence_parallel)
    block.ffn_in = AutocastInput()
    return block
