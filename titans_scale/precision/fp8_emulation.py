"""FP8 emulation: TE's per-tensor FP8 recipe on any device (all CPU machines, older GPUs).

Every GEMM operand is really cast to torch.float8_e4m3fn / float8_e5m2 with the recipe's
scale and saturation, so the rounding is the real FP8 rounding and the recipe logic (amax
history, delayed scaling, margin, amax reduction) is exercised everywhere. What is emulated
is only the GEMM itself: the FP8 operands are dequantized (`fp8 * scale_inv`, as TE defines
it) and multiplied in float32. Products of FP8 values are exact in fp32, so this equals an
FP8 GEMM with fp32 accumulation; tests check it matches torch._scaled_mm bit for bit on the
CPU. We do not call torch._scaled_mm here because its constraints differ by device (dims
multiple of 16, column-major B and no e5m2 x e5m2 on CUDA) and it is a private API; the
dequantized matmul works for every shape, dtype pair and device and gives no speedup to
lose (fp8 _scaled_mm on the CPU runs at fp32 speed).

Usage mirrors Transformer Engine:

    convert_linears_to_fp8(model, recipe)           # nn.Linear -> Fp8Linear, same params
    with fp8_autocast(enabled=True, recipe=recipe, amax_reduction_group=tp_group):
        loss = model(batch)
    loss.backward()

When is the delayed-scaling state updated? TE (2.x) updates the forward amaxes and scales
when the outermost autocast exits and the backward ones at the end of the backward pass.
Here every amax recorded since the last update (this region's forwards and the backward
that ran after the previous region) is reduced and folded in when the outermost enabled
region exits with grad enabled; the forward columns (input, weight) roll once per region
that ran the layer and the gradient column once per update after a backward, as TE's
separate forward and backward meta do. Each GEMM therefore uses the same scale as under TE: the forward of step
t and the backward of step t both see amaxes up to step t-1. Differences from TE, on purpose:
  * an Fp8Linear called several times in one region (gradient accumulation inside one
    autocast) keeps the running max of its amaxes; TE keeps the last one;
  * under torch.no_grad (evaluation) scales are used frozen and no amax is recorded;
  * outside an enabled fp8_autocast, Fp8Linear is a plain nn.Linear (as te.Linear is);
  * activation recompute (torch.utils.checkpoint) must re-enter fp8_autocast in the
    recomputed function, or the recompute runs in high precision.
With amax_reduction_group every rank must run the same Fp8Linear modules in the same
order in a region (TE has the same rule); a count mismatch raises a clear error.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from titans_scale.device import collective_device
from titans_scale.errors import ConfigError
from titans_scale.precision.recipe import Fp8Recipe, current_scale, delayed_scaling_update

# Columns of Fp8Linear.fp8_amax_history and entries of Fp8Linear.fp8_scale.
INPUT, WEIGHT, GRAD_OUTPUT = 0, 1, 2
FP8_META_COLUMNS = ("input", "weight", "grad_output")
FP8_META_BUFFERS = ("fp8_amax_history", "fp8_scale")


# --------------------------------------------------------------------------- casts


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to FP8 as TE does: x * scale in fp32, saturated to +-fp8 max (so overflow gives
    no inf/nan), then rounded to nearest. `scale` is a 0-d or broadcastable fp32 tensor."""
    fp8_max = torch.finfo(dtype).max
    return (x.float() * scale).clamp_(-fp8_max, fp8_max).to(dtype)


