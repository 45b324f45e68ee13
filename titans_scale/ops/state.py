"""The memory state carried between calls, and argument checks shared by every impl."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree


class MemoryArgumentError(ValueError):
    """A bad argument to the memory op; the message names the argument and the fix."""


@dataclass
class MemoryState:
    """Per-sequence state of the neural memory after some prefix of a sequence.

    chunk_start: weights W_c at the start of the current chunk (retrieval and gradients use it)
    weights:     running weights W after the last token seen
    momentum:    momentum S after the last token seen
    position:    tokens already consumed of the current chunk (0 <= position < chunk_size)
    chunk_size:  the chunk grid this state belongs to (a continuation must use the same)
    All weight lists hold [B, H, in, out] tensors (fp32 or wider).
    """

    chunk_start: list[torch.Tensor]
    weights: list[torch.Tensor]
    momentum: list[torch.Tensor]
    position: int
    chunk_size: int

    @classmethod
    def fresh(cls, init: list[torch.Tensor], chunk_size: int) -> "MemoryState":
        return cls(list(init), list(init), [torch.zeros_like(w) for w in init], 0, chunk_size)

    def detach(self) -> "MemoryState":
        d = lambda ws: [w.detach() for w in ws]  # noqa: E731
        return MemoryState(d(self.chunk_start), d(self.weights), d(self.momentum),
                           self.position, self.chunk_size)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.chunk_start, *self.weights, *self.momentum]

    @property
    def depth(self) -> int:
        return len(self.weights)


# A torch pytree whose leaves are tensors() in order; position and chunk_size ride in its spec.
pytree.register_pytree_node(
    MemoryState,
    lambda s: ([s.chunk_start, s.weights, s.momentum], (s.position, s.chunk_size)),
    lambda lists, meta: MemoryState(*(list(ws) for ws in lists), *meta))


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """The memory state and its accumulations are fp32 at least (docs/design.md section 7)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_scan_args(q, k, v, theta, eta, alpha, init, chunk_size) -> MemoryState:
    """Validate memory_scan's arguments and return the starting state."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise MemoryArgumentError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t) or t.dim() != 4:
            raise MemoryArgumentError(
                f"{name} must be a [B, H, L, d] tensor, got "
                f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if k.shape != q.shape:
        raise MemoryArgumentError(f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}; they must match")
    B, H, L, d = q.shape
    if v.shape[:3] != (B, H, L):
        raise MemoryArgumentError(f"v has shape {tuple(v.shape)}; expected [B={B}, H={H}, L={L}, d_out]")
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if not torch.is_tensor(g) or tuple(g.shape) != (B, H, L):
            raise MemoryArgumentError(
                f"{name} must have shape [B, H, L] = {(B, H, L)}, got "
                f"{tuple(g.shape) if torch.is_tensor(g) else type(g).__name__}")
    if isinstance(init, MemoryState):
        state = init
        if state.chunk_size != chunk_size:
            raise MemoryArgumentError(
                f"chunk_size={chunk_size} differs from the state's chunk_size={state.chunk_size}; "
                "continue a stream with the chunk size it started with")
        weights = state.weights
    elif isinstance(init, (list, tuple)) and len(init) > 0 and all(torch.is_tensor(w) for w in init):
        weights = list(init)
        state = None
    else:
        raise MemoryArgumentError(
            "init must be a non-empty list of [B, H, in, out] weight tensors or a MemoryState")
    din = d
    for i, w in enumerate(weights):
        if w.dim() != 4 or w.shape[:2] != (B, H) or w.shape[2] != din:
            raise MemoryArgumentError(
                f"init[{i}] has shape {tuple(w.shape)}; expected [B={B}, H={H}, in={din}, out]")
        din = w.shape[3]
    if din != v.shape[-1]:
        raise MemoryArgumentError(f"the memory maps to width {din} but v has width {v.shape[-1]}")
    if len(weights) >= 2 and din != d:
        raise MemoryArgumentError(
            f"a deep memory (depth {len(weights)}) has a residual path, so its output width "
            f"({din}) must equal the key width ({d})")
    if state is None:
        state = MemoryState.fresh(weights, chunk_size)
    return state


def check_norm_args(q, v, ln_weight, ln_bias) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The normalised memory's (ln_weight, ln_bias), both [H, d], or None when both are absent."""
    if ln_weight is None and ln_bias is None:
        return None
    if ln_weight is None or ln_bias is None:
        raise MemoryArgumentError("pass ln_weight and ln_bias together (the normalised memory), or neither")
    H, d = q.shape[1], q.shape[-1]
    for name, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if not torch.is_tensor(p) or tuple(p.shape) != (H, d):
            raise MemoryArgumentError(
                f"{name} must have shape [H, d] = {(H, d)}, got "
                f"{tuple(p.shape) if torch.is_tensor(p) else type(p).__name__}")
    if v.shape[-1] != d:
        raise MemoryArgumentError(
            f"the normalised memory adds its key to the output, so v's width ({v.shape[-1]}) must equal "
            f"the key width ({d})")
    return ln_weight, ln_bias
