"""The training loop on one process: AdamW, warmup+cosine, clipping, progress/MFU, metrics,
atomic checkpoints and exact resume. Parallel layouts wrap this same loop (titans_scale.parallel).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from titans_scale.config import RunConfig
from titans_scale.config_io import dump_toml
from titans_scale.errors import TitansError
from titans_scale.flops import model_flops_per_token
from titans_scale.model import TitansLM
from titans_scale.precision.apply import Precision
from titans_scale.train.checkpoint import CheckpointManager
from titans_scale.train.data import RunData
from titans_scale.train.hardware import configure_host, measured_matmul_flops, peak_rss_bytes
from titans_scale.train.metrics import MetricsLogger
from titans_scale.train.optim import build_optimizer, build_scheduler

log = logging.getLogger("titans_scale.train")


class TrainingStopped(TitansError):
    """The run stopped on purpose (too many non-finite steps); the last good checkpoint is intact."""


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate_loss(model, batches, autocast=contextlib.nullcontext) -> float:
    was = model.training
    model.eval()
    total = 0.0
    for inputs, targets in batches:
        with autocast():
            logits, _ = model(inputs)
        total += lm_loss(logits, targets).item()
    model.train(was)
    return total / max(1, len(batches))


class PreemptionGuard:
    """Turns SIGUSR1 / SIGTERM (Slurm's warning before preemption or the time limit) into a
    flag the loop checks after each step: the step finishes, a checkpoint is written, the run
    returns with `preempted` set. A second signal is not special: the checkpoint is atomic."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:          # not the main thread (e.g. inside a test harness)
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.cfg = cfg.validate()
        t = cfg.train
        self.allocator = configure_host(t)
        torch.manual_seed(t.seed)
        self.run_dir = Path(t.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data = RunData(cfg)
        self.model = TitansLM(cfg.model)
        self.precision = Precision(self.model, cfg)      # before the optimizer: TE makes new params
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.steps)
        self.ckpt = CheckpointManager(self.run_dir, keep=t.keep_checkpoints)
        self.step, self.bad_in_row = 0, 0
        if resume:
            self._resume()
        (self.run_dir / "config.toml").write_text(dump_toml(cfg))
        self.metrics = MetricsLogger(self.run_dir, tensorboard=t.tensorboard)
        self.val_batches = self.data.val_loader(t.eval_batches)
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_len)

    # -- checkpoints ------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "bad_in_row": self.bad_in_row, "scheduler": self.scheduler.state_dict(),
                "data": self.data.state_dict(), "rng_cpu": torch.get_rng_state(),
                "tokenizer": self.data.tokenizer.fingerprint()}

    def save(self) -> Path:
        return self.ckpt.save(self.step, self.model, self.optimizer, self.trainer_state())

    def _resume(self) -> None:
        folder = self.ckpt.latest()
        if folder is None:
            log.info("no checkpoint in %s: starting afresh", self.ckpt.dir)
            return
        st = self.ckpt.load(folder, self.model, self.optimizer)
        if st.get("tokenizer") != self.data.tokenizer.fingerprint():
            raise TitansError(f"checkpoint '{folder}' was trained with tokenizer {st.get('tokenizer')!r}, "
                              f"this run uses {self.data.tokenizer.fingerprint()!r}; use the same data.tokenizer")
        self.step, self.bad_in_row = int(st["step"]), int(st["bad_in_row"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.data.load_state_dict(st["data"])
        torch.set_rng_state(st["rng_cpu"])
        log.info("resumed from %s at step %d", folder, self.step)

    # -- one step ---------------------------------------------------------------------------
    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        with self.precision.autocast():
            logits, _ = self.model(inputs)
        loss = lm_loss(logits, targets)
        if torch.isfinite(loss):
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        else:
            gnorm = torch.tensor(float("nan"))
        return loss.item(), gnorm.item()

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        rate = measured_matmul_flops()
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        unigram = self.data.unigram_entropy()
        self.metrics.log("start", self.step, params=self.model.num_params(), matmul_flops=rate,
                         flops_per_token=self.flops_per_token, unigram_loss=unigram, allocator=self.allocator)
        log.info("%.2fM parameters | %.1f MFLOP/token | fp32 matmul %.1f GFLOP/s | unigram baseline "
                 "loss %.3f | %d threads | allocator %s", self.model.num_params() / 1e6, self.flops_per_token / 1e6,
                 rate / 1e9, unigram, torch.get_num_threads(), self.allocator)
        bar = _progress(t.progress, self.step, t.steps)
        with PreemptionGuard() as guard:
            last = self._loop(guard, bar, rate, tokens_per_step)
        if bar is not None:
            bar.close()
        self.metrics.close()
        return last

    def _loop(self, guard: PreemptionGuard, bar, rate: float, tokens_per_step: int) -> dict:
        t = self.cfg.train
        last: dict = {}
        window_t, window_tokens = time.perf_counter(), 0
        while self.step < t.steps:
            inputs, targets = self.data.next_batch(self.step)
            loss, gnorm = self.train_step(inputs, targets)
            if math.isfinite(loss) and math.isfinite(gnorm):
                self.optimizer.step()
                self.bad_in_row = 0
            else:
                self.bad_in_row += 1
                self.metrics.log("skipped", self.step + 1, loss=loss, grad_norm=gnorm)
                log.warning("step %d: non-finite loss/gradient (loss=%s, grad_norm=%s): step skipped",
                            self.step + 1, loss, gnorm)
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            window_tokens += tokens_per_step
            if self.bad_in_row >= t.max_bad_steps:
                latest = self.ckpt.latest()
                raise TrainingStopped(
                    f"{self.bad_in_row} non-finite steps in a row at step {self.step}: stopping. "
                    f"Last good checkpoint: {latest or 'none'}; lower optim.lr or model.max_lr and resume")
            if self.step % t.log_every == 0 or self.step == t.steps:
                dt = time.perf_counter() - window_t
                tps = window_tokens / dt
                last = {"loss": loss, "grad_norm": gnorm, "lr": self.scheduler.get_last_lr()[0],
                        "tokens_per_s": tps, "mfu": tps * self.flops_per_token / rate,
                        "peak_rss_gb": peak_rss_bytes() / 2**30}
                self.metrics.log("train", self.step, **last)
                _update(bar, self.step, last)
                window_t, window_tokens = time.perf_counter(), 0
            if self.step % t.eval_every == 0 or self.step == t.steps:
                vl = evaluate_loss(self.model, self.val_batches, self.precision.autocast)
                last["val_loss"] = vl
                self.metrics.log("eval", self.step, val_loss=vl, val_ppl=math.exp(min(vl, 50)))
            if guard.received is not None:
                path = self.save()
                self.metrics.log("preempted", self.step, signal=int(guard.received), checkpoint=str(path))
                log.warning("signal %d: checkpoint %s written at step %d; exiting to be resumed",
                            guard.received, path, self.step)
                return {**last, "preempted": 1.0}
            if self.step % t.ckpt_every == 0 or self.step == t.steps:
                self.save()
        return last


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                disable=os.environ.get("TITANS_NO_PROGRESS") == "1")


def _update(bar, step: int, m: dict) -> None:
    line = (f"loss {m['loss']:.3f} | lr {m['lr']:.2e} | {m['tokens_per_s']:,.0f} tok/s | "
            f"MFU {100 * m['mfu']:.1f}% | rss {m['peak_rss_gb']:.2f} GiB")
    if bar is None:
        log.info("step %d | %s", step, line)
        return
    bar.n = step
    bar.set_postfix_str(line, refresh=False)
    bar.refresh()
