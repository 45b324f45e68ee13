"""The environment every rank starts with. torchrun passes its own environment to the ranks,
so `titans-scale launch` hands this to torchrun and the sbatch script exports it.

The process group backend needs no variable: init_parallel picks NCCL on CUDA and gloo on the
CPU, and each rank's CUDA device is cuda:LOCAL_RANK (titans_scale/device.py). GPU ranks get
DEVICE_ENV=cuda, so a GPU job on a node where CUDA fails stops with one line, not a CPU run.
"""

from __future__ import annotations

from titans_scale.device import DEVICE_ENV
from titans_scale.errors import ConfigError

# torchrun prefixes every line it copies to the console with this (global rank, not local),
# so the combined log of many nodes says which rank wrote each line. `${rank}` is substituted
# by torchrun itself (string.Template), never by a shell: the sbatch script single-quotes it.
LOG_PREFIX_TEMPLATE = "[rank${rank}]:"


def rank_env(gpu: bool, threads_per_rank: int = 1) -> dict[str, str]:
    """Variables for every rank of a launch (values are strings, ready for os.environ)."""
    if threads_per_rank < 1:
        raise ConfigError(f"--threads-per-rank: must be >= 1, got {threads_per_rank}")
    t = str(threads_per_rank)
    env = {
        # Ranks share the node's cores: a fixed thread count per rank avoids oversubscription
        # (torch reads OMP_NUM_THREADS at start-up; MKL's own pool too).
        "OMP_NUM_THREADS": t,
        "MKL_NUM_THREADS": t,
        # DeepSpeed otherwise probes for an accelerator and warns on CPU machines.
        "DS_ACCELERATOR": "cuda" if gpu else "cpu",
        # Output goes to per-rank files: flush each line, and no progress bar redraws.
        "PYTHONUNBUFFERED": "1",
        "TITANS_NO_PROGRESS": "1",
        "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": LOG_PREFIX_TEMPLATE,
    }
    if gpu:
        env[DEVICE_ENV] = "cuda"
        # One hardware queue per GPU: megatron's sequence parallelism needs its all-gathers
        # issued before the GEMMs that wait on them (read when CUDA creates its context).
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    return env
