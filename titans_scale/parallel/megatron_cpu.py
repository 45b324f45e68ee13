"""CPU development mode for megatron-core 0.16.1: run its parallel code paths on gloo.

megatron-core assumes a GPU: a few of its functions allocate on ``torch.cuda.current_device()``
or ``device="cuda"``, call ``torch.cuda.synchronize()``, or keep the model-parallel RNG streams
in the CUDA generator. On a machine without CUDA every one of those calls raises, so the
tensor/sequence/pipeline-parallel layers, the pipeline schedules and dist_checkpointing cannot
be tested. ``apply_megatron_cpu_compat()`` routes exactly those calls to the CPU, and does
nothing at all when ``torch.cuda.is_available()``.

How: each listed megatron module sees, in place of its module-level name ``torch``, a view of
torch (``_CpuTorchView``) that differs from torch only in calls that would raise without
CUDA; every other attribute is the real torch object. Nothing in torch itself, nor in any other
library, is changed. The RNG helpers in ``tensor_parallel/random.py`` are swapped for CPU ones.

Every change (module paths are under ``megatron.core``):

| where | megatron calls | becomes on CPU | needed by |
| --- | --- | --- | --- |
| ``utils`` (``GlobalMemoryBuffer.get_tensor``) | ``torch.empty(device=torch.cuda.current_device())`` | CPU buffer | sequence_parallel all-gather buffer |
| ``tensor_parallel.mappings`` | ``torch.empty(device=torch.cuda.current_device())`` | CPU tensor | gather_output=True, SP gather / reduce-scatter, all_to_all |
| ``tensor_parallel.layers`` | ``torch.empty(device=torch.cuda.current_device())`` | CPU tensor | SP backward (reduce-scatter of grad input), GPU-style init (``use_cpu_initialization=False``) |
| ``tensor_parallel.utils`` | ``torch.empty(device=torch.cuda.current_device())`` | CPU tensor | split / gather of 1-D chunks (``checkpoint(..., distribute_saved_activations=True)``) |
| ``pipeline_parallel.schedules`` | ``torch.zeros([], device="cuda")`` | CPU tensor | token counter of every schedule (no-pipelining, 1F1B, interleaved) |
| ``pipeline_parallel.p2p_communication`` | ``torch.empty(device=torch.cuda.current_device())``, ``torch.cuda.synchronize()`` | CPU tensor, no-op | receive buffers and batched send/recv between stages |
| ``dist_checkpointing.strategies.filesystem_async`` | ``torch.cuda.synchronize()`` | no-op | default (torch_dist) save, sync and async |
| ``dist_checkpointing.strategies.async_utils`` | ``torch.tensor(device=torch.cuda.current_device())``, ``torch.cuda.synchronize()`` | CPU tensor, no-op | async save (``AsyncCallsQueue``): completion all-reduce |
| ``dist_checkpointing.strategies.state_dict_saver`` | ``torch.tensor(device="cuda" / current_device())`` | CPU tensor | every torch_dist save: failure broadcast in finalize; cached-plan verify all-reduce |
| ``distributed.param_and_grad_buffer`` | ``torch.zeros(device=torch.cuda.current_device())`` | CPU buffers | megatron DDP's contiguous param / grad buffers |
| ``optimizer.optimizer`` | ``torch.tensor(device='cuda')`` | CPU tensor | every mixed-precision / distributed optimizer (unit loss scale, overflow buffer) |
| ``optimizer.clip_grads`` | ``torch.zeros/tensor(device='cuda')`` | CPU tensor | grad-norm and zero-count of every megatron optimizer step |
| ``DistributedOptimizer._build_model_and_main_param_groups`` | ``param.type() == 'torch.cuda.FloatTensor'`` (else TypeError) | during the call, each parameter's ``type()`` reports the CUDA name of its dtype | building the distributed optimizer |
| ``optimizer.clip_grad_by_total_norm_fp32`` (name used by ``optimizer.optimizer``) | ``assert param.grad.type() == 'torch.cuda.FloatTensor'`` | during the call, each grad's ``type()`` reports the CUDA name | gradient clipping of the distributed optimizer |
| ``tensor_parallel.random`` (``torch``) | ``torch.cuda.manual_seed``, ``torch.cuda.get_rng_state`` | the CPU default generator | ``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker.add`` |
| ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` | ``torch.cuda.default_generators[i]`` / ``_lazy_call`` (silently deferred forever on CPU) | get / set the CPU default generator | ``CudaRNGStatesTracker.fork`` (dropout, GPU-style init), activation checkpointing |
| logger ``megatron.core.tensor_parallel.random`` | warns "CPU RNG state changed within GPU RNG context" on every fork that draws numbers | that one message filtered | on CPU the tracked generator *is* the CPU generator, so the warning is always a false alarm |

Each row was checked by undoing it alone: a test in tests/parallel/test_megatron_cpu.py (or,
for megatron's DDP / distributed optimizer rows, tests/parallel/test_parity_data_parallel.py's
DP=2 megatron run) then fails. The ``type()`` rows shadow the method on those tensor objects for
the duration of one call and remove it afterwards; torch's Tensor class is not touched.
Other ``torch.cuda`` calls (streams, events, CUDA graphs, NVTX, autocast("cuda"), TE/apex
fused kernels, fully-parallel load exchange's ``.cuda()``, the distributed optimizer's
NCCL-path state gather) are left alone: they raise
as before, which names the unsupported feature. On CPU the "device" that megatron's code sees is
``torch.device("cpu")``, and its tracked RNG streams share torch's default CPU generator (fork
swaps its state in and out, as on GPU with the CUDA generator).

Not a compat matter but met on CPU: the interleaved schedule at PP=2 with the default
``batch_p2p_comm=True`` batches a send and a receive in both directions to the same peer, and
gloo pairs them in posting order, so activations land in gradient buffers (wrong numbers, no
error). Use megatron-LM's interleaving default, ``overlap_p2p_comm=True, batch_p2p_comm=False``.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch

__all__ = ["apply_megatron_cpu_compat", "applied_changes"]

_CPU = torch.device("cpu")

# Megatron modules whose module-level ``torch`` becomes the CPU view (see the table above).
_TORCH_VIEW_MODULES = (
    "megatron.core.utils",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
)
_RANDOM_MODULE = "megatron.core.tensor_parallel.random"
_FORK_WARNING = "CPU RNG state changed within GPU RNG context"

_applied: list[str] = []


def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, an int index) to the CPU."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
        return _CPU
    return device


def _device_routed(factory):
    def routed(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    routed.__name__ = factory.__name__
    routed.__doc__ = f"torch.{factory.__name__} with CUDA devices mapped to the CPU."
    return routed


class _CpuCuda:
    """``torch.cuda`` as megatron's code sees it on CPU: the CPU is the device."""

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def synchronize(device: Any = None) -> None:
        # CPU ops are synchronous: nothing to wait for.
        return None

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CpuTorchView:
    """``torch`` as seen by one megatron module in CPU mode.

    Differs from torch only where a call would raise without CUDA: ``.cuda`` (see _CpuCuda) and
    tensor factories given a CUDA ``device=``. Every other attribute is the real torch object.
    """

    cuda = _CpuCuda()
    empty = staticmethod(_device_routed(torch.empty))
    zeros = staticmethod(_device_routed(torch.zeros))
    ones = staticmethod(_device_routed(torch.ones))
    full = staticmethod(_device_routed(torch.full))
    tensor = staticmethod(_device_routed(torch.tensor))
    empty_like = staticmethod(_device_routed(torch.empty_like))
    zeros_like = staticmethod(_device_routed(torch.zeros_like))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def __repr__(self) -> str:
        return "<torch as seen by megatron-core in CPU mode (titans_scale.parallel.megatron_cpu)>"


