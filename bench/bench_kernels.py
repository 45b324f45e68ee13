"""Benchmark of the memory op: time and peak memory of memory_scan forward + backward.

CPU (default when there is no GPU): the chunked PyTorch path with and without recompute,
4k to 256k tokens. Each configuration runs in a fresh subprocess that reports its peak
resident memory (VmHWM after resetting it through /proc/self/clear_refs, ru_maxrss where
that is unavailable) above the memory held once its inputs exist, so one run cannot
inherit another's peak; glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so
freed tensors leave the resident set and the peak is that of live memory. Configurations
predicted to exceed --max-gb are skipped (and listed as skipped).

CUDA: the Triton kernels (with and without recompute) against the chunked path; time,
peak allocated memory, and achieved fractions of the measured bf16 matmul rate and of
the measured memory bandwidth, from the counts in titans_scale/flops_memory.py.
--interpret runs that CUDA table on the CPU through the Triton interpreter at tiny sizes
(a smoke test of the code path; its numbers mean nothing).

Reference shape: batch 1, 4 heads x d=64, depth 2, expansion 4, chunk 64, fp32.

    python bench/bench_kernels.py                       # CPU table, writes bench/results/kernels_cpu.json
    python bench/bench_kernels.py --lengths 4096,65536  # a subset
    python bench/bench_kernels.py --device cuda         # on a GPU machine
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed  # noqa: E402
RESULTS = ROOT / "bench" / "results"
DEFAULT_LENGTHS = [4096, 16384, 65536, 262144]


@dataclass
class Shape:
    L: int
    heads: int = 4
    d: int = 64
    depth: int = 2
    expansion: int = 4
    chunk: int = 64
    batch: int = 1

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.L / self.chunk)


def auto_group(shape: Shape) -> int:
    """g ~ sqrt(chunks) balances saved states (chunks / g) against one group's recompute (g)."""
    return max(2, round(math.sqrt(shape.n_chunks)))


def make_inputs(shape: Shape, device: str, dtype):
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    B, H, L, d = shape.batch, shape.heads, shape.L, shape.d
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q = F.normalize(r(B, H, L, d), dim=-1)
    k = F.normalize(r(B, H, L, d), dim=-1)
    v = r(B, H, L, d)
    theta = torch.full((B, H, L), 0.1)
    eta = torch.full((B, H, L), 0.9)
    alpha = torch.full((B, H, L), 0.01)
    dims = [d] if shape.depth == 1 else [d, shape.expansion * d]
    dims = dims + [d]
    init = [r(B, H, dims[i], dims[i + 1]) * dims[i] ** -0.5 for i in range(shape.depth)]
    acts = [x.to(device, dtype).requires_grad_(True) for x in (q, k, v, theta, eta, alpha)]
    return acts, [w.to(device).requires_grad_(True) for w in init]


def fwd_bwd(acts, init, shape: Shape, impl: str, group):
    from titans_scale.ops.memory import memory_scan
    y, state = memory_scan(*acts, init, chunk_size=shape.chunk, impl=impl, recompute_group=group)
    loss = y.float().square().mean() + sum(w.square().mean() for w in state.weights)
    loss.backward()


# ---- CPU: one configuration per subprocess -------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")    # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def worker(shape: Shape, group: int | None, threads: int) -> dict:
    """Runs in its own process: one forward + backward of the chunked path."""
    import torch
    torch.set_num_threads(threads)
    # warm-up on a short sequence (same code paths, checkpointing included): the first call
    # pages in hundreds of MB of library code, which is not the op's memory
    small = Shape(**{**asdict(shape), "L": 8 * shape.chunk})
    fwd_bwd(*make_inputs(small, "cpu", torch.float32), small, "chunked", 2 if group else None)
    acts, init = make_inputs(shape, "cpu", torch.float32)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)           # hand freed setup memory back first
    except OSError:
        pass
    base_kb = _status_kb("VmRSS")
    exact = _reset_peak()
    t0 = time.perf_counter()
    fwd_bwd(acts, init, shape, "chunked", group)
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(seconds=seconds, peak_rss_bytes=peak_kb * 1024, base_rss_bytes=base_kb * 1024,
                peak_over_inputs_bytes=(peak_kb - base_kb) * 1024, peak_exact=exact)


