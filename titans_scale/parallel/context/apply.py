"""apply_context_parallel: run a TitansLM on one shard of each sequence per CP rank.

Which strategy serves which mixer, and why:

| mixer | a2a | state_passing | ring | attention / conv under CP |
| --- | --- | --- | --- | --- |
| lmm | yes (heads % cp == 0) | depth 1 | yes | conv halo (kernel-1 inputs) |
| mag | yes (heads % cp == 0) | depth 1 | yes | one halo of max(window, kernel)-1 inputs feeds both |
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

Mechanics: each Block's mixer keeps its parameters and names (state_dict unchanged); only
its class is swapped for a subclass whose forward runs the CP version (FSDP2's
fully_shard swaps classes the same way). ``remove_context_parallel`` swaps back.

Contract (for the trainer):
  * every CP rank calls model(tokens_shard) with its contiguous shard of the same
    sequences (split with shard_bounds / local_shard, any non-empty split works) and a
    fresh state (state=None, position 0); logits come back for the local tokens;
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

from titans_scale.model.memory import MemoryLayerState, NeuralMemory
from titans_scale.model.mixers import LMM, MAC, MAG, MAL, FullAttention, MACState, SegmentAttention, SlidingWindow
from titans_scale.ops.state import MemoryState

from .comm import CPComm
from .halo import gather_prefix, prefix_halo
from .ring import ring_apply
from .scan import check_memory_strategy, cp_memory_scan
from .shard import STRATEGIES, CPConfigError, ShardInfo, shard_bounds


@dataclass
class CPContext:
    comm: CPComm
    strategy: str                    # the memory strategy of this mixer
    micro_batches: int | None = None

    def shard(self, x: torch.Tensor) -> ShardInfo:
        return ShardInfo.gather(self.comm, x.shape[1])


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


def _memory_forward(mem: NeuralMemory, x, halo, ctx: CPContext, info: ShardInfo):
    """NeuralMemory.forward on a shard: the conv cache comes from the halo of x (zero rows
    stand in for tokens before the sequence: the projection has no bias, so they project to
    the zero cache a fresh sequence starts with)."""
    k = mem.conv.kernel - 1
    cache = None
    if k > 0:
        h = _last(halo, k)
        h = torch.cat([h.new_zeros(h.shape[0], k - h.shape[1], h.shape[2]), h], dim=1)
        _, cache = mem.project(h, None)
    (q, kk, v), _ = mem.project(x, cache)
    theta, eta, alpha = mem.gate_values(x)
    init = mem.initial_state(x.shape[0], x.device).memory
    y, state = cp_memory_scan(q, kk, v, theta, eta, alpha, init, mem.chunk_size, ctx.comm, ctx.strategy,
                              mem.impl, getattr(mem, "recompute_group", None), ctx.micro_batches, info)
    return mem.output(y, x), state


def _halo(x, n, ctx, info):
    with ctx.comm.scope("halo"):
        return prefix_halo(x, n, ctx.comm, info)


def _unit(cp_forward):
    """forward(x, state, pos0) around cp_forward(self, x, info, pos0): a fresh state, the
    shard lengths, and one ordered unit of CP communication (comm.begin / comm.end)."""

    @functools.wraps(cp_forward)
    def forward(self, x, state, pos0):
        _fresh(state)
        comm = self._cp.comm
        comm.begin(x)
        try:
            out, new_state = cp_forward(self, x, self._cp.shard(x), pos0)
        except BaseException:
            comm.abort()
            raise
        return comm.end(out), new_state

    return forward


class CPSlidingWindow(SlidingWindow):
    @_unit
    def forward(self, x, info, pos0):
        halo = _halo(x, self.window - 1, self._cp, info)
        return SlidingWindow.forward(self, x, halo, pos0 + info.offset())[0], None


class CPSegmentAttention(SegmentAttention):
    @_unit
    def forward(self, x, info, pos0):
        # segments count from the sequence start: rank r needs offset mod segment_len tokens back
        need = [info.offset(r) % self.segment for r in range(info.size)]
        halo = _last(_halo(x, max(need), self._cp, info), need[info.rank])
        return SegmentAttention.forward(self, x, halo, pos0 + info.offset())[0], None


class CPFullAttention(FullAttention):
    @_unit
    def forward(self, x, info, pos0):
        with self._cp.comm.scope("halo"):
            prev = gather_prefix(x, self._cp.comm, info)
        return FullAttention.forward(self, x, prev, pos0 + info.offset())[0], None


class CPLMM(LMM):
    @_unit
    def forward(self, x, info, pos0):
        halo = _halo(x, self.memory.conv.kernel - 1, self._cp, info)
        out, mem = _memory_forward(self.memory, x, halo, self._cp, info)
        return out, CPLayerState(mem)


class CPMAG(MAG):
    @_unit
    def forward(self, x, info, pos0):
        ctx = self._cp
        w, k = self.swa.window - 1, self.memory.conv.kernel - 1
        halo = _halo(x, max(w, k), ctx, info)          # one exchange serves attention and conv
        y, _ = SlidingWindow.forward(self.swa, x, _last(halo, w), pos0 + info.offset())
        m, mem = _memory_forward(self.memory, x, halo, ctx, info)
        return self.norm_y(y) * torch.sigmoid(self.norm_m(m)), CPLayerState(mem)


class CPMAL(MAL):
    @_unit
    def forward(self, x, info, pos0):
        ctx = self._cp
        m, mem = _memory_forward(self.memory, x, _halo(x, self.memory.conv.kernel - 1, ctx, info), ctx, info)
        y, _ = SlidingWindow.forward(self.swa, m, _halo(m, self.swa.window - 1, ctx, info), pos0 + info.offset())
        return y, CPLayerState(mem)


class CPMAC(MAC):
    """The whole MAC mixer as a ring: rank r resumes MAC's own streaming state from rank r-1."""

    @_unit
    def forward(self, x, info, pos0):
        ctx, B, mem = self._cp, x.shape[0], self.memory
        fresh = mem.initial_state(B, x.device)
        n = fresh.memory.depth
        H = mem.init_weights[0].shape[0]
        conv_x = fresh.conv.new_zeros(B, mem.conv.kernel - 1, H * mem.d)   # = no cache (zeros)
        template = [*fresh.memory.tensors(), fresh.conv, conv_x, x[:, :0]]
        start = pos0 + info.offset()

        def step(xs, sts):
            memory = MemoryState(sts[:n], sts[n:2 * n], sts[2 * n:3 * n], 0, mem.chunk_size)
            st = MACState(MemoryLayerState(memory, sts[3 * n]), sts[3 * n + 1], sts[3 * n + 2])
            out, new = MAC.forward(self, xs[0], st, start)
            return [out], [*new.memory.memory.tensors(), new.memory.conv, new.conv_x, new.tail]

        params = [p for p in self.parameters() if p.requires_grad]
        with ctx.comm.scope("memory"):
            (out,), ends = ring_apply(step, [x], template, ctx.comm, ctx.micro_batches or ctx.comm.size, params)
            final = _broadcast_state(ends[:3 * n], n, mem.chunk_size, ctx.comm)
        return out, CPLayerState(final)