def dequantize(
    x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Read FP8 back: fp8 * scale_inv (TE multiplies by the stored reciprocal)."""
    return x_fp8.to(dtype) * scale.reciprocal().to(dtype)


def _amax(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.detach().abs().amax().float()


# --------------------------------------------------------------------------- autocast state


@dataclass
class _Fp8State:
    enabled: bool = False
    recipe: Fp8Recipe | None = None
    group: Any = None
    depth: int = 0


@dataclass
class _Pending:
    module: "weakref.ref[Fp8MetaMixin]"  # weak: a discarded model is not kept alive
    recipe: Fp8Recipe
    group: Any
    columns: list[bool]  # which of (input, weight, grad_output) recorded an amax


_STATE = _Fp8State()
# Modules that recorded amaxes since their last update, keyed by id(module), with the
# recipe and reduction group of the region their forward ran in (TE keys its global amax
# buffers the same way). Insertion order is the order in which modules first recorded,
# the same on every rank that runs the same model, so reduction buffers line up.
_PENDING: dict[int, _Pending] = {}


def fp8_enabled() -> bool:
    """True inside an enabled fp8_autocast region."""
    return _STATE.enabled


@contextmanager
def fp8_autocast(
    enabled: bool = True,
    recipe: Fp8Recipe | None = None,
    amax_reduction_group: Any = None,
) -> Iterator[None]:
    """Run Fp8Linear layers in FP8 inside the region (TE's `te.autocast` / `fp8_autocast`).

    recipe: the Fp8Recipe (default Fp8Recipe(), TE's defaults).
    amax_reduction_group: a torch.distributed group (e.g. the TP group, or TP x DP as
        Megatron does); the amaxes of the layers run in this region (forward, and their
        later backward) are all-reduced with MAX over it before their scales are updated,
        so all its ranks use identical scales. Ignored when torch.distributed is not
        initialized, as in TE.
    On exit of the outermost region (enabled, with grad enabled and without an exception)
    the amax histories and scales of every Fp8Linear that recorded amaxes are updated.
    """
    recipe = Fp8Recipe() if recipe is None else recipe
    if not isinstance(recipe, Fp8Recipe):
        raise ConfigError(
            f"fp8_autocast recipe must be an Fp8Recipe, got {type(recipe).__name__}"
        )
    saved = (_STATE.enabled, _STATE.recipe, _STATE.group)
    _STATE.enabled, _STATE.recipe, _STATE.group = bool(enabled), recipe, amax_reduction_group
    _STATE.depth += 1
    completed = False
    try:
        yield
        completed = True
    finally:
        _STATE.depth -= 1
        _STATE.enabled, _STATE.recipe, _STATE.group = saved
    if completed and _STATE.depth == 0 and enabled and torch.is_grad_enabled():
        reduce_and_update_fp8_meta()


def reduce_and_update_fp8_meta() -> int:
    """For every Fp8Linear that recorded amaxes since its last update: all-reduce (MAX) the
    new amaxes over the module's reduction group, then roll its history and recompute its
    scales (delayed scaling). fp8_autocast calls this on exit; call it yourself only when
    driving Fp8Linear without the context manager. Returns the number of modules updated."""
    entries = list(_PENDING.values())
    _PENDING.clear()
    buckets: dict[int, list[tuple[Fp8MetaMixin, _Pending]]] = {}
    groups: dict[int, Any] = {}
    for entry in entries:
        module = entry.module()
        if module is None or entry.recipe.scaling != "delayed":
            continue
        module._check_history_len(entry.recipe)
        buckets.setdefault(id(entry.group), []).append((module, entry))
        groups[id(entry.group)] = entry.group
    for key, items in buckets.items():  # one collective per group, in recording order
        group = groups[key]
        if _reduction_active(group):
            _check_same_module_count(len(items), group)
            rows = torch.cat([m.fp8_amax_history[0] for m, _ in items])
            dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=group)
            for (m, _), row in zip(items, rows.split(len(FP8_META_COLUMNS))):
                m.fp8_amax_history[0].copy_(row)
        for m, entry in items:
            m._update_meta(entry.recipe, entry.columns)
    return sum(len(items) for items in buckets.values())


def _reduction_active(group: Any) -> bool:
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1


def _check_same_module_count(count: int, group: Any) -> None:
    # One tiny collective so a rank that ran different FP8 layers fails clearly instead of
    # all-reducing buffers of different lengths (a hang on NCCL).
    probe = torch.tensor([count, -count], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
    if int(probe[0]) != -int(probe[1]):
        raise RuntimeError(
            f"fp8 amax reduction: this rank ran {count} Fp8Linear layers but another rank in "
            f"amax_reduction_group ran a different number ({int(-probe[1])}..{int(probe[0])}); "
            "every rank must run the same FP8 layers inside fp8_autocast"
        )


# --------------------------------------------------------------------------- the GEMM


class _Fp8LinearFn(torch.autograd.Function):
    """y = x W^T + b with x, W cast to the forward FP8 dtype and dy to the backward one.

    dgrad = dy_fp8 @ W_fp8 and wgrad = dy_fp8^T @ x_fp8 reuse the forward FP8 operands (as
    TE does); the bias and its gradient stay in high precision.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x, weight, bias, module, recipe, group, record, out_dtype
    ):
        x2 = x.reshape(-1, x.shape[-1])
        amax = torch.stack([_amax(x2), _amax(weight)])
        if recipe.scaling == "delayed":
            if record:
                module._record_amax(slice(INPUT, WEIGHT + 1), amax, recipe, group)
            scales = module.fp8_scale[INPUT : WEIGHT + 1].clone()
        else:  # current scaling keeps no state
            scales = current_scale(amax, recipe.fwd_max)
        x_fp8 = quantize(x2, scales[0], recipe.fwd_dtype)
        w_fp8 = quantize(weight, scales[1], recipe.fwd_dtype)
        out = dequantize(x_fp8, scales[0]) @ dequantize(w_fp8, scales[1]).t()
        if bias is not None:
            out = out + bias.float()
        # FP8 copies are what is saved for backward (the memory saving TE gets), with the
        # scales as they were now: the buffers may be updated before backward runs.
        ctx.save_for_backward(x_fp8, w_fp8, scales)
        ctx.module, ctx.recipe, ctx.group = module, recipe, group
        ctx.x_meta = (x.shape, x.dtype)
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return out.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x_fp8, w_fp8, scales = ctx.saved_tensors
        module, recipe = ctx.module, ctx.recipe
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        amax_g = _amax(g2)
        if recipe.scaling == "delayed":
            module._record_amax(
                slice(GRAD_OUTPUT, GRAD_OUTPUT + 1), amax_g.reshape(1), recipe, ctx.group
            )
            scale_g = module.fp8_scale[GRAD_OUTPUT].clone()
        else:
            scale_g = current_scale(amax_g, recipe.bwd_max)
        g = dequantize(quantize(g2, scale_g, recipe.bwd_dtype), scale_g)
        grad_x = grad_w = grad_b = None
        x_shape, x_dtype = ctx.x_meta
        if ctx.needs_input_grad[0]:
            grad_x = (g @ dequantize(w_fp8, scales[1])).to(x_dtype).reshape(x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ dequantize(x_fp8, scales[0])).to(ctx.w_dtype)
        if ctx.b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g2.float().sum(0).to(ctx.b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


# --------------------------------------------------------------------------- the module


class Fp8MetaMixin:
    """The FP8 state and GEMM of one layer, shared by Fp8Linear and the tensor-parallel
    layers (fp8_tensor_parallel.py): two fp32 buffers that travel with checkpoints,
    `fp8_amax_history` [amax_history_len, 3] and `fp8_scale` [3], columns (input, weight,
    grad_output) as in FP8_META_COLUMNS; they stay fp32 and follow the weight's device
    under .to()/.bfloat16(). A checkpoint without them (from a run without FP8) loads
    with fresh FP8 state. Mix in before the nn.Module class; the layer needs `weight`."""

    def _init_fp8_meta(self, recipe: Fp8Recipe, device: torch.device) -> None:
        history, scale = _fresh_fp8_meta(recipe.amax_history_len, device)
        self.register_buffer("fp8_amax_history", history)
        self.register_buffer("fp8_scale", scale)

    @property
    def amax_history_len(self) -> int:
        return self.fp8_amax_history.shape[0]

    def _fp8_linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x @ weight^T + bias with FP8 operands and this layer's scales (inside an enabled
        fp8_autocast; the caller checks fp8_enabled())."""
        recipe = _STATE.recipe
        assert recipe is not None
        self._check_history_len(recipe)
        out_dtype = _activation_dtype(x)
        record = torch.is_grad_enabled()
        return _Fp8LinearFn.apply(x, weight, bias, self, recipe, _STATE.group, record, out_dtype)

    def _check_history_len(self, recipe: Fp8Recipe) -> None:
        if recipe.scaling == "delayed" and recipe.amax_history_len != self.amax_history_len:
            raise ConfigError(
                f"fp8 amax_history_len={recipe.amax_history_len} in fp8_autocast does not match "
                f"this layer's FP8 buffers ({self.amax_history_len}); build the model with the "
                "same Fp8Recipe you pass to fp8_autocast"
            )

    @torch.no_grad()
    def _record_amax(
        self, cols: slice, amax: torch.Tensor, recipe: Fp8Recipe, group: Any
    ) -> None:
        row = self.fp8_amax_history[0, cols]
        row.copy_(torch.maximum(row, amax.to(row.device)))
        entry = _PENDING.get(id(self))
        columns = list(entry.columns) if entry is not None else [False] * len(FP8_META_COLUMNS)
        columns[cols] = [True] * len(columns[cols])
        _PENDING[id(self)] = _Pending(weakref.ref(self), recipe, group, columns)

    @torch.no_grad()
    def _update_meta(self, recipe: Fp8Recipe, columns: list[bool]) -> None:
        # Only the columns that recorded since their last update roll, so the forward
        # columns advance once per region and the gradient column once per backward (TE
        # keeps separate forward and backward meta), however the regions interleave.
        device = self.fp8_scale.device
        fp8_max = torch.tensor(
            [recipe.fwd_max, recipe.fwd_max, recipe.bwd_max], dtype=torch.float32, device=device
        )
        history, scale = delayed_scaling_update(
            self.fp8_amax_history, self.fp8_scale, fp8_max, recipe.margin, recipe.amax_compute_algo
        )
        mask = torch.tensor(columns, device=device)
        self.fp8_amax_history.copy_(torch.where(mask, history, self.fp8_amax_history))
        self.fp8_scale.copy_(torch.where(mask, scale, self.fp8_scale))

    def _apply(self, fn: Callable, recurse: bool = True):  # type: ignore[override]
        # Keep the FP8 state fp32 whatever dtype the module is cast to; follow the weight's device.
        meta = {name: self._buffers.pop(name) for name in FP8_META_BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            # A layer without its own weight (a tied output head) keeps the buffers' device.
            weight = self.weight
            device = meta["fp8_scale"].device if weight is None else weight.device
            if device.type != "meta" and meta["fp8_amax_history"].is_meta:  # to_empty()
                history, scale = _fresh_fp8_meta(meta["fp8_amax_history"].shape[0], device)
                meta = {"fp8_amax_history": history, "fp8_scale": scale}
            for name, buf in meta.items():
                self._buffers[name] = buf.to(device=device, dtype=torch.float32)
        return self

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        keys = [prefix + name for name in FP8_META_BUFFERS]
        none_present = not any(k in state_dict for k in keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if none_present:  # a checkpoint written without FP8: keep the fresh FP8 state
            for k in keys:
                if k in missing_keys:
                    missing_keys.remove(k)


class Fp8Linear(Fp8MetaMixin, nn.Module):
    """Drop-in for nn.Linear whose GEMMs run in (emulated) FP8 inside fp8_autocast.

    State dict: `weight`, `bias` (as nn.Linear) plus the FP8 buffers of Fp8MetaMixin,
    `fp8_amax_history` [amax_history_len, 3] and `fp8_scale` [3].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        recipe: Fp8Recipe | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
        self.weight = nn.Parameter(weight)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._init_fp8_meta(recipe or Fp8Recipe(), self.weight.device)
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Fp8Recipe | None = None) -> "Fp8Linear":
        """Wrap an existing nn.Linear: the same Parameter objects (optimizer state and
        weight tying stay valid), fresh FP8 state."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new._init_fp8_meta(recipe or Fp8Recipe(), linear.weight.device)
        new.train(linear.training)
        return new

    reset_parameters = nn.Linear.reset_parameters  # identical init to nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _STATE.enabled:
            return F.linear(x, self.weight, self.bias)
        return self._fp8_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, amax_history_len={self.amax_history_len}"
        )


def _fresh_fp8_meta(history_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero amax history and unit scales, as TE initialises its fp8_meta."""
    n = len(FP8_META_COLUMNS)
    history = torch.zeros(history_len, n, dtype=torch.float32, device=device)
    return history, torch.ones(n, dtype=torch.float32, device=device)


def _activation_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# --------------------------------------------------------------------------- conversion


def convert_linears_to_fp8(
    module: nn.Module,
    recipe: Fp8Recipe | None = None,
    filter_fn: Callable[[str, nn.Linear], bool] | None = None,
) -> list[str]:
    """Replace nn.Linear layers of `module` in place by Fp8Linear, keeping their Parameters.

    filter_fn(fully_qualified_name, linear) -> bool selects layers (default: all). Only
    exact nn.Linear instances are candidates: subclasses (e.g. MultiheadAttention's
    out_proj, whose weight is read directly) keep their own forward. Returns the names of
    the converted layers. Build with the recipe you will pass to fp8_autocast.
    """
    recipe = Fp8Recipe() if recipe is None else recipe
    if type(module) is nn.Linear:
        raise ConfigError(
            "convert_linears_to_fp8: module is itself an nn.Linear and cannot be replaced in "
            "place; pass its parent module (or use Fp8Linear.from_linear)"
        )
    converted: list[str] = []
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if filter_fn is not None and not filter_fn(name, child):
                continue
            setattr(parent, child_name, Fp8Linear.from_linear(child, recipe))
            converted.append(name)
    return converted


def strip_fp8_meta(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of state_dict without the FP8 buffers, loadable into plain nn.Linear layers."""
    return {k: v for k, v in state_dict.items() if not is_fp8_meta_key(k)}


def is_fp8_meta_key(key: str) -> bool:
    """Whether a state-dict key names an FP8 layer's recipe state (scales, amax history)."""
    return key.rsplit(".", 1)[-1] in FP8_META_BUFFERS


__all__ = [
    "FP8_META_BUFFERS",
    "is_fp8_meta_key",
    "FP8_META_COLUMNS",
    "Fp8Linear",
    "Fp8MetaMixin",
    "convert_linears_to_fp8",
    "dequantize",
    "fp8_autocast",
    "fp8_enabled",
    "quantize",
    "reduce_and_update_fp8_meta",
    "strip_fp8_meta",
]
