"""The parallel layout of a run, checked before any process group starts.

``plan_layout(cfg, world_size)`` turns the run config's ``[parallel]`` section and the launcher's
world size into a ``Layout`` (tp, pp, vpp, dp, sequence parallel, engine, micro-batches) or
refuses it with one line that names the field and the fix. Nothing here touches
torch.distributed, so a bad layout fails in milliseconds, on every rank alike, before the
first collective could hang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from titans_scale.config import RunConfig
from titans_scale.model.config import ATTENTION_MIXERS, MEMORY_MIXERS
from titans_scale.parallel.state import ParallelConfigError
from titans_scale.precision.select import te_unavailable

__all__ = ["Layout", "plan_layout", "padded_vocab_size", "world_size_from_env"]

# Mixers that carry attention heads (everything but the memory-only LMM).
_ATTENTION_HEADS = set(ATTENTION_MIXERS) | {"mac", "mag", "mal"}
# The vocabulary is padded to a multiple of this (and of tp), so a checkpoint's embedding has
# the same shape under every power-of-two TP size and reshards freely (Megatron pads likewise).
VOCAB_MULTIPLE = 128


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    vpp: int                  # model chunks per pipeline rank (1 = plain 1F1B)
    sequence_parallel: bool
    engine: str               # "megatron" | "deepspeed"
    zero_stage: int
    microbatches: int         # per data-parallel rank and step
    micro_batch_size: int

    @property
    def virtual_stages(self) -> int:
        return self.pp * self.vpp

    def describe(self) -> str:
        sp = "+SP" if self.sequence_parallel else ""
        eng = self.engine if self.engine == "megatron" else f"deepspeed ZeRO-{self.zero_stage}"
        vpp = f" ({self.vpp} virtual stages each)" if self.vpp > 1 else ""
        cp = f" x CP={self.cp}" if self.cp > 1 else ""
        return (f"TP={self.tp}{sp} x PP={self.pp}{vpp}{cp} x DP={self.dp} ({eng}), "
                f"{self.microbatches} micro-batches of {self.micro_batch_size}")


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    multiple = VOCAB_MULTIPLE * tp // _gcd(VOCAB_MULTIPLE, tp)
    return -(-vocab_size // multiple) * multiple


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


def plan_layout(cfg: RunConfig, world_size: int) -> Layout:
    """The layout for `world_size` processes, or ParallelConfigError naming the fix."""
    p, m, d = cfg.parallel, cfg.model, cfg.data

    def bad(msg: str) -> None:
        raise ParallelConfigError(msg)

    for name in ("tp", "pp", "cp", "vpp", "microbatches"):
        v = getattr(p, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            bad(f"parallel.{name}={v!r}: must be an integer >= 1")
    if not isinstance(world_size, int) or world_size < 1:
        bad(f"world size {world_size!r}: must be a positive integer (torchrun's WORLD_SIZE)")
    if p.cp > 1:
        if p.engine != "megatron":
            bad(f"parallel.cp={p.cp} with parallel.engine={p.engine!r}: context parallelism reduces "
                "gradients over DP x CP with megatron's DDP; set parallel.engine='megatron'")
        from titans_scale.parallel.context import CPConfigError, check_cp_config
        try:
            check_cp_config(m, p.cp, p.tp, p.cp_strategy, d.seq_len)
        except CPConfigError as e:
            bad(f"parallel.cp={p.cp}, parallel.cp_strategy={p.cp_strategy!r}: {e}")
    mp = p.tp * p.pp * p.cp
    if world_size % mp:
        bad(f"world size {world_size} != tp*pp*cp*dp for parallel.tp={p.tp}, pp={p.pp}, cp={p.cp}: "
            f"launch a multiple of {mp} processes (--nproc_per_node) or change parallel.tp/pp")
    dp = world_size // mp
    if p.sequence_parallel and p.tp == 1:
        bad("parallel.sequence_parallel=true needs parallel.tp >= 2 (it shards the sequence over "
            "the TP group); set parallel.tp or sequence_parallel=false")
    if p.tp > 1:
        if any(k in _ATTENTION_HEADS for k in m.layers) and m.n_heads % p.tp:
            bad(f"parallel.tp={p.tp} does not divide model.n_heads={m.n_heads} (attention heads are "
                f"split over TP ranks); use tp in {{{_divisors(m.n_heads)}}}")
        if any(k in MEMORY_MIXERS for k in m.layers) and m.resolved_mem_heads % p.tp:
            bad(f"parallel.tp={p.tp} does not divide the {m.resolved_mem_heads} memory heads (model.mem_heads); "
                f"use tp in {{{_divisors(m.resolved_mem_heads)}}}")
        if m.resolved_mlp_hidden % p.tp:
            bad(f"parallel.tp={p.tp} does not divide the SwiGLU width {m.resolved_mlp_hidden} (model.mlp_hidden); "
                f"choose model.mlp_hidden divisible by {p.tp}")
        if p.sequence_parallel and d.seq_len % p.tp:
            bad(f"data.seq_len={d.seq_len} is not divisible by parallel.tp={p.tp}, which sequence "
                "parallelism needs; change data.seq_len")
    if p.vpp > 1 and p.pp < 2:
        bad(f"parallel.vpp={p.vpp} interleaves pipeline stages and needs parallel.pp >= 2; set vpp=1")
    if p.pp * p.vpp > len(m.layers):
        bad(f"parallel.pp*vpp={p.pp * p.vpp} exceeds the model's {len(m.layers)} layers (each pipeline "
            "stage needs one); lower parallel.pp/vpp or add model.layers")
    if d.batch_size % p.microbatches:
        bad(f"data.batch_size={d.batch_size} (per data-parallel rank) is not divisible by "
            f"parallel.microbatches={p.microbatches}; change one of them")
    if p.vpp > 1 and p.microbatches % p.pp:
        bad(f"parallel.microbatches={p.microbatches} must be a multiple of parallel.pp={p.pp} for the "
            "interleaved schedule (vpp > 1)")
    if p.engine == "deepspeed":
        if p.zero_stage not in (1, 2, 3):
            bad(f"parallel.zero_stage={p.zero_stage}: DeepSpeed ZeRO stages 1, 2 and 3 are supported")
        if p.pp > 1 and p.zero_stage == 3:
            bad("parallel.zero_stage=3 with parallel.pp > 1: ZeRO-3 partitions parameters, which "
                "pipeline stages cannot gather; use zero_stage=1 with pipelines")
        if p.pp > 1 and p.zero_stage == 2:
            bad("parallel.zero_stage=2 with parallel.pp > 1: ZeRO-2 reduces gradients per micro-batch, "
                "pipelines accumulate them; use zero_stage=1 with pipelines")
        if p.vpp > 1:
            bad("parallel.vpp > 1 with parallel.engine='deepspeed': one DeepSpeed engine wraps one model "
                "chunk; use engine='megatron' for interleaved pipelines")
    elif p.engine != "megatron":
        bad(f"parallel.engine={p.engine!r}: choose 'megatron' or 'deepspeed'")
    if cfg.train.precision == "fp8":     # FP8 in megatron's TP layers: emulated, or TE's layers
        if p.engine != "megatron":
            bad("train.precision='fp8' with parallel.engine='deepspeed' is not supported; use "
                "parallel.engine='megatron' or train.precision='bf16'")
        if p.cp > 1:
            bad(f"train.precision='fp8' with parallel.cp={p.cp} is not supported yet; set parallel.cp=1 "
                "or train.precision='bf16'")
        if cfg.fp8.backend == "te" and (why := te_unavailable()):     # megatron's TE layers (tensor_parallel.py)
            bad(f"fp8.backend='te' under a parallel layout needs Transformer Engine, which cannot run here "
                f"({why}); set fp8.backend='emulated'")
    return Layout(world_size=world_size, tp=p.tp, pp=p.pp, cp=p.cp, dp=dp, vpp=p.vpp,
                  sequence_parallel=bool(p.sequence_parallel), engine=p.engine, zero_stage=p.zero_stage,
                  microbatches=p.microbatches, micro_batch_size=d.batch_size // p.microbatches)