def run_worker_subprocess(shape: Shape, group: int | None, threads: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(shape)),
           "--group", str(group or 0), "--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(threads),
           # a fixed mmap threshold: glibc's dynamic one keeps freed blocks of the op's
           # tensors resident, so RSS would measure allocator caching instead of live memory
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed for L={shape.L} group={group}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_cpu(lengths, max_gb: float, threads: int, timeout: float) -> list[dict]:
    rows, last_plain = [], None
    for L in lengths:
        shape = Shape(L=L)
        for group in (None, auto_group(shape)):
            row = dict(L=L, impl="chunked", recompute_group=group or 0)
            predicted = None
            if group is None and last_plain is not None:   # activation memory is linear in L
                predicted = last_plain["peak_over_inputs_bytes"] * L / last_plain["L"]
            if predicted is not None and predicted > max_gb * 2**30:
                row.update(skipped=f"predicted {predicted / 2**30:.1f} GiB > --max-gb {max_gb}")
            else:
                row.update(run_worker_subprocess(shape, group, threads, timeout))
                if group is None:
                    last_plain = row
            rows.append(row)
            print(_fmt_cpu(row), flush=True)
    return rows


def _fmt_cpu(r: dict) -> str:
    head = f"{r['L']:>8} {('g=' + str(r['recompute_group'])) if r['recompute_group'] else 'off':>6}"
    if "skipped" in r:
        return f"{head}   skipped: {r['skipped']}"
    return (f"{head} {r['seconds']:>9.2f} {r['peak_over_inputs_bytes'] / 2**20:>12.1f} "
            f"{r['peak_rss_bytes'] / 2**20:>10.1f}")


def print_cpu_table(rows: list[dict]) -> None:
    print(f"{'tokens':>8} {'recomp':>6} {'fwd+bwd s':>9} {'peak-in MiB':>12} {'RSS MiB':>10}")
    for r in rows:
        print(_fmt_cpu(r))
    by_len = {}
    for r in rows:
        if "skipped" not in r:
            by_len.setdefault(r["L"], {})[bool(r["recompute_group"])] = r["peak_over_inputs_bytes"]
    for L, m in by_len.items():
        if True in m and False in m:
            print(f"  {L} tokens: recompute lowers peak memory above the inputs {m[False] / max(m[True], 1):.1f}x")


# ---- CUDA (or the interpreter): kernels vs chunked ----------------------------------------

def _timer(device: str):
    """timed(fn, reps): the median seconds of fn() after one warm-up run (which compiles the kernels)."""
    import torch
    sync = torch.cuda.synchronize if device == "cuda" else None
    return lambda fn, reps: timed(fn, reps, sync=sync)


