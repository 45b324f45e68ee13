"""Pick dtypes and the FP8 backend for a run from the config and the machine."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from titans_scale.errors import ConfigError

log = logging.getLogger(__name__)

# Named once: TrainConfig.precision and Fp8Config.backend (config.py) are typed with them.
PrecisionName = Literal["fp32", "bf16", "fp8"]
Fp8Backend = Literal["auto", "te", "emulated"]     # auto: TE where it runs, else emulated
PRECISIONS, FP8_BACKENDS = get_args(PrecisionName), get_args(Fp8Backend)
MIN_FP8_CAPABILITY = (8, 9)  # Ada / Hopper and newer have FP8 tensor cores


@dataclass(frozen=True)
class PrecisionPlan:
    """What the trainer does.

    param_dtype: dtype of the master parameters (the optimizer updates these).
    autocast_dtype: dtype for torch.autocast around the forward, or None (pure fp32).
        Under "fp8" the non-FP8 ops (norms, attention, the memory update inputs) run
        in this dtype; the memory state (W, S) stays fp32 regardless (DESIGN 7).
    fp8_backend: None (no FP8), "te" (te.Linear + TE autocast) or "emulated"
        (Fp8Linear + precision.fp8_autocast).
    reason: one line saying why this backend was chosen.
    """

    precision: str
    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    fp8_backend: str | None
    reason: str


@dataclass(frozen=True)
class HardwareProbe:
    """What the machine offers; tests pass a fake one instead of probing."""

    cuda: bool
    capability: tuple[int, int] | None  # of the current CUDA device
    te_ok: bool  # transformer_engine imports and reports FP8 support
    te_reason: str  # why not, when te_ok is False


def probe_hardware() -> HardwareProbe:
    """Look at the real machine (imports transformer_engine only when a GPU is present)."""
    if not torch.cuda.is_available():
        return HardwareProbe(False, None, False, "no CUDA device")
    capability = tuple(torch.cuda.get_device_capability())
    from titans_scale.precision import te_backend  # noqa: PLC0415 (avoid import cycles)

    te_ok, te_reason = te_backend.te_available()
    if te_ok:
        te_ok, te_reason = te_backend.te_fp8_supported()
    return HardwareProbe(True, capability, te_ok, te_reason)  # type: ignore[arg-type]


def te_unavailable(hw: HardwareProbe | None = None) -> str:
    """Why Transformer Engine's FP8 cannot run on this machine ('' when it can)."""
    hw = hw if hw is not None else probe_hardware()
    capability = hw.capability or (0, 0)
    if not hw.cuda:
        return "no CUDA device"
    if capability < MIN_FP8_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]} < 8.9"
    return "" if hw.te_ok else hw.te_reason


def resolve_precision(
    precision: str,
    fp8_backend: str = "auto",
    *,
    probe: HardwareProbe | None = None,
) -> PrecisionPlan:
    """Resolve the config's precision and fp8_backend into a PrecisionPlan.

    "te" needs CUDA, a GPU of compute capability >= 8.9 and an importable Transformer
    Engine, else a ConfigError. FP8 on a GPU below 8.9 is an error with "auto" too (it
    would silently run the slow emulation on a cluster); ask for "emulated" explicitly
    to test the recipe there. "auto" picks TE where it can, else the emulation, and logs
    the choice.
    """
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision={precision!r} is not supported; use one of {PRECISIONS}"
        )
    if fp8_backend not in FP8_BACKENDS:
        raise ConfigError(
            f"fp8_backend={fp8_backend!r} is not supported; use one of {FP8_BACKENDS}"
        )
    if precision == "fp32":
        return PrecisionPlan(precision, torch.float32, None, None, "fp32: no autocast, no FP8")
    if precision == "bf16":
        return PrecisionPlan(
            precision, torch.float32, torch.bfloat16, None, "bf16 autocast over fp32 master weights"
        )

    if fp8_backend == "emulated":
        return _plan("emulated", "fp8_backend='emulated' requested")

    hw = probe if probe is not None else probe_hardware()
    if not hw.cuda:
        if fp8_backend == "te":
            raise ConfigError(
                "fp8_backend='te' needs a CUDA GPU (none found); use fp8_backend='emulated' "
                "or 'auto' to run the FP8 emulation on this machine"
            )
        return _plan(
            "emulated", "no CUDA device: Transformer Engine cannot run, using the FP8 emulation"
        )

    capability = hw.capability or (0, 0)
    if capability < MIN_FP8_CAPABILITY:
        raise ConfigError(
            f"precision='fp8' needs a GPU of compute capability >= 8.9 (Ada/Hopper), this one "
            f"is {capability[0]}.{capability[1]}; use precision='bf16', or "
            "fp8_backend='emulated' to test the FP8 recipe slowly"
        )
    if not hw.te_ok:
        if fp8_backend == "te":
            raise ConfigError(f"fp8_backend='te' is unavailable: {hw.te_reason}")
        return _plan(
            "emulated", f"Transformer Engine unavailable ({hw.te_reason}); using the FP8 emulation"
        )
    return _plan(
        "te", f"CUDA compute capability {capability[0]}.{capability[1]} with Transformer Engine"
    )


def _plan(backend: str, reason: str) -> PrecisionPlan:
    log.info("fp8 backend: %s (%s)", backend, reason)
    return PrecisionPlan("fp8", torch.float32, torch.bfloat16, backend, reason)


__all__ = [
    "FP8_BACKENDS",
    "PRECISIONS",
    "HardwareProbe",
    "PrecisionPlan",
    "probe_hardware",
    "resolve_precision",
    "te_unavailable",
]
