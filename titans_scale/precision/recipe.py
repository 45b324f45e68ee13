"""The FP8 recipe and the delayed-scaling maths, shared by the TE and the emulated backend.

Per-tensor scaling as Transformer Engine defines it: a tensor is cast to FP8 as
`fp8 = saturate(x * scale)` and read back as `fp8 * scale_inv` (scale_inv = 1 / scale).
With *delayed* scaling the scale comes from a history of past amaxes (max |x|), updated
once per step; with *current* scaling it comes from the tensor's own amax at cast time.

What this follows in Transformer Engine (NVIDIA/TransformerEngine, main, 2025-26):
  * transformer_engine/common/recipe/__init__.py, `DelayedScaling` and `Format`: the
    fields (margin, fp8_format, amax_history_len, amax_compute_algo) and their defaults
    (0, HYBRID, 1024, "max"); E4M3 max 448, E5M2 max 57344; HYBRID = E4M3 forward, E5M2
    backward; "new_scaling_factor = (FP8_MAX / amax) / (2 ^ margin)".
  * transformer_engine/pytorch/quantization.py (fp8.py in TE 1.x):
    `_default_get_amax_and_update_history` (amax = max over the whole history, or
    history[0] for "most_recent", taken *before* the roll), `_update_amax_history`
    (torch.roll(history, -1, 0), then row 0 zeroed: the next step's amax is written
    at position 0 after rolling) and `_default_sf_compute` (keep the previous scale when
    amax is 0 or not finite; an infinite scale becomes the fp32 max).
  * transformer_engine/common/recipe/delayed_scaling.cu: the fused CUDA kernel with the
    same rules; docs/features/low_precision_training/fp8_delayed_scaling: "position 0
    serves as a staging area for the current amax".
  * transformer_engine/common/recipe/recipe_common.cuh, `compute_scale_from_amax`: the
    current-scaling rule (scale 1 when amax is 0/inf/nan, fp32 max when the quotient
    overflows; no margin).
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Literal, get_args

import torch

from titans_scale.errors import ConfigError

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max == TE Format.E4M3.max_fwd
E5M2_MAX = 57344.0  # torch.finfo(torch.float8_e5m2).max == TE Format.E5M2.max_fwd
FP32_MAX = torch.finfo(torch.float32).max

# The recipe's choices, named once: Fp8Config (config.py) types its fields with them.
Fp8Format = Literal["hybrid", "e4m3"]             # hybrid: e4m3 forward, e5m2 gradients
Fp8Scaling = Literal["delayed", "current"]
AmaxComputeAlgo = Literal["max", "most_recent"]
FORMATS, SCALINGS, AMAX_COMPUTE_ALGOS = get_args(Fp8Format), get_args(Fp8Scaling), get_args(AmaxComputeAlgo)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Fp8Recipe:
    """How FP8 tensors are scaled. Defaults equal TE's `DelayedScaling()` defaults.

    format: "hybrid" (e4m3 for activations and weights, e5m2 for gradients) or "e4m3".
    scaling: "delayed" (scale from the amax history, TE's DelayedScaling) or "current"
        (scale from the tensor's own amax, TE's Float8CurrentScaling).
    amax_history_len: length of the amax window (delayed scaling).
    amax_compute_algo: "max" over the window or the "most_recent" amax.
    margin: the scale is divided by 2**margin, leaving headroom for growth.
    interval: kept for config compatibility; TE >= 1.8 removed it, so it must be 1.
    """

    format: str = "hybrid"
    scaling: str = "delayed"
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    margin: int = 0
    interval: int = 1

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(
                f"fp8 format={self.format!r} is not supported; use one of {FORMATS}"
            )
        if self.scaling not in SCALINGS:
            raise ConfigError(
                f"fp8 scaling={self.scaling!r} is not supported; use one of {SCALINGS}"
            )
        if not _is_int(self.amax_history_len) or self.amax_history_len < 1:
            raise ConfigError(
                f"fp8 amax_history_len={self.amax_history_len!r} must be an int >= 1 "
                "(TE default 1024)"
            )
        if self.amax_compute_algo not in AMAX_COMPUTE_ALGOS:
            raise ConfigError(
                f"fp8 amax_compute_algo={self.amax_compute_algo!r} is not supported; "
                f"use one of {AMAX_COMPUTE_ALGOS}"
            )
        if not _is_int(self.margin) or self.margin < 0:
            raise ConfigError(f"fp8 margin={self.margin!r} must be an int >= 0 (TE default 0)")
        if self.scaling == "current" and self.margin != 0:
            raise ConfigError(
                f"fp8 margin={self.margin} has no effect with scaling='current' (TE's "
                "Float8CurrentScaling has no margin); set margin=0 or use scaling='delayed'"
            )
        if not _is_int(self.interval) or self.interval != 1:
            raise ConfigError(
                f"fp8 interval={self.interval!r} is not supported: Transformer Engine >= 1.8 "
                "updates scales every step; set interval=1"
            )

    @property
    def fwd_dtype(self) -> torch.dtype:
        """FP8 dtype of activations and weights (forward GEMM operands)."""
        return torch.float8_e4m3fn

    @property
    def bwd_dtype(self) -> torch.dtype:
        """FP8 dtype of output gradients (backward GEMM operand)."""
        return torch.float8_e5m2 if self.format == "hybrid" else torch.float8_e4m3fn

    @property
    def fwd_max(self) -> float:
        return E4M3_MAX

    @property
    def bwd_max(self) -> float:
        return E5M2_MAX if self.format == "hybrid" else E4M3_MAX


# ---------------------------------------------------------------------------------------
# Pure functions. History tensors are (amax_history_len, n) with one column per scaled
# tensor; scales are (n,). Nothing here mutates its arguments.
# ---------------------------------------------------------------------------------------


def amax_from_history(amax_history: torch.Tensor, amax_compute_algo: str) -> torch.Tensor:
    """The amax a scale is computed from: max over the window, or row 0 (this step's)."""
    if amax_compute_algo == "max":
        return amax_history.amax(dim=0)
    if amax_compute_algo == "most_recent":
        return amax_history[0].clone()
    raise ConfigError(
        f"amax_compute_algo={amax_compute_algo!r} is not supported; use one of {AMAX_COMPUTE_ALGOS}"
    )


def roll_amax_history(amax_history: torch.Tensor) -> torch.Tensor:
    """Roll by -1 along the window and zero row 0, ready for the next step's amax.

    Row 0 holds the current step's amax; after the roll it sits in the last row, rows
    1..L-1 hold the previous amaxes oldest to newest and the oldest one is dropped.
    """
    if amax_history.shape[0] > 1:
        rolled = torch.roll(amax_history, shifts=-1, dims=0)
    else:
        rolled = amax_history.clone()
    rolled[0] = 0.0
    return rolled


def scale_from_amax(
    amax: torch.Tensor, prev_scale: torch.Tensor, fp8_max: torch.Tensor | float, margin: int
) -> torch.Tensor:
    """Delayed-scaling scale: (fp8_max / amax) / 2**margin, keeping prev_scale when amax is
    0, inf or nan, and clamping an infinite quotient (tiny amax) to the fp32 max."""
    scale = (fp8_max / amax) / (2.0**margin)
    scale = torch.where(amax > 0.0, scale, prev_scale)
    scale = torch.where(torch.isfinite(amax), scale, prev_scale)
    return torch.where(torch.isinf(scale), torch.full_like(scale, FP32_MAX), scale)


def delayed_scaling_update(
    amax_history: torch.Tensor,
    scale: torch.Tensor,
    fp8_max: torch.Tensor | float,
    margin: int,
    amax_compute_algo: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of TE's delayed scaling: (new history, new scale). The scale is computed
    from the history *before* it rolls, so it sees all amax_history_len values."""
    amax = amax_from_history(amax_history, amax_compute_algo)
    new_scale = scale_from_amax(amax, scale, fp8_max, margin)
    return roll_amax_history(amax_history), new_scale


def current_scale(amax: torch.Tensor, fp8_max: torch.Tensor | float) -> torch.Tensor:
    """Current-scaling scale from this tensor's own amax (TE compute_scale_from_amax,
    epsilon 0, no power-of-2 rounding): fp8_max / amax, 1 when amax is 0/inf/nan."""
    scale = fp8_max / amax
    ok = (amax > 0.0) & torch.isfinite(amax)
    scale = torch.where(ok, scale, torch.ones_like(scale))
    return torch.where(torch.isinf(scale), torch.full_like(scale, FP32_MAX), scale)


__all__ = [
    "E4M3_MAX",
    "E5M2_MAX",
    "FP32_MAX",
    "Fp8Recipe",
    "amax_from_history",
    "roll_amax_history",
    "scale_from_amax",
    "delayed_scaling_update",
    "current_scale",
]
