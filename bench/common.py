"""Shared by the benchmarks: run one measurement per fresh subprocess (so peak RSS is that
measurement's own), collect JSON, print a table, write bench/results/<name>.json."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ALLOCATOR = "auto"          # --allocator: what run_child preloads (set by parse_bench_args)


def child_env(threads: int, allocator: str | None = None) -> dict:
    """The environment of a measurement child: its thread count and, unless --allocator glibc,
    tcmalloc in LD_PRELOAD where installed (as `titans-scale train` runs on CPU, train.allocator)."""
    from titans_scale.train.allocator import find_tcmalloc, preload_env

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    allocator = allocator or ALLOCATOR
    if allocator == "glibc":
        return env
    lib = find_tcmalloc()
    if lib is None:
        if allocator == "tcmalloc":
            raise SystemExit("--allocator tcmalloc: not found (apt-get install libtcmalloc-minimal4 "
                             "or set TITANS_TCMALLOC=/path/to/libtcmalloc_minimal.so.4)")
        return env
    return preload_env(env, lib)


def run_child(script: str, args: dict, timeout: float) -> dict:
    """Run `python script --child JSON`; the child prints one JSON line last."""
    env = child_env(args.get("threads", 2))
    try:
        r = subprocess.run([sys.executable, script, "--child", json.dumps(args)], capture_output=True,
                           text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**args, "error": f"timeout after {timeout:.0f}s"}
    if r.returncode != 0:
        return {**args, "error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def parse_bench_args(ap, child_fn):
    """Add --threads/--timeout/--allocator/--child and parse; a child process (--child JSON)
    runs child_fn on its arguments, prints the JSON result and exits."""
    global ALLOCATOR
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900)
    from titans_scale.train.allocator import CHOICES

    ap.add_argument("--allocator", choices=CHOICES, default="auto",
                    help="the children's malloc: auto = tcmalloc where installed (LD_PRELOAD), else glibc")
    ap.add_argument("--child")
    a = ap.parse_args()
    ALLOCATOR = a.allocator
    if a.child:
        print(json.dumps(child_fn(json.loads(a.child))))
        raise SystemExit(0)
    return a


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int, warmup: int = 1, sync=None) -> float:
    """Median wall seconds of fn() over `repeats` runs after `warmup` runs. sync (e.g.
    torch.cuda.synchronize) waits for queued device work, so each run is timed to its end."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def machine() -> dict:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg_1m": load,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def growth_exponents(rows: list[dict], group_by: tuple[str, ...], short: int, long: int) -> dict[str, float]:
    """Per group of rows (keyed "a/b" by the values of `group_by`): the exponent g of step time
    ~ L^g between `short` and `long` tokens, where both were measured."""
    seconds: dict[str, dict[int, float]] = {}
    for r in rows:
        if "seconds" in r:
            seconds.setdefault("/".join(str(r[k]) for k in group_by), {})[r["length"]] = r["seconds"]
    return {name: math.log(pts[long] / pts[short]) / math.log(long / short)
            for name, pts in seconds.items() if short in pts and long in pts}


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """cols: (key, header, format). Missing values print as '-'."""
    head = " | ".join(h for _, h, _ in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for k, _, f in cols:
            v = r.get(k)
            cells.append("-" if v is None else (f.format(v) if f else str(v)))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps(payload, indent=1))
    return p
