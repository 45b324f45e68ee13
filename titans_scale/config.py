"""The run configuration: typed dataclasses, one TOML section each (see configs/*.toml).

    cfg = load_run_config("configs/tiny.toml", ["optim.lr=1e-3", "train.steps=50"])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from titans_scale.config_io import load_config, sectioned
from titans_scale.errors import ConfigError
from titans_scale.model.config import ModelConfig
from titans_scale.precision.recipe import AmaxComputeAlgo, Fp8Format, Fp8Scaling
from titans_scale.precision.select import Fp8Backend, PrecisionName

# CPU: auto (tcmalloc when installed, else glibc + retain_memory) | tcmalloc (required: an error
# if missing) | glibc (never preload); titans_scale/train/allocator.py acts on it
Allocator = Literal["auto", "tcmalloc", "glibc"]
# auto picks per memory layer (parallel/context/apply.py); the exact ones: parallel/context/shard.py
CPStrategy = Literal["auto", "a2a", "state_passing", "ring"]
# auto: CUDA when GPUs are visible, else the CPU; titans_scale/device.py resolves it
DeviceName = Literal["auto", "cpu", "cuda"]


def _need(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class DataConfig:
    source: str = "embedded"          # "embedded" (Python's own sources) or .txt/.jsonl path(s), comma-separated
    tokenizer: str = "byte"           # "byte" or a local tokenizer.json
    shard_dir: str = "data_cache/embedded"
    max_bytes: int = 8_000_000        # size of the embedded corpus
    seq_len: int = 256
    batch_size: int = 8               # per data-parallel rank
    recall_fraction: float = 0.0      # share of each batch drawn from the synthetic recall task
    recall_task: Literal["mqar", "needle"] = "mqar"          # needle: pass key
    recall_loss: Literal["lm", "answers"] = "lm"             # every token | only the answer tokens of recall rows
    recall_digits: int = 0            # pass-key / value digits; 0 = the task's default
    recall_haystack: Literal["noise", "corpus"] = "noise"
    corpus_loss_fraction: float = 1.0  # share of corpus-row targets with loss (< 1 weights recall up)
    # packed documents: next_batch also returns cu_seqlens (document starts in the flat batch) and
    # the target after a document's end carries no loss unless loss_across_docs (docs/data.md)
    pack: bool = False
    loss_across_docs: bool = False
    # [[weight, path], ...]: rows drawn from prepared data folders / Megatron dataset prefixes with
    # these weights, in place of source + shard_dir (titans_scale/data/blend.py)
    blend: list[tuple[float, str]] = field(default_factory=list)

    def validate(self) -> None:
        _need(self.seq_len >= 1, "data.seq_len", "must be >= 1")
        _need(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        _need(0.0 <= self.recall_fraction <= 1.0, "data.recall_fraction", "must be in [0, 1]")
        _need(self.recall_digits >= 0, "data.recall_digits",
              f"must be an integer >= 0 (0 = the task's default), got {self.recall_digits!r}")
        _need(0.0 < self.corpus_loss_fraction <= 1.0, "data.corpus_loss_fraction",
              f"must be in (0, 1], got {self.corpus_loss_fraction!r}")
        _need(self.pack or not self.loss_across_docs, "data.loss_across_docs",
              "applies to packed rows only; set data.pack = true or leave it false")
        for i, (weight, path) in enumerate(self.blend):
            _need(math.isfinite(weight) and weight > 0, f"data.blend[{i}]",
                  f"weight must be a number > 0, got {weight!r}")
            _need(bool(path.strip()), f"data.blend[{i}]",
                  "path is empty; give a prepared data folder or a Megatron dataset prefix")
        paths = [p for _, p in self.blend]
        dup = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
        _need(dup is None, "data.blend", f"lists '{dup}' twice; give each source once with its total weight")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1         # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0

    def validate(self) -> None:
        _need(self.lr > 0, "optim.lr", "must be > 0")
        _need(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")


@dataclass
class TrainConfig:
    steps: int = 300
    seed: int = 1234
    run_dir: str = "runs/tiny"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    precision: PrecisionName = "fp32"
    device: DeviceName = "auto"       # cuda: cuda:LOCAL_RANK under torchrun; unusable CUDA is an error
    max_bad_steps: int = 3            # consecutive non-finite steps before the run stops
    threads: int = 0                  # torch intra-op threads; 0 = torch's default
    retain_memory: bool = True        # CPU (glibc): keep freed memory for reuse, no page faults per step
    allocator: Allocator = "auto"
    progress: bool = True
    tensorboard: bool = True
    resume_fallback: bool = True      # a damaged newest checkpoint: resume from the newest verified one
    # A run folder (or one checkpoint folder) whose model weights start this run, e.g. to go on
    # training on longer rows; the step, optimizer and data start fresh. A run that has checkpoints
    # of its own resumes from those instead; under torchrun each rank loads it and keeps its shard.
    # "" = a random init.
    init_from: str = ""

    def validate(self) -> None:
        _need(self.steps >= 1, "train.steps", "must be >= 1")
        _need(self.log_every >= 1, "train.log_every", "must be >= 1 (a step count; use train.steps to log once)")
        _need(self.eval_every >= 1, "train.eval_every",
              "must be >= 1 (a step count; use train.steps to evaluate once, at the end)")
        _need(self.ckpt_every >= 1, "train.ckpt_every", "must be >= 1")
        _need(self.threads >= 0, "train.threads", "must be >= 0 (0 = torch's default)")
        _need(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")


@dataclass
class Fp8Config:
    """FP8 recipe for train.precision = "fp8" (Transformer Engine's DelayedScaling fields)."""
    backend: Fp8Backend = "auto"
    format: Fp8Format = "hybrid"
    scaling: Fp8Scaling = "delayed"
    amax_history_len: int = 1024
    amax_compute_algo: AmaxComputeAlgo = "max"
    margin: int = 0
    include_head: bool = False        # the output head stays high precision unless asked


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int = 1                      # virtual pipeline stages per rank (interleaved 1F1B when > 1)
    sequence_parallel: bool = False
    # data-parallel engine: megatron (DDP + distributed optimizer) | deepspeed
    engine: Literal["megatron", "deepspeed"] = "megatron"
    zero_stage: Literal[1, 2, 3] = 1  # DeepSpeed ZeRO stage (engine = deepspeed)
    # auto: per memory layer (MAC -> ring, else a2a when the memory heads divide over cp, else
    # state_passing for depth 1, else ring); titans_scale/parallel/context/apply.py
    cp_strategy: CPStrategy = "auto"
    microbatches: int = 1
    # process-group timeout (NCCL/gloo): long enough for rank 0 to prepare the corpus and the
    # first step to compile its kernels while the other ranks wait
    timeout_s: int = 1800


@sectioned
class RunConfig:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    fp8: Fp8Config
    parallel: ParallelConfig

    def validate(self) -> "RunConfig":
        """Range checks; the loader has checked types and choices (Literal fields)."""
        for section in (self.model, self.data, self.optim, self.train):
            section.validate()
        return self


def load_run_config(path: str | None, overrides=()) -> RunConfig:
    return load_config(RunConfig, path, list(overrides)).validate()