def _broadcast_state(ts, n, chunk_size, comm: CPComm) -> MemoryState:
    """Rank P-1's MemoryState tensors on every rank (one broadcast)."""
    flat = comm.broadcast(torch.cat([t.reshape(-1) for t in ts]), comm.size - 1)
    out, i = [], 0
    for t in ts:
        out.append(flat[i:i + t.numel()].view(t.shape))
        i += t.numel()
    return MemoryState(out[:n], out[n:2 * n], out[2 * n:], 0, chunk_size)


CP_CLASSES: dict[type, type] = {
    SlidingWindow: CPSlidingWindow, SegmentAttention: CPSegmentAttention, FullAttention: CPFullAttention,
    LMM: CPLMM, MAG: CPMAG, MAL: CPMAL, MAC: CPMAC,
}
_ORIGINAL = {v: k for k, v in CP_CLASSES.items()}
_NAMES = {LMM: "lmm", MAG: "mag", MAL: "mal", MAC: "mac"}


def layer_strategy(kind: str, strategy: str, depth: int, heads: int, cp: int) -> str:
    """The memory strategy a layer of mixer `kind` runs with ("none": attention only), or
    CPConfigError naming the mixer, the reason and the fix. heads: memory heads per TP rank."""
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
        strategy = "a2a" if heads % cp == 0 else "state_passing" if depth == 1 else "ring"
    try:
        check_memory_strategy(strategy, depth, heads, cp)
    except CPConfigError as e:
        raise CPConfigError(f"mixer '{kind}': {e}") from None
    return strategy


def mixer_strategy(mixer: nn.Module, strategy: str, cp: int) -> str:
    """layer_strategy for a built mixer module (its heads read off its weights, so TP counts)."""
    kind = _ORIGINAL.get(type(mixer), type(mixer))
    if kind not in CP_CLASSES:
        raise CPConfigError(f"mixer {kind.__name__} has no context-parallel version")
    if kind not in _NAMES:
        return layer_strategy("attention", strategy, 0, 0, cp)
    mem = mixer.memory
    return layer_strategy(_NAMES[kind], strategy, len(mem.init_weights), mem.init_weights[0].shape[0], cp)


def check_cp_config(cfg, cp: int, tp: int = 1, strategy: str = "auto", seq_len: int | None = None) -> list[str]:
    """Config-time check (no process groups needed): each layer's strategy under cp x tp, or
    CPConfigError with one line. cfg: a ModelConfig; seq_len: the training sequence length."""
    if cp < 1 or tp < 1:
        raise CPConfigError(f"parallel.cp={cp} and parallel.tp={tp} must be >= 1")
    if cfg.memory_heads % tp:
        raise CPConfigError(f"model.mem_heads={cfg.memory_heads} must be divisible by parallel.tp={tp}")
    if seq_len is not None:
        shard_bounds(seq_len, cp, cfg.chunk_size)          # raises if a rank would get no chunk
    return [layer_strategy(kind, strategy, cfg.mem_depth, cfg.memory_heads // tp, cp) for kind in cfg.layers]


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
    memory heads divide over the group, else state_passing for depth 1, else ring).
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
    for mixer, s in zip(mixers, chosen):
        mixer.__class__ = CP_CLASSES[_ORIGINAL.get(type(mixer), type(mixer))]
        mixer._cp = CPContext(comm, s, micro_batches)
    return model


def remove_context_parallel(model: nn.Module) -> nn.Module:
    for mixer in _mixers(model):
        if type(mixer) in _ORIGINAL:
            mixer.__class__ = _ORIGINAL[type(mixer)]
            del mixer._cp
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
