"""The machine: the peak rate MFU divides by (a GPU's dense bf16 peak by name, else the
measured matmul rate), peak memory (GPU allocations, or the host's RSS), thread and allocator
settings."""

from __future__ import annotations

import ctypes
import sys
import time

import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4      # glibc mallopt parameters (malloc.h)


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: no mmap for large blocks (M_MMAP_MAX = 0) and
    no returning the heap's top to the OS (M_TRIM_THRESHOLD = -1, "disables trimming").

    A training step allocates and frees the same large activations every step; by default
    each block above 32 MiB is a fresh mmap, so every step page-faults all of them in again
    (1.9M minor faults per step for one memory layer at 64k tokens: 6.6 s a step, 5.0 s with
    this). The cost is RSS that stays at its peak. Returns whether it applied (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))
    except (OSError, AttributeError):        # not glibc (musl, ...): keep its defaults
        return False


def host_allocator(retain: bool = True) -> str:
    """The allocator in use: "tcmalloc" (train.allocator, chosen at process start by
    titans_scale.train.allocator), "glibc", or "glibc+retain" when retain asks for
    retain_freed_memory on a CPU run (mallopt is glibc's: tcmalloc has its own heap)."""
    from titans_scale.train.allocator import loaded_allocator

    allocator = loaded_allocator()
    if allocator == "glibc" and retain and not torch.cuda.is_available() and retain_freed_memory():
        allocator = "glibc+retain"
    return allocator


def configure_host(train_cfg) -> str:
    """The run's thread count and allocator settings (train.threads, train.retain_memory);
    returns host_allocator's name for the allocator in use."""
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    return host_allocator(train_cfg.retain_memory)


def measured_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 7,
                          device: str = "cpu", seconds: float = 0.25) -> float:
    """FLOP/s of the fastest n^3 matmul on this machine, now: the peak the machine sustains,
    as MFU's denominator wants (a median let one busy moment of a shared machine halve the
    rate and double the MFU). Warmed up for ~0.1 s first, then timed over at least `repeats`
    calls and `seconds`: the first few calls of a fresh process ran 10-15% slow (thread pool
    and BLAS start-up), and 7 calls (~45 ms on 2 cores) could all fall in one busy moment."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)

    def one() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    start = time.perf_counter()
    while time.perf_counter() - start < 0.1:
        one()
    times, start = [], time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < seconds and len(times) < 200):
        times.append(one())
    return 2 * n ** 3 / min(times)


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, the vendors' data sheets; the first
# name fragment found in torch.cuda.get_device_name wins (so "H100 PCIe" before "H100").
GPU_BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))


def peak_flops(device: torch.device) -> tuple[float, str]:
    """MFU's denominator on `device` (FLOP/s) and what it is: a known GPU's dense bf16 peak,
    else the measured matmul rate (bf16 on an unknown GPU, fp32 on the CPU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in GPU_BF16_PEAK_TFLOPS:
            if fragment in name:
                return tflops * 1e12, f"{name} dense bf16 peak"
        return measured_matmul_flops(torch.bfloat16, device=str(device)), f"{name} measured bf16 matmul"
    return measured_matmul_flops(), "measured fp32 matmul"


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    """The run's peak memory so far: the host's RSS, and on CUDA the tensors' peak allocation."""
    mem = {"peak_rss_gb": peak_rss_bytes() / 2**30}
    if device.type == "cuda":
        mem["gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return mem


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