_TORCH_VIEW = _CpuTorchView()


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    """CPU stand-in for megatron's ``_get_cuda_rng_state``: the default CPU generator's state."""
    if graph_safe:
        raise ValueError("use_cudagraphable_rng needs CUDA; leave it False in CPU mode")
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    """CPU stand-in for megatron's ``_set_cuda_rng_state``: set the default CPU generator."""
    if graph_safe:
        raise ValueError("use_cudagraphable_rng needs CUDA; leave it False in CPU mode")
    torch.set_rng_state(new_state)


def _report_cuda_type(tensors: list[torch.Tensor]) -> None:
    """Shadow ``type()`` on these tensor objects so it names the CUDA type of their dtype
    ('torch.FloatTensor' -> 'torch.cuda.FloatTensor'); _restore_type undoes it."""
    for t in tensors:
        name = t.type()
        t.type = (lambda *args, _n=name.replace("torch.", "torch.cuda.", 1), **kwargs: _n)


def _restore_type(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t.__dict__.pop("type", None)


def _build_groups_reporting_cuda(original):
    """DistributedOptimizer._build_model_and_main_param_groups with CPU params passing its
    ``param.type() == 'torch.cuda.FloatTensor'`` dispatch (fp32 / bf16 / fp16 branches)."""

    def build(cls, gbuf_ranges, param_gbuf_map, *args, **kwargs):
        params = [p for p in param_gbuf_map if not p.is_cuda]
        _report_cuda_type(params)
        try:
            return original(cls, gbuf_ranges, param_gbuf_map, *args, **kwargs)
        finally:
            _restore_type(params)

    build.__wrapped__ = original
    return classmethod(build)


def _clip_reporting_cuda(original):
    """clip_grad_by_total_norm_fp32 with CPU grads passing its CUDA-type assertion."""

    def clip(parameters, *args, **kwargs):
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        grads = [p.grad for p in params if p.grad is not None and not p.grad.is_cuda]
        _report_cuda_type(grads)
        try:
            return original(params, *args, **kwargs)
        finally:
            _restore_type(grads)

    clip.__wrapped__ = original
    return clip


class _DropForkWarning(logging.Filter):
    """Drops the tracker's 'CPU RNG state changed' warning, a false alarm in CPU mode."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _FORK_WARNING not in record.getMessage()


def applied_changes() -> list[str]:
    """Every change made so far (by any call of apply_megatron_cpu_compat)."""
    return list(_applied)


def apply_megatron_cpu_compat() -> list[str]:
    """Route megatron-core's CUDA-only calls to the CPU (see the module docstring's table).

    Returns the changes this call made, one line each: [] when CUDA is available (nothing to
    do) or when an earlier call already applied them (idempotent).
    """
    if torch.cuda.is_available():
        return []
    changes: list[str] = []

    for name in _TORCH_VIEW_MODULES:
        module = importlib.import_module(name)
        if module.__dict__.get("torch") is not _TORCH_VIEW:
            module.torch = _TORCH_VIEW
            changes.append(f"{name}.torch -> CPU view (torch.cuda calls and device='cuda' -> cpu)")

    random = importlib.import_module(_RANDOM_MODULE)
    for attr, cpu_fn in (
        ("_get_cuda_rng_state", _get_cpu_rng_state),
        ("_set_cuda_rng_state", _set_cpu_rng_state),
    ):
        if getattr(random, attr) is not cpu_fn:
            setattr(random, attr, cpu_fn)
            changes.append(f"{_RANDOM_MODULE}.{attr} -> default CPU generator")
    from megatron.core.optimizer import distrib_optimizer, optimizer

    dist_opt = distrib_optimizer.DistributedOptimizer
    build = dist_opt.__dict__["_build_model_and_main_param_groups"]
    if not hasattr(build.__func__, "__wrapped__"):
        dist_opt._build_model_and_main_param_groups = _build_groups_reporting_cuda(build.__func__)
        changes.append("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
                       "_build_model_and_main_param_groups: CPU params report CUDA type names")
    if not hasattr(optimizer.clip_grad_by_total_norm_fp32, "__wrapped__"):
        optimizer.clip_grad_by_total_norm_fp32 = _clip_reporting_cuda(optimizer.clip_grad_by_total_norm_fp32)
        changes.append("megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32: "
                       "CPU grads report CUDA type names")

    logger = logging.getLogger(_RANDOM_MODULE)
    if not any(isinstance(f, _DropForkWarning) for f in logger.filters):
        logger.addFilter(_DropForkWarning())
        changes.append(f"logger {_RANDOM_MODULE}: filter '{_FORK_WARNING}' (false alarm on CPU)")

    _applied.extend(changes)
    return changes
