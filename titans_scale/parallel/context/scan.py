"""cp_memory_scan: the memory op over a sequence split across the context-parallel group.

    y, state = cp_memory_scan(q, k, v, theta, eta, alpha, init, chunk_size, comm,
                              strategy="a2a" | "state_passing" | "ring", impl="auto",
                              ln_weight=None, ln_bias=None)

Arguments as ops.memory.memory_scan, except that q..alpha hold THIS rank's contiguous
shard of the sequence (any lengths >= 1; see shard.py) and init is the start state of the
whole sequence (a weight list or a MemoryState, the same on every rank). Returns y for this
rank's tokens and the state after the WHOLE sequence, identical on every rank (it equals
what memory_scan returns for the unsplit sequence). Every rank of the group must call it.
ln_weight, ln_bias: the normalised memory's [H, d] parameters (as memory_scan; a2a and ring).
Gradients reach q..alpha of every shard, init and ln_weight/ln_bias; those of init and of
ln_weight/ln_bias on each rank are partial sums: add them up over the group (as for any
parameter replicated over CP ranks).
"""

from __future__ import annotations

from titans_scale.ops.memory import memory_scan
from titans_scale.ops.state import check_norm_args, check_scan_args

from .a2a import a2a_memory_scan
from .comm import CPComm
from .ring import ring_memory_scan
from .shard import STRATEGIES, CPConfigError, ShardInfo
from .state_passing import state_passing_memory_scan


def check_memory_strategy(strategy: str, depth: int, heads: int, cp: int, norm: bool = False) -> None:
    """Raise CPConfigError if `strategy` cannot run this memory (heads = per tensor-parallel rank;
    norm: the normalised memory, model.mem_norm)."""
    if strategy not in STRATEGIES:
        raise CPConfigError(f"context-parallel strategy {strategy!r} is unknown; choose one of {STRATEGIES}")
    if strategy == "state_passing" and norm:
        raise CPConfigError(
            "strategy 'state_passing' needs the plain linear memory: with model.mem_norm the update goes "
            "through LN(k W), so a shard's update is not affine in its start state; use 'a2a' or 'ring'")
    if strategy == "state_passing" and depth != 1:
        raise CPConfigError(
            f"strategy 'state_passing' needs a linear memory (mem_depth=1), got mem_depth={depth}: a deep "
            "memory's gradients pass through GELU(k W_1), so a shard's update is not affine in its start "
            "state and cannot be composed from per-shard maps; use 'a2a' or 'ring'")
    if strategy == "a2a" and heads % cp:
        raise CPConfigError(
            f"strategy 'a2a' gives each CP rank whole memory heads: {heads} memory heads per tensor-parallel "
            f"rank do not divide over cp={cp}; make mem_heads divisible by tp*cp or use 'ring' "
            "(or 'state_passing' for mem_depth=1)")


def cp_memory_scan(q, k, v, theta, eta, alpha, init, chunk_size: int, comm: CPComm, strategy: str,
                   impl: str = "auto", recompute_group: int | None = None, micro_batches: int | None = None,
                   info: ShardInfo | None = None, ln_weight=None, ln_bias=None):
    state = check_scan_args(q, k, v, theta, eta, alpha, init, chunk_size)
    norm = check_norm_args(q, v, ln_weight, ln_bias)
    check_memory_strategy(strategy, state.depth, q.shape[1], comm.size, norm is not None)
    info = info or ShardInfo.gather(comm, q.shape[2])
    args = (q, k, v, theta, eta, alpha, state, comm, info, impl, recompute_group)
    if comm.size == 1:
        return memory_scan(q, k, v, theta, eta, alpha, state, chunk_size, impl, recompute_group=recompute_group,
                           ln_weight=ln_weight, ln_bias=ln_bias)
    comm.begin(q, k, v, theta, eta, alpha, *state.tensors(), *(norm or ()))
    try:
        with comm.scope("memory"):
            if strategy == "a2a":
                y, end = a2a_memory_scan(*args, norm=norm)
            elif strategy == "state_passing":
                y, end = state_passing_memory_scan(*args)
            else:
                y, end = ring_memory_scan(*args, micro_batches=micro_batches, norm=norm)
    except BaseException:
        comm.abort()
        raise
    return comm.end(y), end
