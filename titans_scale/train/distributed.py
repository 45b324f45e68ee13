"""The training loop for a parallel layout (tensor / sequence / pipeline / data parallel).

    torchrun --nproc_per_node=4 -m titans_scale.cli train --config configs/parallel/tp2_pp2.toml

The CLI comes here when WORLD_SIZE > 1 (torchrun). The loop is the single-process Trainer's
(same warmup + cosine schedule, clipping, skipped non-finite steps, metrics, eval, preemption
checkpoint), with the step done by parallel.runtime.ParallelRuntime and checkpoints by
parallel.checkpoint.ShardedCheckpointer, which reshard on load. Every data-parallel rank reads
its block of the same global batch the single-process loader would produce, so a run resumed
under another layout (same global batch) continues the same loss curve.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from titans_scale.config import RunConfig
from titans_scale.config_io import dump_toml
from titans_scale.data.shards import prepare_corpus
from titans_scale.errors import TitansError
from titans_scale.flops import model_flops_per_token
from titans_scale.parallel.checkpoint import ShardedCheckpointer
from titans_scale.parallel.layout import plan_layout
from titans_scale.parallel.runtime import ParallelRuntime, world_size_from_env
from titans_scale.parallel.state import destroy_parallel
from titans_scale.train.data import RunData, sources_of
from titans_scale.train.hardware import configure_host, measured_matmul_flops, peak_rss_bytes
from titans_scale.train.metrics import MetricsLogger
from titans_scale.train.optim import lr_lambda
from titans_scale.train.trainer import PreemptionGuard, TrainingStopped, _progress, _update

log = logging.getLogger("titans_scale.train")

__all__ = ["DistributedTrainer", "train_distributed"]


class DistributedTrainer:
    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.cfg = cfg.validate()
        t = cfg.train
        plan_layout(cfg, world_size_from_env())       # refuse a bad layout before any process group
        self.allocator = configure_host(t)
        self.rt = ParallelRuntime(cfg)
        self.layout, self.engine = self.rt.layout, self.rt.engine
        self.rank = dist.get_rank()
        self.is_logger = self.rank == 0
        self.run_dir = Path(t.run_dir)
        if self.is_logger:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            d = cfg.data   # prepare the shards once; the other ranks then only read them
            prepare_corpus(d.shard_dir, _tokenizer(cfg), sources_of(d.source), max_bytes=d.max_bytes)
        dist.barrier()
        self.data = RunData(cfg, rank=self.rt.dp_rank, world_size=self.layout.dp)
        self.lr_at = lr_lambda(cfg.optim, t.steps)
        self.ckpt = ShardedCheckpointer(self.run_dir, self.engine, self.layout, keep=t.keep_checkpoints)
        self.step, self.bad_in_row = 0, 0
        if resume:
            self._resume()
        if self.is_logger:
            (self.run_dir / "config.toml").write_text(dump_toml(cfg))
        self.metrics = MetricsLogger(self.run_dir, tensorboard=t.tensorboard, enabled=self.is_logger)
        self.val_batches = self.data.val_loader(t.eval_batches)
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_len)

    # -- checkpoints ------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "bad_in_row": self.bad_in_row, "data": self.data.state_dict(),
                "tokenizer": self.data.tokenizer.fingerprint()}

    def save(self) -> Path:
        return self.ckpt.save(self.step, self.trainer_state())

    def _resume(self) -> None:
        folder = self.ckpt.latest()
        if folder is None:
            if self.is_logger:
                log.info("no checkpoint in %s: starting afresh", self.ckpt.dir)
            return
        st = self.ckpt.load(folder)
        if st.get("tokenizer") != self.data.tokenizer.fingerprint():
            raise TitansError(f"checkpoint '{folder}' was trained with tokenizer {st.get('tokenizer')!r}, "
                              f"this run uses {self.data.tokenizer.fingerprint()!r}; use the same data.tokenizer")
        self.step, self.bad_in_row = int(st["step"]), int(st["bad_in_row"])
        self.data.load_state_dict(st["data"])
        if self.is_logger:
            log.info("resumed from %s at step %d (%s)", folder, self.step, self.layout.describe())

    # -- the loop ---------------------------------------------------------------------------
    def lr(self) -> float:
        return self.cfg.optim.lr * self.lr_at(self.step)

    def eval_loss(self) -> float:
        losses = [self.rt.eval_loss(x, y) for x, y in self.val_batches]
        return sum(losses) / max(1, len(losses))

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        rate = measured_matmul_flops() * self.layout.world_size
        tokens_per_step = cfg.data.batch_size * self.layout.dp * cfg.data.seq_len
        self.metrics.log("start", self.step, layout=self.layout.describe(), matmul_flops=rate,
                         flops_per_token=self.flops_per_token, allocator=self.allocator)
        if self.is_logger:
            log.info("training on %d processes: %s | allocator %s", self.layout.world_size,
                     self.layout.describe(), self.allocator)
        bar = _progress(t.progress and self.is_logger, self.step, t.steps)
        with PreemptionGuard() as guard:
            last = self._loop(guard, bar, rate, tokens_per_step)
        if bar is not None:
            bar.close()
        self.metrics.close()
        return last

    def _preempted(self, guard: PreemptionGuard) -> bool:
        """Any rank's signal stops every rank after the same step (a collective decision)."""
        flag = torch.tensor([0 if guard.received is None else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _loop(self, guard, bar, rate: float, tokens_per_step: int) -> dict:
        t = self.cfg.train
        last: dict = {}
        window_t, window_tokens = time.perf_counter(), 0
        while self.step < t.steps:
            inputs, targets = self.data.next_batch(self.step)
            r = self.rt.train_step(inputs, targets, self.lr())
            if r.applied and math.isfinite(r.grad_norm):
                self.bad_in_row = 0
            else:
                self.bad_in_row += 1
                self.metrics.log("skipped", self.step + 1, loss=r.loss, grad_norm=r.grad_norm)
                if self.is_logger:
                    log.warning("step %d: non-finite loss/gradient (loss=%s, grad_norm=%s): step skipped",
                                self.step + 1, r.loss, r.grad_norm)
            self.step += 1
            lr = self.lr()          # logged like the single-process trainer: the next step's rate
            window_tokens += tokens_per_step
            if self.bad_in_row >= t.max_bad_steps:
                raise TrainingStopped(
                    f"{self.bad_in_row} non-finite steps in a row at step {self.step}: stopping. "
                    f"Last good checkpoint: {self.ckpt.latest() or 'none'}; lower optim.lr or model.max_lr and resume")
            if self.step % t.log_every == 0 or self.step == t.steps:
                dt = time.perf_counter() - window_t
                tps = window_tokens / dt
                last = {"loss": r.loss, "grad_norm": r.grad_norm, "lr": lr, "tokens_per_s": tps,
                        "mfu": tps * self.flops_per_token / rate, "peak_rss_gb": peak_rss_bytes() / 2**30}
                self.metrics.log("train", self.step, **last)
                if self.is_logger:
                    _update(bar, self.step, last)
                window_t, window_tokens = time.perf_counter(), 0
            if self.step % t.eval_every == 0 or self.step == t.steps:
                vl = self.eval_loss()
                last["val_loss"] = vl
                self.metrics.log("eval", self.step, val_loss=vl, val_ppl=math.exp(min(vl, 50)))
            if self._preempted(guard):
                path = self.save()
                self.metrics.log("preempted", self.step, signal=int(guard.received or 0), checkpoint=str(path))
                if self.is_logger:
                    log.warning("signal: checkpoint %s written at step %d; exiting to be resumed", path, self.step)
                return {**last, "preempted": 1.0}
            if self.step % t.ckpt_every == 0 or self.step == t.steps:
                self.save()
        return last


def _tokenizer(cfg: RunConfig):
    from titans_scale.data.tokenizer import load_tokenizer
    return load_tokenizer(cfg.data.tokenizer)


def train_distributed(cfg: RunConfig, resume: bool = True) -> tuple[int, dict, bool]:
    """Run a distributed training under torchrun; returns (step, last metrics, is rank 0)."""
    trainer = DistributedTrainer(cfg, resume=resume)
    try:
        last = trainer.run()
        return trainer.step, last, trainer.is_logger
    finally:
        destroy_parallel()
