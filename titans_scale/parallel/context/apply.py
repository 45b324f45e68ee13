"""apply_context_parallel: run a TitansLM on one shard of each sequence per CP rank.

Which strategy serves which mixer, and why:

| mixer | a2a | state_passing | ring | attention / conv under CP |
| --- | --- | --- | --- | --- |
| lmm | yes (heads % cp == 0) | depth 1 | yes | conv halo (kernel-1 inputs) |
| mag | yes (heads % cp == 0) | depth 1 | yes | window halo and conv halo of x (two small exchanges) |
| mal | yes (heads % cp == 0) | depth 1 | yes | conv halo of x, window halo of the memory's output |
| mac | no | no | yes: the whole mixer streams its state | none needed: the ring passes the MAC state |
| swa / seg / attn | - | - | - | window halo / straddling-segment halo / all-gather |

MAC is refused for a2a and state_passing: its memory is updated with y_s = Attn(x_s, h_s),
where h_s = M_{before s}(q_s) reads the memory the previous segment wrote. A shard's memory
inputs therefore depend (through attention, the projections and the conv) on the state at
the shard's start, so they cannot be all-to-all'ed before the earlier shards finish (a2a),
and the shard's update is not affine in that state (state_passing). The ring hands over
the entire MAC state (memory, both conv caches and an unfinished segment's inputs), so
segments may straddle shard boundaries.

Mechanics: the model's own seams; no forward pass is restated here. A shard is one piece
of a document fed in pieces, whose predecessor lives on the previous ranks, and every
mixer already streams: its state carries the inputs it needs from before (window tails,
segment tails, the conv cache). So
  * each attention module (SlidingWindow, SegmentAttention, FullAttention) and NeuralMemory
    inside a mixer becomes a Shard* subclass that fetches those inputs from the previous
    ranks (its halo) and runs its ORIGINAL forward with them as its state; the memory's scan
    function (NeuralMemory.scan_fn) becomes cp_memory_scan, which carries the memory across
    the shards. LMM, MAG and MAL run their own forward around them, unchanged;
  * a Block becomes CPBlock: with packed rows its mixer runs the documents inside this rank's
    shard as on one device and those spanning shards re-laid across the group (documents.py);
  * MAC reads its memory's pieces with inputs that depend on the memory state (above), so
    it runs whole as a ring: rank r resumes MAC's own streaming state (a torch pytree) from
    rank r-1 (ring.ring_forward);
  * the Block mixer's class becomes CP<Mixer> (made once per class, as FSDP2's fully_shard
    does), whose forward makes the call one unit of CP work: a fresh state, every rank's
    shard length gathered once for the modules inside, ordered communication
    (comm.begin / comm.end) and the final memory state as CPLayerState.
Parameters and names are untouched (state_dict unchanged); ``remove_context_parallel``
swaps the classes back.

Contract (for the trainer):
  * every CP rank calls model(tokens_shard) with its contiguous shard of the same
    sequences (split with shard_bounds / local_shard, any non-empty split works) and a
    fresh state (state=None, position 0); logits come back for the local tokens;
  * packed rows: model(tokens_shard, cu_seqlens=...) with the cu_seqlens of the WHOLE rows
    (the same on every rank); each Block runs local documents alone and re-lays those that
    span shards (documents.py), so every document gives its logits alone, under every strategy;
  * every rank runs forward and backward of every step (collectives in both);
  * the loss is the local token loss normalised by the GLOBAL token count; gradients of
    all parameters are then partial sums over the CP group: all-reduce (sum) them over
    it, e.g. megatron DDP over parallel_state.get_data_parallel_group(with_context_parallel=True),
    or cp_allreduce_grads below;
  * each memory mixer returns CPLayerState(memory=final MemoryState of the whole sequence,
    identical on every rank) for inspection; it cannot be fed back (no streaming under CP).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from titans_scale.model.memory import NeuralMemory
from titans_scale.model.mixers import MAC, MIXER_CLASSES, FullAttention, SegmentAttention, SlidingWindow
from titans_scale.model.titans import Block
from titans_scale.ops.memory import memory_scan
from titans_scale.ops.state import MemoryState

from .comm import CPComm
from .documents import PackedRows
from .halo import gather_prefix, prefix_halo
from .ring import ring_forward
from .scan import check_memory_strategy, cp_memory_scan
from .shard import STRATEGIES, CPConfigError, ShardInfo, shard_bounds


@dataclass
class CPContext:
    """What one mixer's CP modules share: the group, the memory strategy and, during the
    mixer's forward, every rank's shard length."""

    comm: CPComm
    strategy: str                    # the memory strategy of this mixer
    micro_batches: int | None = None
    info: ShardInfo | None = None

    def memory_scan(self, q, k, v, theta, eta, alpha, init, chunk_size, impl="auto", recompute_group=None,
                    ln_weight=None, ln_bias=None):
        """NeuralMemory.scan_fn under CP: the memory op on this rank's shard (init: the
        sequence's start state); returns the state after the whole sequence."""
        if self.comm.alone:
            return memory_scan(q, k, v, theta, eta, alpha, init, chunk_size, impl, recompute_group=recompute_group,
                               ln_weight=ln_weight, ln_bias=ln_bias)
        return cp_memory_scan(q, k, v, theta, eta, alpha, init, chunk_size, self.comm, self.strategy, impl,
                              recompute_group, self.micro_batches, self.info, ln_weight=ln_weight, ln_bias=ln_bias)

    def halo(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The min(n, offset) inputs just before this rank's shard of x."""
        with self.comm.scope("halo"):
            return prefix_halo(x, n, self.comm, self.info)


@dataclass
class CPLayerState:
    """What a CP mixer returns: the memory state after the whole sequence (every rank)."""

    memory: MemoryState | None


def _fresh(state) -> None:
    if state is not None:
        raise CPConfigError("context-parallel mixers start every sequence fresh (state=None); "
                            "streaming a state into a CP forward is not supported")


def _last(t: torch.Tensor, n: int) -> torch.Tensor:
    n = max(0, min(n, t.shape[1]))
    return t.narrow(1, t.shape[1] - n, n)


def _memory_of(state) -> MemoryState | None:
    """The MemoryState inside a mixer's state (a torch pytree), if it holds one."""
    is_memory = lambda s: isinstance(s, MemoryState)  # noqa: E731
    return next((s for s in pytree.tree_leaves(state, is_leaf=is_memory) if is_memory(s)), None)


# -- the modules inside a mixer: their halo as their streaming state --------------------------


class ShardSlidingWindow(SlidingWindow):
    """Its state on a shard: the window-1 inputs before it."""

    _cp_original = SlidingWindow

    def forward(self, x, state, pos0):
        if self._cp.comm.alone:
            return super().forward(x, state, pos0)
        _fresh(state)
        return super().forward(x, self._cp.halo(x, self.window - 1), pos0 + self._cp.info.offset())


class ShardSegmentAttention(SegmentAttention):
    """Its state on a shard: the inputs of the segment that straddles the shard's start
    (segments count from the sequence start: offset mod segment_len of them)."""

    _cp_original = SegmentAttention

    def forward(self, x, state, pos0):
        if self._cp.comm.alone:
            return super().forward(x, state, pos0)
        _fresh(state)
        info = self._cp.info
        need = [info.offset(r) % self.segment for r in range(info.size)]
        halo = _last(self._cp.halo(x, max(need)), need[info.rank])
        return super().forward(x, halo, pos0 + info.offset())


class ShardFullAttention(FullAttention):
    """Its state on a shard: every earlier shard (all-gathered: O(L) bytes)."""

    _cp_original = FullAttention

    def forward(self, x, state, pos0):
        if self._cp.comm.alone:
            return super().forward(x, state, pos0)
        _fresh(state)
        ctx = self._cp
        with ctx.comm.scope("halo"):
            prev = gather_prefix(x, ctx.comm, ctx.info)
        return super().forward(x, prev, pos0 + ctx.info.offset())


class ShardNeuralMemory(NeuralMemory):
    """Its state on a shard: the conv cache of the kernel-1 inputs before it, and W^0, the
    sequence's start, from which scan_fn (CPContext.memory_scan) carries the memory across
    the shards."""

    _cp_original = NeuralMemory

    def forward(self, x, state=None):
        if self._cp.comm.alone:
            return super().forward(x, state)
        _fresh(state)
        before = self._cp.halo(x, self.conv.kernel - 1)
        return super().forward(x, self.initial_state(x.shape[0], x.device, before))


_SHARD = {cls._cp_original: cls for cls in (ShardSlidingWindow, ShardSegmentAttention, ShardFullAttention,
                                            ShardNeuralMemory)}


# -- the Block mixer: one unit of CP work ------------------------------------------------------


class CPMixer(nn.Module):
    """Put in front of a Block mixer's class: forward(x, state, pos0) becomes one unit of CP
    work around the mixer's own forward (see the module docstring)."""

    def forward(self, x, state, pos0):
        if self._cp.comm.alone:
            return self._mixer_forward(x, state, pos0)
        _fresh(state)
        ctx = self._cp
        ctx.comm.begin(x)
        try:
            ctx.info = ShardInfo.gather(ctx.comm, x.shape[1])
            out, memory = self._on_shard(x, pos0)
        except BaseException:
            ctx.comm.abort()
            raise
        finally:
            ctx.info = None
        return ctx.comm.end(out), None if memory is None else CPLayerState(memory)

    def _on_shard(self, x, pos0):
        """(out, final memory state or None): the mixer's forward, its Shard* modules inside."""
        out, state = self._mixer_forward(x, None, pos0)
        return out, _memory_of(state)

    def _mixer_forward(self, x, state, pos0):
        return super().forward(x, state, pos0)          # the class CP<Mixer> was made from


class CPRingMixer(CPMixer):
    """A mixer run whole as a ring over its own streaming state (MAC)."""

    def _on_shard(self, x, pos0):
        ctx = self._cp
        params = [p for p in self.parameters() if p.requires_grad]
        with ctx.comm.scope("memory"):
            out, end = ring_forward(self._mixer_forward, x, self.initial_state(x), pos0 + ctx.info.offset(),
                                    ctx.comm, ctx.micro_batches or ctx.comm.size, params)
            # rank P-1's end state is the sequence's: every rank gets its memory (one broadcast)
            memory = _memory_of(end)
            final = ctx.comm.broadcast_all(pytree.tree_leaves(memory), ctx.comm.size - 1)
        return out, pytree.tree_unflatten(final, pytree.tree_structure(memory))


class CPBlock(Block):
    """A Block of a CP model: its mixer runs packed rows' documents (cu_seqlens) inside this
    rank's shard alone and those spanning shards re-laid across the group (documents.py)."""

    _cp_original = Block

    def forward(self, x, state, pos0, docs=None):
        return super().forward(x, state, pos0, None if docs is None else self._cp.of(docs))


_KINDS = {cls: kind for kind, cls in MIXER_CLASSES.items()}
# Mixers that read their memory's pieces (not its forward) with inputs that depend on the
# memory state: no scan function can split them, so they run whole as a ring.
_RING_WHOLE = (MAC,)


@functools.cache
def _cp_class(mixer_cls: type) -> type:
    """CP<Mixer>: the unit in front of the mixer's class (or of its Shard* version)."""
    unit = CPRingMixer if mixer_cls in _RING_WHOLE else CPMixer
    return type(f"CP{mixer_cls.__name__}", (unit, _SHARD.get(mixer_cls, mixer_cls)), {"_cp_original": mixer_cls})


def layer_strategy(kind: str, strategy: str, depth: int, heads: int, cp: int, norm: bool = False) -> str:
    """The memory strategy a layer of mixer `kind` runs with ("none": attention only), or
    CPConfigError naming the mixer, the reason and the fix. heads: memory heads per TP rank;
    norm: the normalised memory (model.mem_norm), which state_passing cannot run."""
    if strategy != "auto" and strategy not in STRATEGIES:
        raise CPConfigError(f"context-parallel strategy {strategy!r} is unknown; choose 'auto' or one of {STRATEGIES}")
    if kind not in ("lmm", "mag", "mal", "mac"):
        return "none"                                      # attention only: halo exchange
    if kind == "mac":
        if strategy not in ("ring", "auto"):
            raise CPConfigError(
                f"mixer 'mac' cannot use context-parallel strategy {strategy!r}: MAC updates its memory with "
                "the attention output of each segment, which reads the memory the previous segment wrote, so a "
                "shard's memory inputs depend on the state at its start: they cannot be exchanged before the "
                "earlier shards finish (a2a) and the update is not affine in that state (state_passing); "
                "use strategy='ring' (or 'auto')")
        return "ring"
    if strategy == "auto":
        strategy = "a2a" if heads % cp == 0 else "state_passing" if depth == 1 and not norm else "ring"
    try:
        check_memory_strategy(strategy, depth, heads, cp, norm)
    except CPConfigError as e:
        raise CPConfigError(f"mixer '{kind}': {e}") from None
    return strategy


def mixer_strategy(mixer: nn.Module, strategy: str, cp: int) -> str:
    """layer_strategy for a built mixer module (its heads read off its weights, so TP counts)."""
    cls = getattr(type(mixer), "_cp_original", type(mixer))
    if cls not in _KINDS:
        raise CPConfigError(f"mixer {cls.__name__} has no context-parallel version")
    mem = getattr(mixer, "memory", None)
    depth, heads = (len(mem.init_weights), mem.init_weights[0].shape[0]) if mem is not None else (0, 0)
    return layer_strategy(_KINDS[cls], strategy, depth, heads, cp, mem is not None and mem.ln_weight is not None)


def check_cp_config(cfg, cp: int, tp: int = 1, strategy: str = "auto", seq_len: int | None = None) -> list[str]:
    """Config-time check (no process groups needed): each layer's strategy under cp x tp, or
    CPConfigError with one line. cfg: a ModelConfig; seq_len: the training sequence length."""
    if cp < 1 or tp < 1:
        raise CPConfigError(f"parallel.cp={cp} and parallel.tp={tp} must be >= 1")
    if cfg.resolved_mem_heads % tp:
        raise CPConfigError(f"model.mem_heads={cfg.resolved_mem_heads} must be divisible by parallel.tp={tp}")
    if seq_len is not None:
        shard_bounds(seq_len, cp, cfg.chunk_size)          # raises if a rank would get no chunk
    return [layer_strategy(kind, strategy, cfg.mem_depth, cfg.resolved_mem_heads // tp, cp, cfg.mem_norm)
            for kind in cfg.layers]


def _mixers(model: nn.Module):
    for block in model.modules():
        mixer = getattr(block, "mixer", None)
        if isinstance(mixer, nn.Module):
            yield mixer


def apply_context_parallel(model: nn.Module, cp_group=None, strategy: str = "auto",
                           micro_batches: int | None = None) -> nn.Module:
    """Make every Block mixer of `model` context-parallel over cp_group: a CPComm (whose byte
    counts you then read), a process group, or None for megatron's context-parallel group
    when megatron's groups are initialised, else the world. strategy: 'a2a',
    'state_passing', 'ring' or 'auto' (per memory layer: MAC -> ring, else a2a when the
    memory heads divide over the group, else state_passing for a plain depth-1 memory, else ring).
    micro_batches: ring pipelining depth (default 2*cp over batch x heads; cp over batch for
    MAC). Raises CPConfigError, naming the mixer and the reason, before changing anything."""
    if isinstance(cp_group, CPComm):
        comm = cp_group
    else:
        # megatron is only consulted if something already imported it (it is slow to import)
        ps = sys.modules.get("megatron.core.parallel_state")
        if cp_group is None and ps is not None and ps.model_parallel_is_initialized():
            cp_group = ps.get_context_parallel_group()
        comm = CPComm(cp_group)
    mixers = list(_mixers(model))
    chosen = [mixer_strategy(m, strategy, comm.size) for m in mixers]      # validate all first
    remove_context_parallel(model)                                          # applying again replaces it
    # packed rows: one re-layout per batch shared by every Block, its document shards on the chunk grid
    chunk = next((m.chunk_size for m in model.modules() if isinstance(m, NeuralMemory)), 1)
    packed = PackedRows(comm, chunk)
    for block in model.modules():
        if type(block) is Block:
            block.__class__ = CPBlock
            block._cp = packed
    for mixer, s in zip(mixers, chosen):
        ctx = CPContext(comm, s, micro_batches)
        cls = type(mixer)
        if cls not in _RING_WHOLE:                  # (a ring runs the mixer's modules as they are)
            for module in mixer.modules():
                if module is not mixer and type(module) in _SHARD:
                    module.__class__ = _SHARD[type(module)]
                    module._cp = ctx
                    if isinstance(module, NeuralMemory):
                        module.scan_fn = ctx.memory_scan
        mixer.__class__ = _cp_class(cls)
        mixer._cp = ctx
    return model


def remove_context_parallel(model: nn.Module) -> nn.Module:
    for module in model.modules():
        original = getattr(type(module), "_cp_original", None)
        if original is not None:
            module.__class__ = original
            del module._cp
            if isinstance(module, NeuralMemory):
                module.scan_fn = None
    return model


def local_shard(x: torch.Tensor, rank: int, cp: int, multiple: int = 1, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous shard of x along dim, split by shard_bounds."""
    a, b = shard_bounds(x.shape[dim], cp, multiple)[rank]
    return x.narrow(dim, a, b - a)


def cp_allreduce_grads(model: nn.Module, comm: CPComm) -> None:
    """Sum every parameter's gradient over the CP group (what DP-with-CP grad sync does). A
    parameter a rank did not use (W^0 past rank 0 under ring) has no gradient there: zeros."""
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            by_dtype.setdefault(p.dtype, []).append(p)
    for params in by_dtype.values():                                       # one collective per dtype
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        flat = comm.raw_all_reduce(flat, "grad_sync", scope="grad_sync")
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p).clone()
