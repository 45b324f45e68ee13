"""The machine's measured matmul rate, the denominator of MFU."""

from __future__ import annotations

import time

import torch


def measured_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5,
                          device: str = "cpu") -> float:
    """Median FLOP/s of an n^3 matmul on this machine, now (noisy machines: measure each run)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return 2 * n ** 3 / times[len(times) // 2]


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
