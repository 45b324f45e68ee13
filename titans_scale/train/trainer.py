"""The training loop, for one process or a parallel layout under torchrun: warmup + cosine
schedule, non-finite steps skipped, progress/MFU, metrics, eval, preemption checkpoints and
exact resume. The step, the model and the checkpoint format are the engine's (train/engine.py):
LocalEngine on one process, parallel.runtime.ParallelRuntime for a planned Layout.

    torchrun --nproc_per_node=4 -m titans_scale.cli train --config configs/parallel/tp2_pp2.toml

Under a layout every data-parallel rank reads its block of the same global batch the
single-process loader would produce, so a run resumed under another layout (same global batch)
continues the same loss curve.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from titans_scale.config import RunConfig
from titans_scale.config_io import save_config
from titans_scale.errors import CheckpointError, TitansError
from titans_scale.flops import model_flops_per_token
from titans_scale.io.commit import checkpoint_dir, checkpoints, resume_checkpoint
from titans_scale.model import TitansLM
from titans_scale.parallel.layout import Layout
from titans_scale.train.data import RunData, prepare_data
from titans_scale.train.engine import Engine, LocalEngine
from titans_scale.train.hardware import configure_host, peak_flops, peak_memory_gb
from titans_scale.train.init_from import initial_model
from titans_scale.train.metrics import MetricsLogger
from titans_scale.train.optim import lr_lambda

log = logging.getLogger("titans_scale.train")


class TrainingStopped(TitansError):
    """The run stopped on purpose (too many non-finite steps); the last good checkpoint is intact."""


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
    """The loop around an engine. `layout` (parallel.layout.plan_layout's, planned once by the
    caller) selects the parallel runtime; None trains on this one process."""

    def __init__(self, cfg: RunConfig, resume: bool = False, layout: Layout | None = None):
        self.cfg = cfg.validate()
        t = cfg.train
        self.allocator = configure_host(t)
        self.run_dir = Path(t.run_dir)
        # train.init_from starts a run that has no checkpoint of its own; the engine is handed the
        # loaded model (the parallel runtimes shard it as they build their stages).
        starts_fresh = not (resume and checkpoints(checkpoint_dir(self.run_dir)))
        model = initial_model(cfg, t.init_from) if t.init_from and starts_fresh else None
        self.engine: Engine = _engine(cfg, layout, model)
        if self.engine.world_size > 1:      # prepare the shards once; the other ranks then only read them
            if self.engine.is_writer:
                prepare_data(cfg)
            self.engine.barrier()
        self.data = RunData(cfg, rank=self.engine.dp_rank, world_size=self.engine.dp_size)
        self.lr_at = lr_lambda(cfg.optim, t.steps)
        self.step, self.bad_in_row = 0, 0
        if resume:
            self._resume()
        if self.engine.is_writer:
            try:
                save_config(cfg, self.run_dir / "config.toml")      # makes the run folder
            except OSError as e:
                raise TitansError(f"cannot write the run folder '{self.run_dir}' ({type(e).__name__}: {e}): "
                                  "choose a writable train.run_dir") from None
        # Rows of steps after self.step are replaced by this run's (a resume replays them).
        self.metrics = MetricsLogger(self.run_dir, tensorboard=t.tensorboard, enabled=self.engine.is_writer,
                                     start_step=self.step)
        self.val_batches = self.data.val_loader(t.eval_batches)
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_len)

    # -- checkpoints ------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "bad_in_row": self.bad_in_row, "data": self.data.state_dict(),
                "tokenizer": self.data.tokenizer.fingerprint()}

    def save(self) -> Path:
        """Write a checkpoint; a failed write (permissions, disk full) is tried once more, then
        stops the run in one line (the previous checkpoint stays the latest, nothing is damaged).
        A parallel save is collective (barriers): one rank retrying alone would wait for ranks
        that moved on, so there the first failure stops the run (torchrun ends the others)."""
        tries = 2 if self.engine.world_size == 1 else 1
        for attempt in range(1, tries + 1):
            try:
                return self.engine.save(self.step, self.trainer_state())
            except (OSError, RuntimeError, CheckpointException) as failure:
                e = _os_error(failure, checkpoint_dir(self.run_dir))
                if e is None:           # not a failed write: a bug, with its traceback
                    raise
                if attempt < tries:
                    log.warning("checkpoint at step %d failed (%s): trying once more", self.step, e)
                    continue
                raise CheckpointError(
                    f"could not write the checkpoint of step {self.step} in '{checkpoint_dir(self.run_dir)}' "
                    f"({type(e).__name__}: {e}; {tries} tries): stopping; step {self.step} is not saved, the last "
                    f"saved checkpoint is {self.engine.latest() or 'none'}") from None

    def _resume(self) -> None:
        folder = resume_checkpoint(checkpoint_dir(self.run_dir), self.cfg.train.resume_fallback)
        if folder is None:
            if self.engine.is_writer:
                log.info("no checkpoint in %s: starting afresh", self.run_dir / "checkpoints")
            return
        st = self.engine.load(folder)
        if st.get("tokenizer") != self.data.tokenizer.fingerprint():
            raise TitansError(f"checkpoint '{folder}' was trained with tokenizer {st.get('tokenizer')!r}, "
                              f"this run uses {self.data.tokenizer.fingerprint()!r}; use the same data.tokenizer")
        self.step, self.bad_in_row = int(st["step"]), int(st["bad_in_row"])
        self.data.load_state_dict(st["data"])
        if self.engine.is_writer:
            log.info("resumed from %s at step %d", folder, self.step)

    # -- the loop ---------------------------------------------------------------------------
    def lr(self) -> float:
        """The learning rate of the step after `self.step` steps (warmup + cosine)."""
        return self.cfg.optim.lr * self.lr_at(self.step)

    def run(self) -> dict:
        cfg, t, eng = self.cfg, self.cfg.train, self.engine
        peak, peak_source = peak_flops(eng.device)
        rate = peak * eng.world_size
        tokens_per_step = cfg.data.batch_size * eng.dp_size * cfg.data.seq_len
        if eng.is_writer:
            unigram = self.data.unigram_entropy()
            self.metrics.log("start", self.step, **eng.summary(), matmul_flops=rate, peak_flops_source=peak_source,
                             device=str(eng.device), flops_per_token=self.flops_per_token, unigram_loss=unigram,
                             allocator=self.allocator)
            log.info("%s | %s | %.1f MFLOP/token | %s %.1f GFLOP/s | unigram baseline loss %.3f | "
                     "%d threads | allocator %s", " | ".join(f"{k} {v}" for k, v in eng.summary().items()),
                     eng.device, self.flops_per_token / 1e6, peak_source, rate / 1e9, unigram,
                     torch.get_num_threads(), self.allocator)
        bar = _progress(t.progress and eng.is_writer, self.step, t.steps)
        with PreemptionGuard() as guard:
            last = self._loop(guard, bar, rate, tokens_per_step)
        if bar is not None:
            bar.close()
        self.metrics.close()
        return last

    def close(self) -> None:
        """Release the engine (a parallel runtime's process groups)."""
        self.engine.close()

    def _loop(self, guard: PreemptionGuard, bar, rate: float, tokens_per_step: int) -> dict:
        t, eng = self.cfg.train, self.engine
        last: dict = {}
        window_t, window_tokens = time.perf_counter(), 0
        while self.step < t.steps:
            inputs, targets, *packed = self.data.next_batch(self.step)     # packed: + cu_seqlens
            r = eng.train_step(inputs, targets, self.lr(), *packed)
            if r.applied and math.isfinite(r.grad_norm):
                self.bad_in_row = 0
                window_tokens += tokens_per_step      # a skipped step did no work worth a rate
            else:
                self.bad_in_row += 1
                self.metrics.log("skipped", self.step + 1, loss=r.loss, grad_norm=r.grad_norm)
                if eng.is_writer:
                    log.warning("step %d: non-finite loss/gradient (loss=%s, grad_norm=%s): step skipped",
                                self.step + 1, r.loss, r.grad_norm)
            self.step += 1
            if self.bad_in_row >= t.max_bad_steps:
                raise TrainingStopped(
                    f"{self.bad_in_row} non-finite steps in a row at step {self.step}: stopping. "
                    f"Last good checkpoint: {eng.latest() or 'none'}; lower optim.lr or model.max_lr and resume")
            if self.step % t.log_every == 0 or self.step == t.steps:
                last = {"loss": r.loss, "grad_norm": r.grad_norm, "lr": self.lr(), **peak_memory_gb(eng.device)}
                if window_tokens:       # throughput and MFU of the steps applied since the last row
                    tps = window_tokens / (time.perf_counter() - window_t)
                    last.update(tokens_per_s=tps, mfu=tps * self.flops_per_token / rate)
                self.metrics.log("train", self.step, **last)
                if eng.is_writer:
                    _update(bar, self.step, last)
                window_t, window_tokens = time.perf_counter(), 0
            if self.step % t.eval_every == 0 or self.step == t.steps:
                vl = eng.eval_loss(self.val_batches)
                last["val_loss"] = vl
                self.metrics.log("eval", self.step, val_loss=vl, val_ppl=math.exp(min(vl, 50)))
            # Any rank's signal stops every rank after the same step (a collective decision).
            if eng.any_rank(guard.received is not None):
                path = self.save()
                self.metrics.log("preempted", self.step, signal=int(guard.received or 0), checkpoint=str(path))
                if eng.is_writer:
                    log.warning("signal %s: checkpoint %s written at step %d; exiting to be resumed",
                                guard.received, path, self.step)
                return {**last, "preempted": 1.0}
            if self.step % t.ckpt_every == 0 or self.step == t.steps:
                self.save()
        return last


# torch's zip writer (torch.save, also inside torch.distributed.checkpoint) reports a short or
# failed write (a full disk) as a RuntimeError raised from this source file, not as an OSError.
_TORCH_ZIP_WRITER = "inline_container.cc"


def _os_error(e: BaseException, folder: Path | None = None) -> OSError | None:
    """The OSError behind a failed checkpoint write into `folder`: `e` itself, torch's zip writer
    failing (ENOSPC when the folder's file system is full), or the one a rank hit inside
    torch.distributed.checkpoint (which reports each rank's failure in a CheckpointException).
    None: not a failed write (a bug)."""
    if isinstance(e, OSError):
        return e
    if isinstance(e, RuntimeError) and _TORCH_ZIP_WRITER in str(e):
        if folder is not None and _free_bytes(folder) < (1 << 20):
            return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (torch's writer: {str(e).strip()})")
        return OSError(f"a write came up short (torch's writer: {str(e).strip()})")
    failures = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    return next((w for w in (_os_error(f, folder) for f in failures) if w is not None), None)


def _free_bytes(folder: Path) -> int:
    """Free bytes on the file system holding `folder` (or its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _engine(cfg: RunConfig, layout: Layout | None, model: TitansLM | None = None) -> Engine:
    if layout is None:
        return LocalEngine(cfg, model)
    from titans_scale.parallel.runtime import ParallelRuntime    # megatron: only for a layout
    return ParallelRuntime(cfg, layout, model)


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                disable=os.environ.get("TITANS_NO_PROGRESS") == "1")


def _update(bar, step: int, m: dict) -> None:
    rate = (f"{m['tokens_per_s']:,.0f} tok/s | MFU {100 * m['mfu']:.1f}%" if "mfu" in m
            else "step skipped (non-finite): no MFU")
    line = f"loss {m['loss']:.3f} | lr {m['lr']:.2e} | {rate} | rss {m['peak_rss_gb']:.2f} GiB"
    if "gpu_max_allocated_gb" in m:
        line += f" | gpu {m['gpu_max_allocated_gb']:.2f} GiB"
    if bar is None:
        log.info("step %d | %s", step, line)
        return
    bar.n = step
    bar.set_postfix_str(line, refresh=False)
    bar.refresh()
