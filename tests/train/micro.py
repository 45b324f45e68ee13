"""A micro run config for the training tests: trains in seconds on 2 cores."""

from pathlib import Path

MICRO = """
[model]
d_model = 32
n_heads = 2
layers = ["swa", "mag"]
mem_expansion = 2
chunk_size = 8
window = 16
segment_len = 16
n_persistent = 2

[data]
shard_dir = "{shards}"
max_bytes = 300000
seq_len = 64
batch_size = 4

[optim]
lr = 3e-3
warmup_steps = 5

[train]
steps = 12
run_dir = "{run}"
log_every = 1
eval_every = 6
eval_batches = 2
ckpt_every = 4
progress = false
tensorboard = false
"""


def write_micro(tmp: Path, shards: Path, name: str = "run", extra: str = "") -> Path:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(MICRO.format(shards=shards, run=tmp / name) + extra)
    return cfg
