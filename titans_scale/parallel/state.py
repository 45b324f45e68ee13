"""Start and stop torch.distributed plus megatron-core's model-parallel groups.

``init_parallel(tp, pp, cp, vpp)`` is the one entry point every parallel layout goes through:
it joins the default process group (torchrun's env:// unless told otherwise) on the run's
device (titans_scale.device: NCCL on cuda:LOCAL_RANK; gloo and the CPU development mode,
titans_scale.parallel.megatron_cpu, only when the device is the CPU), builds
megatron's tensor / pipeline / context / data-parallel groups and seeds its RNG streams.
``destroy_parallel()`` undoes it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from titans_scale.device import resolve_device
from titans_scale.errors import ConfigError
from titans_scale.parallel.megatron_cpu import apply_megatron_cpu_compat

__all__ = ["ParallelConfigError", "ParallelInfo", "destroy_parallel", "init_parallel"]

_ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_we_started_dist = False


class ParallelConfigError(ConfigError):
    """A parallel layout that cannot be built (bad sizes, missing launcher environment).
    A ConfigError (so a ValueError): the CLI prints its one line instead of a traceback."""


@dataclass(frozen=True)
class ParallelInfo:
    """The layout this rank ended up in (sizes and this rank's coordinates)."""

    world_size: int
    rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    vpp: int | None
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    backend: str
    cpu_mode: bool
    cpu_compat_changes: list[str] = field(default_factory=list)


def _check_size(name: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ParallelConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _init_process_group(
    backend: str, rank: int | None, world_size: int | None, init_method: str | None, device: torch.device,
    timeout_s: int,
) -> None:
    global _we_started_dist
    if (rank is None) != (world_size is None):
        raise ParallelConfigError("init_parallel: give both rank and world_size, or neither")
    if rank is None and init_method is None:
        missing = [k for k in _ENV_KEYS if k not in os.environ]
        if missing:
            raise ParallelConfigError(
                f"init_parallel: environment lacks {', '.join(missing)}; launch with torchrun "
                "or pass rank=, world_size= and init_method="
            )
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=-1 if rank is None else rank,
        world_size=-1 if world_size is None else world_size,
        timeout=timedelta(seconds=timeout_s),
        # binds NCCL's communicators to this rank's GPU (no guessing from the current device)
        device_id=device if device.type == "cuda" else None,
    )
    _we_started_dist = True


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    vpp: int | None = None,
    backend: str | None = None,
    seed: int = 1234,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    device: torch.device | None = None,
    timeout_s: int = 1800,
) -> ParallelInfo:
    """Join (or reuse) the default process group and build megatron's parallel groups.

    tp, pp, cp: tensor-, pipeline- and context-parallel sizes; data parallel gets the rest of
    the world (world_size / (tp * pp * cp)). vpp: virtual pipeline stages per rank (interleaved
    1F1B), None for plain 1F1B. device: this rank's (titans_scale.device.resolve_device; by
    default its answer for train.device='auto'). timeout_s: the process group's collective
    timeout (parallel.timeout_s). backend: "nccl" on CUDA, "gloo" on the CPU, by default.
    seed: Python, NumPy and torch's default generator get ``seed`` on every rank (the
    data-parallel stream); megatron's tracker adds its model-parallel stream (seed + 2718 +
    tp_rank) and expert stream through ``model_parallel_cuda_manual_seed``.
    rank / world_size / init_method: used only when no process group exists yet and the
    torchrun environment variables are absent.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    tp, pp, cp = _check_size("tp", tp), _check_size("pp", pp), _check_size("cp", cp)
    if vpp is not None:
        _check_size("vpp", vpp, minimum=2)
        if pp < 2:
            raise ParallelConfigError(f"vpp={vpp} needs pp >= 2 (it interleaves stages), got pp={pp}")
    device = device or resolve_device()     # CUDA asked for but unusable raises: never a silent gloo run
    cpu_mode = device.type == "cpu"
    if backend is None:
        backend = "gloo" if cpu_mode else "nccl"
    if not cpu_mode:
        torch.cuda.set_device(device)

    if not dist.is_initialized():
        _init_process_group(backend, rank, world_size, init_method, device, timeout_s)
    backend = str(dist.get_backend())
    world = dist.get_world_size()
    if world % (tp * pp * cp) != 0:
        raise ParallelConfigError(
            f"world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}; change the layout"
        )
    changes = apply_megatron_cpu_compat() if cpu_mode else []

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
    )

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # Seeds megatron's tracker; in CPU mode its streams live on the CPU generator (the compat),
    # and this call re-seeds the default generator with `seed`, as torch.manual_seed did.
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)

    return ParallelInfo(
        world_size=world,
        rank=dist.get_rank(),
        tp=tp,
        pp=pp,
        cp=cp,
        dp=parallel_state.get_data_parallel_world_size(),
        vpp=vpp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        backend=backend,
        cpu_mode=cpu_mode,
        cpu_compat_changes=changes,
    )


def destroy_parallel() -> None:
    """Drop megatron's groups, and the default process group if init_parallel created it."""
    global _we_started_dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if _we_started_dist and dist.is_initialized():
        dist.destroy_process_group()
    _we_started_dist = False