def measure_peaks(device: str) -> dict:
    """The measured bf16 matmul rate (FLOP/s) and copy bandwidth (B/s) of this device."""
    import torch
    timed = _timer(device)
    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t_mm = timed(lambda: a @ b, 5)
    size = 2**30 if device == "cuda" else 2**26
    x = torch.empty(size // 4, device=device)
    y = torch.empty_like(x)
    t_cp = timed(lambda: y.copy_(x), 5)
    return dict(bf16_matmul_flops=2 * n**3 / t_mm, copy_bytes_per_s=2 * size / t_cp)


def bench_device(lengths, device: str, reps: int) -> tuple[list[dict], dict]:
    import torch
    from titans_scale.flops_memory import scan_cost
    timed = _timer(device)
    peaks = measure_peaks(device)
    rows = []
    for L in lengths:
        shape = Shape(L=L)
        for dtype in (torch.float32, torch.bfloat16):
            acts, init = make_inputs(shape, device, dtype)
            for impl, group in (("triton", None), ("triton", auto_group(shape)), ("chunked", None)):
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds = timed(lambda: fwd_bwd(acts, init, shape, impl, group), reps)
                cost = scan_cost(L, shape.chunk, shape.d, shape.heads, shape.batch, shape.depth,
                                 shape.expansion, in_bytes=acts[0].element_size(), recompute_group=group)
                row = dict(L=L, dtype=str(dtype).replace("torch.", ""), impl=impl, recompute_group=group or 0,
                           seconds=seconds, flops=cost.flops, bytes=cost.bytes,
                           tflops=cost.flops / seconds / 1e12, gbps=cost.bytes / seconds / 1e9,
                           frac_matmul=cost.flops / seconds / peaks["bf16_matmul_flops"],
                           frac_bandwidth=cost.bytes / seconds / peaks["copy_bytes_per_s"])
                if device == "cuda":
                    row["peak_alloc_bytes"] = torch.cuda.max_memory_allocated()
                rows.append(row)
                print(_fmt_dev(row), flush=True)
    return rows, peaks


def _fmt_dev(r: dict) -> str:
    mem = f"{r['peak_alloc_bytes'] / 2**20:>9.0f}" if "peak_alloc_bytes" in r else f"{'-':>9}"
    g = f"g={r['recompute_group']}" if r["recompute_group"] else "off"
    return (f"{r['L']:>8} {r['dtype']:>8} {r['impl']:>8} {g:>6} {r['seconds'] * 1e3:>10.2f} "
            f"{r['tflops']:>8.3f} {r['frac_matmul']:>7.1%} {r['gbps']:>8.1f} {r['frac_bandwidth']:>7.1%} {mem}")


def print_device_table(rows, peaks) -> None:
    print(f"measured: bf16 matmul {peaks['bf16_matmul_flops'] / 1e12:.2f} TFLOP/s, "
          f"copy bandwidth {peaks['copy_bytes_per_s'] / 1e9:.1f} GB/s")
    print(f"{'tokens':>8} {'dtype':>8} {'impl':>8} {'recomp':>6} {'ms':>10} {'TFLOP/s':>8} {'%mm':>7} "
          f"{'GB/s':>8} {'%bw':>7} {'peak MiB':>9}")
    for r in rows:
        print(_fmt_dev(r))


# ---- entry point ---------------------------------------------------------------------------

def _meta(device: str, threads: int) -> dict:
    import torch
    return dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), device=device, torch=torch.__version__,
                machine=platform.machine(), cpus=os.cpu_count(), threads=threads,
                gpu=torch.cuda.get_device_name() if device == "cuda" else None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--interpret", action="store_true", help="the kernel table on the CPU via TRITON_INTERPRET")
    p.add_argument("--lengths", default=None, help="comma-separated token counts")
    p.add_argument("--max-gb", type=float, default=14.0, help="skip CPU runs predicted to need more")
    # CPU: 1 thread by default; the per-chunk ops are small, and on a shared machine OpenMP
    # barriers wait on descheduled threads (measured: a 65k-element mul took 10 ms on 2 threads)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU default 1)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/kernels_<device>.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--group", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.threads is None:
        a.threads = 1 if (a.worker or a.device != "cuda") else min(os.cpu_count() or 1, 16)
    if a.worker:                                          # a subprocess of the CPU benchmark
        print(json.dumps(worker(Shape(**json.loads(a.worker)), a.group or None, a.threads)))
        return
    if a.interpret:
        os.environ["TRITON_INTERPRET"] = "1"              # before triton is imported
    import torch
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    lengths = [int(x) for x in a.lengths.split(",")] if a.lengths else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.interpret or device == "cuda":
        if a.interpret:
            lengths, device = lengths or [256], "cpu"
        rows, peaks = bench_device(lengths or DEFAULT_LENGTHS, device, a.reps)
        print_device_table(rows, peaks)
        result = dict(meta=_meta(device, a.threads), shape=asdict(Shape(L=0)), peaks=peaks, rows=rows,
                      interpreted=a.interpret)
        name = "kernels_interpret.json" if a.interpret else "kernels_cuda.json"
    else:
        rows = bench_cpu(lengths or DEFAULT_LENGTHS, a.max_gb, a.threads, a.timeout)
        print_cpu_table(rows)
        result = dict(meta=_meta("cpu", a.threads), shape=asdict(Shape(L=0)), rows=rows)
        name = "kernels_cpu.json"
    out = Path(a.out) if a.out else RESULTS / name
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
