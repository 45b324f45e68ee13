"""What the training loop asks of whatever runs a step: the `Engine` interface, and its
single-process implementation `LocalEngine`. The parallel one is parallel.runtime.ParallelRuntime
(megatron DDP + distributed optimizer, or DeepSpeed ZeRO, over TP/PP/CP/DP).

An engine owns the model, optimizer, precision and checkpoint format; the Trainer owns the loop
(learning-rate schedule, metrics, eval, skipped steps, preemption, resume). Batches reach the
engine as the loader made them (host tensors): the engine is the one place that moves them, and
the model, to the run's device (titans_scale.device.resolve_device).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch

from titans_scale.config import RunConfig
from titans_scale.device import place_batch, resolve_device
from titans_scale.model import TitansLM
from titans_scale.parallel.step import StepResult
from titans_scale.precision.apply import Precision
from titans_scale.train.checkpoint import CheckpointManager
from titans_scale.train.evaluate import evaluate_loss, forward_batch, lm_loss
from titans_scale.train.optim import build_optimizer, build_scheduler

__all__ = ["Engine", "LocalEngine", "StepResult"]

Batches = list[tuple[torch.Tensor, ...]]      # (inputs, targets), or packed rows (inputs, targets, cu_seqlens)


class Engine(Protocol):
    is_writer: bool        # the rank that writes metrics, logs and the run folder's files
    dp_rank: int           # which block of the global batch this rank reads
    dp_size: int           # data-parallel ranks (the global batch is dp_size blocks)
    world_size: int        # processes running the model (MFU counts each one's peak)
    device: torch.device   # where this rank's model and batches live (titans_scale.device)

    def summary(self) -> dict:
        """What runs where, for the run's start record (parameters, or the parallel layout)."""

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float,
                   cu_seqlens: torch.Tensor | None = None) -> StepResult:
        """One optimizer step at learning rate `lr` on this rank's rows of the global batch
        (packed rows: with their document starts, ops/varlen.py)."""

    def eval_loss(self, batches: Batches) -> float:
        """Mean held-out loss over `batches` (this rank's rows of each global batch)."""

    def latest(self) -> Path | None:
        """The newest complete checkpoint of the run, if any."""

    def save(self, step: int, extra_state: dict) -> Path:
        """A checkpoint of model + optimizer (+ the engine's own state) with `extra_state`."""

    def load(self, folder: Path) -> dict:
        """Restore model + optimizer (+ the engine's own state); returns the saved extra_state."""

    def barrier(self) -> None:
        """Wait for every rank (after the writer prepared something the others read)."""

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (a decision all ranks take together)."""

    def close(self) -> None:
        """Release what the engine started (process groups)."""


class LocalEngine:
    """One process: TitansLM, AdamW with the warmup + cosine scheduler, precision (bf16 autocast
    or FP8 layers) and the atomic CheckpointManager, whose trainer.pt also carries the scheduler
    and the RNG (exact resume)."""

    is_writer, dp_rank, dp_size, world_size = True, 0, 1, 1

    def __init__(self, cfg: RunConfig, model: TitansLM | None = None):
        """model: the weights to start from (train.init_from); None: a fresh init seeded by train.seed."""
        t = cfg.train
        torch.manual_seed(t.seed)
        self.grad_clip = cfg.optim.grad_clip
        self.device = resolve_device(t.device)
        # On the device before precision (its layers and FP8 buffers follow the weights) and
        # before the optimizer (its state follows the parameters).
        self.model = (model if model is not None else TitansLM(cfg.model)).to(self.device)
        self.precision = Precision(self.model, cfg)      # before the optimizer: TE makes new params
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.steps)
        self.ckpt = CheckpointManager(t.run_dir, keep=t.keep_checkpoints)

    def summary(self) -> dict:
        return {"params": self.model.num_params()}

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float,
                   cu_seqlens: torch.Tensor | None = None) -> StepResult:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batch = place_batch(self.device, inputs, targets, *([] if cu_seqlens is None else [cu_seqlens]))
        with self.precision.autocast():
            logits, targets = forward_batch(self.model, batch)
        loss = lm_loss(logits, targets)
        grad_norm = float("nan")
        if torch.isfinite(loss):
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip).item()
        applied = math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The scheduler's lr is `lr` (the same warmup + cosine); stepping it keeps its position,
        # which the checkpoint carries for converters and resumes.
        self.scheduler.step()
        return StepResult(loss.item(), grad_norm, applied)

    def eval_loss(self, batches: Batches) -> float:
        return evaluate_loss(self.model, [place_batch(self.device, *b) for b in batches],
                             self.precision.autocast)

    def latest(self) -> Path | None:
        return self.ckpt.latest()

    def save(self, step: int, extra_state: dict) -> Path:
        state = {**extra_state, "scheduler": self.scheduler.state_dict(), "rng_cpu": torch.get_rng_state()}
        return self.ckpt.save(step, self.model, self.optimizer, state)

    def load(self, folder: Path) -> dict:
        state = self.ckpt.load(folder, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        return state

    def barrier(self) -> None:
        pass

    def any_rank(self, flag: bool) -> bool:
        return flag

    def close(self) -> None:
        pass
