"""memory_scan: the public memory op and its dispatcher (naive | chunked | fused | triton).

    y, state = memory_scan(q, k, v, theta, eta, alpha, init, chunk_size=64, impl="auto",
                           recompute_group=None, ln_weight=None, ln_bias=None, cu_seqlens=None)

q, k: [B, H, L, d]; v: [B, H, L, d_out]; theta, eta, alpha: [B, H, L];
init: a list of [B, H, in, out] weights (fresh start, zero momentum) or a MemoryState
returned by an earlier call (exact continuation, also mid-chunk).
The state is kept in fp32 (float64 inputs keep float64); y comes back in q's dtype.

impl: "auto" runs the Triton kernels on CUDA tensors (depth 1 and 2), the fused PyTorch
path elsewhere (depth 1 and 2) and the chunked one for deeper memories. "chunked" is
autograd through the closed-form chunk step; "fused" the same step with a hand-written
backward (fewer ops, one saved state per chunk); "triton" runs the kernels on CUDA, or on the CPU when
TRITON_INTERPRET=1 was set before triton was imported, and raises MemoryArgumentError
where it cannot run (never a silent fallback); "naive" is the float64 test reference.
recompute_group: g > 0 keeps one state per g chunks for backward and recomputes the rest
(ops/recompute.py); None or 0 keeps every chunk's state. The naive path ignores it.
ln_weight, ln_bias: [H, d], both or neither: the normalised residual memory
f(k) = k + ln_weight * LN(g_W(k)) + ln_bias (docs/design.md section 3; ops/mlp.py).
cu_seqlens: packed rows (as fla takes them): int32 document starts into the flattened B*L
tokens, 0 to B*L, every row start among them. Each document starts from its row's W^0 (init
must then be weights, not a carried state) with zero momentum and its own chunk grid, in
every impl: the documents are re-laid one per row (ops/varlen.py) and scanned as a batch.
No state comes back (None): a packed call ends in several documents, none to continue.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .chunked import chunked_scan
from .fused import fused_scan
from .fused import unsupported as fused_unsupported
from .naive import naive_scan
from .recompute import check_recompute_group
from .state import MemoryArgumentError, MemoryState, check_norm_args, check_scan_args, state_dtype
from .varlen import DocumentLayout

IMPLS = ("auto", "naive", "chunked", "fused", "triton")


@dataclass(frozen=True)
class _Impl:
    fn: Callable                       # fn(q, k, v, theta, eta, alpha, state, recompute_group=None[, norm=])
    native_dtype: bool = False         # gets q..alpha in the caller's dtype and casts inside
    unsupported: Callable | None = None  # (q, state, norm: bool) -> None, or why it cannot run these inputs
    norm: bool = False                 # takes norm=(ln_weight, ln_bias), the normalised memory


_REGISTRY: dict[str, _Impl] = {
    "naive": _Impl(lambda *args, recompute_group=None, norm=None: naive_scan(*args, norm=norm), norm=True),
    "chunked": _Impl(chunked_scan, norm=True),
    "fused": _Impl(fused_scan, unsupported=lambda q, state, norm: fused_unsupported(q, state), norm=True),
}


def register_impl(name: str, fn, *, native_dtype: bool = False, unsupported=None, norm: bool = False) -> None:
    """Kernels register their scan here (kept out of this file so it imports anywhere)."""
    _REGISTRY[name] = _Impl(fn, native_dtype, unsupported, norm)


def _load_triton() -> str | None:
    """Register impl="triton" on first use (importing triton is slow); None, or why it cannot be."""
    if "triton" in _REGISTRY:
        return None
    try:
        from .triton_scan import triton_scan, unsupported
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] != "triton":
            raise       # our own module missing (titans_scale.kernels): a packaging bug, never a quiet fallback
        return f"impl='triton' is unavailable: {e}; install triton or use impl='chunked'"
    register_impl("triton", triton_scan, native_dtype=True, unsupported=unsupported, norm=True)
    return None


def _why_not(name: str, q: torch.Tensor, state: MemoryState, norm) -> str | None:
    impl = _REGISTRY[name]
    if norm is not None and not impl.norm:
        return (f"impl={name!r} does not support the normalised memory (ln_weight/ln_bias) yet; "
                "use impl='chunked' or 'auto'")
    return impl.unsupported(q, state, norm is not None) if impl.unsupported is not None else None


def _resolve(impl: str, q: torch.Tensor, state: MemoryState, norm=None) -> str:
    if impl not in IMPLS:
        raise MemoryArgumentError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if q.is_cuda:
            missing = _load_triton()
            if missing is None and _why_not("triton", q, state, norm) is None:
                return "triton"
            if missing is not None:     # a GPU without its kernels is many times slower: say so once
                warnings.warn(f"memory_scan(impl='auto') on CUDA runs the PyTorch path: {missing}", stacklevel=3)
        return "fused" if _why_not("fused", q, state, norm) is None else "chunked"
    reason = _load_triton() if impl == "triton" else None
    reason = reason or _why_not(impl, q, state, norm)
    if reason is not None:
        raise MemoryArgumentError(reason)
    return impl


def _as_state_dtype(state: MemoryState, dt: torch.dtype) -> MemoryState:
    cast = lambda ws: [w.to(dt) for w in ws]  # noqa: E731
    return MemoryState(cast(state.chunk_start), cast(state.weights), cast(state.momentum),
                       state.position, state.chunk_size)


def memory_scan(q, k, v, theta, eta, alpha, init, chunk_size: int = 64, impl: str = "auto",
                recompute_group: int | None = None, ln_weight=None, ln_bias=None, cu_seqlens=None):
    state = check_scan_args(q, k, v, theta, eta, alpha, init, chunk_size)
    if cu_seqlens is not None:
        return _scan_documents(q, k, v, theta, eta, alpha, init, cu_seqlens, chunk_size=chunk_size, impl=impl,
                               recompute_group=recompute_group, ln_weight=ln_weight, ln_bias=ln_bias), None
    norm = check_norm_args(q, v, ln_weight, ln_bias)
    check_recompute_group(recompute_group)
    name = _resolve(impl, q, state, norm)
    dt = state_dtype(q)
    out_dtype = q.dtype
    entry = _REGISTRY[name]
    inputs = (q, k, v, theta, eta, alpha)
    args = list(inputs) if entry.native_dtype else [t.to(dt) for t in inputs]
    extra = {}
    if norm is not None:
        extra["norm"] = norm if entry.native_dtype else tuple(p.to(dt) for p in norm)
    y, new_state = entry.fn(*args, _as_state_dtype(state, dt), recompute_group=recompute_group, **extra)
    return y.to(out_dtype), new_state


def _scan_documents(q, k, v, theta, eta, alpha, init, cu_seqlens, **kw) -> torch.Tensor:
    """Packed rows: every document a fresh scan from its row's W^0, a few length buckets of
    documents per call (ops/varlen.py); padding after a document's end cannot reach it (causal)."""
    if isinstance(init, MemoryState):
        raise MemoryArgumentError("cu_seqlens starts every document from W^0: pass init as the [B, H, in, out] "
                                  "weights, not a carried MemoryState (packed rows do not stream)")
    docs = DocumentLayout(cu_seqlens, q.shape[0], q.shape[2])
    per_bucket = zip(*(docs.split(t, 2) for t in (q, k, v, theta, eta, alpha)))
    ys = [memory_scan(*inputs, [w.index_select(0, bucket.rows) for w in init], **kw)[0]
          for bucket, inputs in zip(docs.buckets, per_bucket)]
    return docs.merge(ys, 2)


__all__ = ["memory_scan", "MemoryState", "MemoryArgumentError", "register_impl", "IMPLS"]
