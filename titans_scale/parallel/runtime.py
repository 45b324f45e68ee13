"""Everything one rank needs for a distributed step: layout, groups, model chunks, engine,
sharded checkpoints. It is the training loop's engine under a parallel layout (train.engine.Engine).

    rt = ParallelRuntime(cfg, plan_layout(cfg, world_size))   # under torchrun (or run_distributed)
    loss, grad_norm, applied = rt.train_step(inputs, targets, lr)   # this DP rank's rows
    rt.train_step(inputs, targets, lr, cu_seqlens)                  # packed rows (ops/varlen.py)

The order is fixed: the layout is checked before any process group exists (a refused layout
never hangs a collective), then megatron's groups, then the model chunks, then the engine.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from titans_scale.config import RunConfig
from titans_scale.device import collective_device, place_batch, resolve_device
from titans_scale.model import TitansLM
from titans_scale.ops.varlen import row_slice
from titans_scale.parallel.build import build_chunks
from titans_scale.parallel.checkpoint import ShardedCheckpointer
from titans_scale.parallel.layout import Layout, plan_layout, world_size_from_env
from titans_scale.parallel.pipeline import run_schedule
from titans_scale.parallel.state import ParallelInfo, destroy_parallel, init_parallel
from titans_scale.parallel.step import StepResult
from titans_scale.precision.apply import Precision

__all__ = ["ParallelRuntime"]


class ParallelRuntime:
    def __init__(self, cfg: RunConfig, layout: Layout | None = None, model: TitansLM | None = None):
        """layout: the run's plan_layout (None: planned here for torchrun's world size)."""
        self.cfg = cfg
        self.layout: Layout = layout or plan_layout(cfg, world_size_from_env())
        lay = self.layout
        self.device = resolve_device(cfg.train.device)
        self.info: ParallelInfo = init_parallel(tp=lay.tp, pp=lay.pp, cp=lay.cp, vpp=lay.vpp if lay.vpp > 1 else None,
                                                seed=cfg.train.seed, device=self.device,
                                                timeout_s=cfg.parallel.timeout_s)
        # On the device before CP, precision and the engine wrap them (as LocalEngine's model).
        self.chunks = [c.to(self.device) for c in build_chunks(cfg, lay, model)]
        if lay.cp > 1:
            # Each rank runs its contiguous shard of every sequence; the mixers exchange halos and
            # memory state over megatron's CP group (before DDP wraps the chunks: names unchanged).
            from titans_scale.parallel.context import apply_context_parallel
            for c in self.chunks:
                apply_context_parallel(c, ps.get_context_parallel_group(), cfg.parallel.cp_strategy)
        # Precision from outside the model, before DDP wraps the chunks: bf16 autocast, or FP8
        # (emulated) in the TP layers with amaxes reduced over TP x DP as Megatron-LM asks TE to.
        fp8 = cfg.train.precision == "fp8"
        self.precision = Precision(self.chunks, cfg, tensor_parallel=True,
                                   amax_group=ps.get_amax_reduction_group(with_context_parallel=True) if fp8 else None)
        if lay.engine == "megatron":
            from titans_scale.parallel.megatron_engine import MegatronEngine
            self.engine = MegatronEngine(self.chunks, cfg, lay)
        else:
            from titans_scale.parallel.deepspeed_engine import DeepSpeedEngine
            self.engine = DeepSpeedEngine(self.chunks, cfg, lay)
        self.ckpt = ShardedCheckpointer(cfg.train.run_dir, self.engine, lay, keep=cfg.train.keep_checkpoints)
        self.is_writer = dist.get_rank() == 0
        self.dp_size, self.world_size = lay.dp, lay.world_size

    # -- batches ----------------------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        return self.info.dp_rank

    def dp_slice(self, batch: torch.Tensor) -> torch.Tensor:
        """This DP rank's rows of a global batch (rank r takes the r-th block, as TokenLoader)."""
        return batch.chunk(self.layout.dp, dim=0)[self.dp_rank]

    def cp_slice(self, batch: torch.Tensor) -> torch.Tensor:
        """This CP rank's contiguous shard of every sequence (split on the memory's chunk grid)."""
        if self.layout.cp == 1:
            return batch
        from titans_scale.parallel.context import local_shard
        return local_shard(batch, self.info.cp_rank, self.layout.cp, self.cfg.model.chunk_size, dim=1)

    def _loss_denominator(self, targets: torch.Tensor) -> float:
        """The step's counted targets (not -100) over every DP rank, per micro-batch of one rank
        (pipeline._forward_step): the loss is then the mean over counted targets, as lm_loss's."""
        counted = (targets != -100).sum().to(collective_device(), torch.float64)
        dist.all_reduce(counted, group=ps.get_data_parallel_group())
        return counted.item() / (self.layout.microbatches * self.layout.dp)

    def _microbatches(self, inputs: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
        """(tokens, targets) per micro-batch, packed rows with their cu_seqlens third (those of the
        whole rows: under CP each Block re-lays the documents that span shards across the group)."""
        length = inputs.shape[1]
        inputs, targets = place_batch(self.device, self.cp_slice(inputs), self.cp_slice(targets))
        n = self.layout.microbatches
        if inputs.shape[0] % n:
            raise ValueError(f"{inputs.shape[0]} rows per data-parallel rank do not split into "
                             f"parallel.microbatches={n}")
        if cu_seqlens is None:
            return list(zip(inputs.chunk(n), targets.chunk(n)))
        m = inputs.shape[0] // n            # each micro-batch's rows keep their documents whole
        cus = place_batch(self.device, *(row_slice(cu_seqlens, length, i * m, (i + 1) * m) for i in range(n)))
        return list(zip(inputs.chunk(n), targets.chunk(n), cus))

    # -- steps ------------------------------------------------------------------------------
    def _global_mean(self, losses: list[torch.Tensor]) -> float:
        """Mean loss over micro-batches (last stage) and DP ranks, known to every rank."""
        t = torch.zeros(1, dtype=torch.float64, device=collective_device())
        if losses:
            t += torch.stack([loss.double() for loss in losses]).mean()
            if ps.get_tensor_model_parallel_rank() != 0:
                t.zero_()                        # TP ranks hold the same loss: count it once
        dist.all_reduce(t, group=ps.get_model_parallel_group())
        if self.layout.cp > 1:                   # each CP rank holds its shard's part of the mean
            dist.all_reduce(t, group=ps.get_context_parallel_group())
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        return t.item() / self.layout.dp

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor,
                         cu_seqlens: torch.Tensor | None = None) -> float:
        """Gradients of one step's micro-batches (reduced by the engine at the schedule's end,
        megatron; or in step(), DeepSpeed). Returns the global mean loss."""
        self.engine.zero_grad()
        micro, denominator = self._microbatches(inputs, targets, cu_seqlens), self._loss_denominator(targets)
        with self.precision.autocast():
            losses = run_schedule(self.engine.chunks, micro, self.cfg.data.seq_len, self.layout.micro_batch_size,
                                  denominator)
        return self._global_mean(losses)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float,
                   cu_seqlens: torch.Tensor | None = None) -> StepResult:
        """inputs, targets: [rows of this DP rank, seq_len] (whole sequences: CP ranks take their
        shards); cu_seqlens: packed rows' document starts in these rows (ops/varlen.py)."""
        loss = self.forward_backward(inputs, targets, cu_seqlens)
        if not math.isfinite(loss):
            self.engine.zero_grad()
            return StepResult(loss, float("nan"), False)
        applied, grad_norm = self.engine.step(lr)
        return StepResult(loss, grad_norm, applied)

    def eval_loss(self, batches: list[tuple[torch.Tensor, ...]]) -> float:
        """Mean held-out loss over `batches` (this DP rank's rows of each global batch; packed
        rows carry their cu_seqlens third)."""
        losses = [self._eval_batch(*b) for b in batches]
        return sum(losses) / max(1, len(losses))

    @torch.no_grad()
    def _eval_batch(self, inputs: torch.Tensor, targets: torch.Tensor,
                    cu_seqlens: torch.Tensor | None = None) -> float:
        chunks = self.engine.chunks
        micro, denominator = self._microbatches(inputs, targets, cu_seqlens), self._loss_denominator(targets)
        for c in chunks:
            _module(c).eval()
        try:
            with self.precision.autocast():
                losses = run_schedule(chunks, micro, self.cfg.data.seq_len, self.layout.micro_batch_size,
                                      denominator, forward_only=True)
        finally:
            for c in chunks:
                _module(c).train()
        return self._global_mean(losses)

    # -- the rest of train.engine.Engine ----------------------------------------------------
    def summary(self) -> dict:
        return {"layout": self.layout.describe()}

    def latest(self) -> Path | None:
        return self.ckpt.latest()

    def save(self, step: int, extra_state: dict) -> Path:
        return self.ckpt.save(step, extra_state)

    def load(self, folder: Path) -> dict:
        """Model + optimizer resharded into this layout; returns the saved extra_state."""
        return self.ckpt.load(folder)

    def barrier(self) -> None:
        dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        destroy_parallel()


def _module(chunk):
    return getattr(chunk, "module", chunk)
