"""Everything one rank needs for a distributed step: layout, groups, model chunks, engine.

    rt = ParallelRuntime(cfg)                      # under torchrun (or run_distributed)
    loss, grad_norm, applied = rt.train_step(inputs, targets, lr)   # this DP rank's rows

The order is fixed: the layout is checked before any process group exists (a refused layout
never hangs a collective), then megatron's groups, then the model chunks, then the engine.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from titans_scale.config import RunConfig
from titans_scale.model import TitansLM
from titans_scale.parallel.build import build_chunks
from titans_scale.parallel.layout import Layout, plan_layout
from titans_scale.parallel.pipeline import run_schedule
from titans_scale.parallel.state import ParallelInfo, init_parallel
from titans_scale.precision.apply import Precision

__all__ = ["ParallelRuntime", "StepResult", "world_size_from_env"]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class StepResult:
    loss: float            # mean over the global batch (every rank gets it)
    grad_norm: float       # global norm before clipping (nan when the step was skipped)
    applied: bool          # False: non-finite loss, the optimizer step was skipped


class ParallelRuntime:
    def __init__(self, cfg: RunConfig, world_size: int | None = None, model: TitansLM | None = None):
        self.cfg = cfg
        self.layout: Layout = plan_layout(cfg, world_size or world_size_from_env())
        lay = self.layout
        self.info: ParallelInfo = init_parallel(tp=lay.tp, pp=lay.pp, cp=lay.cp,
                                                vpp=lay.vpp if lay.vpp > 1 else None, seed=cfg.train.seed)
        self.chunks = build_chunks(cfg, lay, model)
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

    def _microbatches(self, inputs: torch.Tensor, targets: torch.Tensor):
        inputs, targets = self.cp_slice(inputs), self.cp_slice(targets)
        n = self.layout.microbatches
        if inputs.shape[0] % n:
            raise ValueError(f"{inputs.shape[0]} rows per data-parallel rank do not split into "
                             f"parallel.microbatches={n}")
        return list(zip(inputs.chunk(n), targets.chunk(n)))

    # -- steps ------------------------------------------------------------------------------
    def _global_mean(self, losses: list[torch.Tensor]) -> float:
        """Mean loss over micro-batches (last stage) and DP ranks, known to every rank."""
        t = torch.zeros(1, dtype=torch.float64)
        if losses:
            t += torch.stack([l.double() for l in losses]).mean()
            if ps.get_tensor_model_parallel_rank() != 0:
                t.zero_()                        # TP ranks hold the same loss: count it once
        dist.all_reduce(t, group=ps.get_model_parallel_group())
        if self.layout.cp > 1:                   # each CP rank holds its shard's part of the mean
            dist.all_reduce(t, group=ps.get_context_parallel_group())
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        return t.item() / self.layout.dp

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Gradients of one step's micro-batches (reduced by the engine at the schedule's end,
        megatron; or in step(), DeepSpeed). Returns the global mean loss."""
        self.engine.zero_grad()
        with self.precision.autocast():
            losses = run_schedule(self.engine.chunks, self._microbatches(inputs, targets),
                                  self.cfg.data.seq_len, self.layout.micro_batch_size)
        return self._global_mean(losses)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> StepResult:
        """inputs, targets: [rows of this DP rank, seq_len] (whole sequences: CP ranks take their shards)."""
        loss = self.forward_backward(inputs, targets)
        if not math.isfinite(loss):
            self.engine.zero_grad()
            return StepResult(loss, float("nan"), False)
        applied, grad_norm = self.engine.step(lr)
        return StepResult(loss, grad_norm, applied)

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        chunks = self.engine.chunks
        for c in chunks:
            _module(c).eval()
        try:
            with self.precision.autocast():
                losses = run_schedule(chunks, self._microbatches(inputs, targets), self.cfg.data.seq_len,
                                      self.layout.micro_batch_size, forward_only=True)
        finally:
            for c in chunks:
                _module(c).train()
        return self._global_mean(losses)


def _module(chunk):
    return getattr(chunk, "module", chunk)
