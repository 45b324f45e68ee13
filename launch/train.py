#!/usr/bin/env python
"""Entry script for plain torchrun, for those who write their own torchrun lines:

    torchrun --standalone --nproc-per-node 8 launch/train.py --config configs/small.toml [key=value ...]
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node001:29500 \
        launch/train.py --config configs/small.toml parallel.tp=8 parallel.pp=2

Each rank runs `titans-scale train` with the given arguments (titans_scale.launcher.worker).
`titans-scale launch` and `titans-scale slurm submit` print and run such lines for you, with the
per-rank environment set and SIGUSR1 safe for Slurm's preemption warning (plain torchrun dies on
SIGUSR1); see docs/launch.md.
"""

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from titans_scale.launcher.worker import main

if __name__ == "__main__":
    sys.exit(record(main)(["train", *sys.argv[1:]]))
