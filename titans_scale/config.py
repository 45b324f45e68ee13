"""The run configuration: typed dataclasses, one TOML section each (see configs/*.toml).

    cfg = load_run_config("configs/tiny.toml", ["optim.lr=1e-3", "train.steps=50"])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from titans_scale.config_io import load_config
from titans_scale.errors import ConfigError
from titans_scale.model.config import ModelConfig
from titans_scale.train.allocator import CHOICES as ALLOCATORS


@dataclass
class DataConfig:
    source: str = "embedded"          # "embedded" (Python's own sources) or .txt/.jsonl path(s), comma-separated
    tokenizer: str = "byte"           # "byte" or a local tokenizer.json
    shard_dir: str = "data_cache/embedded"
    max_bytes: int = 8_000_000        # size of the embedded corpus
    seq_len: int = 256
    batch_size: int = 8               # per data-parallel rank
    recall_fraction: float = 0.0      # share of each batch drawn from the synthetic recall task
    recall_task: str = "mqar"         # mqar | needle (pass key)
    recall_loss: str = "lm"           # lm (every token) | answers (only the answer tokens of recall rows)
    recall_digits: int = 0            # pass-key / value digits; 0 = the task's default
    recall_haystack: str = "noise"    # noise | corpus
    corpus_loss_fraction: float = 1.0  # share of corpus-row targets with loss (< 1 weights recall up)


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
    precision: str = "fp32"           # fp32 | bf16 | fp8
    max_bad_steps: int = 3            # consecutive non-finite steps before the run stops
    threads: int = 0                  # torch intra-op threads; 0 = torch's default
    retain_memory: bool = True        # CPU (glibc): keep freed memory for reuse, no page faults per step
    allocator: str = "auto"           # CPU: auto (tcmalloc when installed, else glibc + retain_memory)
                                      # | tcmalloc (required: an error if missing) | glibc (never preload)
    progress: bool = True
    tensorboard: bool = True


@dataclass
class Fp8Config:
    """FP8 recipe for train.precision = "fp8" (Transformer Engine's DelayedScaling fields)."""
    backend: str = "auto"             # auto (TE where it runs, else emulated) | te | emulated
    format: str = "hybrid"            # hybrid (e4m3 forward, e5m2 gradients) | e4m3
    scaling: str = "delayed"          # delayed | current
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"    # max | most_recent
    margin: int = 0
    include_head: bool = False        # the output head stays high precision unless asked


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int = 1                      # virtual pipeline stages per rank (interleaved 1F1B when > 1)
    sequence_parallel: bool = False
    engine: str = "megatron"          # data-parallel engine: megatron (DDP + distributed optimizer) | deepspeed
    zero_stage: int = 1               # DeepSpeed ZeRO stage (engine = deepspeed)
    cp_strategy: str = "a2a"          # a2a | state_passing | ring
    microbatches: int = 1


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "RunConfig":
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}: {msg}")
        self.model.validate()
        need(self.data.seq_len >= 1, "data.seq_len", "must be >= 1")
        need(self.data.batch_size >= 1, "data.batch_size", "must be >= 1")
        need(0.0 <= self.data.recall_fraction <= 1.0, "data.recall_fraction", "must be in [0, 1]")
        need(self.optim.lr > 0, "optim.lr", "must be > 0")
        need(self.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        need(self.train.steps >= 1, "train.steps", "must be >= 1")
        need(self.train.precision in ("fp32", "bf16", "fp8"), "train.precision",
             f"must be fp32, bf16 or fp8, got {self.train.precision!r}")
        need(self.train.ckpt_every >= 1, "train.ckpt_every", "must be >= 1")
        need(self.train.allocator in ALLOCATORS, "train.allocator",
             f"must be {', '.join(ALLOCATORS[:-1])} or {ALLOCATORS[-1]}, got {self.train.allocator!r}")
        need(self.train.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
        need(self.parallel.engine in ("megatron", "deepspeed"), "parallel.engine",
             f"must be megatron or deepspeed, got {self.parallel.engine!r}")
        need(self.parallel.cp_strategy in ("a2a", "state_passing", "ring"), "parallel.cp_strategy",
             f"must be a2a, state_passing or ring, got {self.parallel.cp_strategy!r}")
        return self


def load_run_config(path: str | None, overrides=()) -> RunConfig:
    return load_config(RunConfig, path, list(overrides)).validate()
