"""memory_scan: the public memory op and its dispatcher (naive | chunked | triton).

    y, state = memory_scan(q, k, v, theta, eta, alpha, init, chunk_size=64, impl="auto")

q, k: [B, H, L, d]; v: [B, H, L, d_out]; theta, eta, alpha: [B, H, L];
init: a list of [B, H, in, out] weights (fresh start, zero momentum) or a MemoryState
returned by an earlier call (exact continuation, also mid-chunk).
The state is kept in fp32 (float64 inputs keep float64); y comes back in q's dtype.
"""

from __future__ import annotations

import torch

from .chunked import chunked_scan
from .naive import naive_scan
from .state import MemoryArgumentError, MemoryState, check_scan_args, state_dtype

IMPLS = ("auto", "naive", "chunked", "triton")
_REGISTRY = {"naive": naive_scan, "chunked": chunked_scan}


def register_impl(name: str, fn) -> None:
    """Kernels register their scan here (kept out of this file so it imports anywhere)."""
    _REGISTRY[name] = fn


def _resolve(impl: str, q: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise MemoryArgumentError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if (q.is_cuda and "triton" in _REGISTRY) else "chunked"
    if impl == "triton" and "triton" not in _REGISTRY:
        try:
            from titans_scale.kernels import memory as _  # noqa: F401  (registers itself)
        except ImportError as e:
            raise MemoryArgumentError(f"impl='triton' is unavailable: {e}") from e
    return impl


def _as_state_dtype(state: MemoryState, dt: torch.dtype) -> MemoryState:
    cast = lambda ws: [w.to(dt) for w in ws]  # noqa: E731
    return MemoryState(cast(state.chunk_start), cast(state.weights), cast(state.momentum),
                       state.position, state.chunk_size)


def memory_scan(q, k, v, theta, eta, alpha, init, chunk_size: int = 64, impl: str = "auto"):
    state = check_scan_args(q, k, v, theta, eta, alpha, init, chunk_size)
    name = _resolve(impl, q)
    dt = state_dtype(q)
    out_dtype = q.dtype
    args = [t.to(dt) for t in (q, k, v, theta, eta, alpha)]
    y, new_state = _REGISTRY[name](*args, _as_state_dtype(state, dt))
    return y.to(out_dtype), new_state


__all__ = ["memory_scan", "MemoryState", "MemoryArgumentError", "register_impl", "IMPLS"]
