"""Memory op and memory layer, forward + backward: fused and chunked vs naive, 1k to 64k tokens.

Reference shape (issue 2): d_model 256 = 4 heads x 64, depth-2 memory with expansion 4,
chunk 64, batch 1, fp32, 2 threads. Each point runs in a fresh process (peak RSS is its
own). MFU = counted matmul FLOPs / time / the fp32 matmul rate measured in the same run.
--norms off,on runs each point with the plain memory and with the normalised one
(model.mem_norm); "on/off" is the latter's tokens/s over the former's.

    python bench/bench_memory.py [--lengths 1024,4096,16384,65536] [--impls fused,chunked,naive]
                                 [--naive-max 1024] [--chunked-max 16384] [--norms off,on]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    growth_exponents, machine, parse_bench_args, peak_rss_mb, run_child, table, timed, write)

SHAPE = dict(d_model=256, n_heads=4, mem_depth=2, mem_expansion=4, chunk_size=64)


def layer_flops_per_token(cfg) -> tuple[float, float]:
    """(op, layer) forward+backward FLOPs per token: 3x the forward matmul FLOPs."""
    from titans_scale.flops import memory_update_flops_per_token
    D, Hd, H = cfg.d_model, cfg.resolved_mem_heads * cfg.mem_head_dim, cfg.resolved_mem_heads
    op = memory_update_flops_per_token(cfg)
    proj = 2 * D * 3 * Hd + 2 * D * 3 * H + 2 * D * Hd + 2 * Hd * D
    return 3 * op, 3 * (op + proj)


def child(args: dict) -> dict:
    import torch

    from titans_scale.model import ModelConfig
    from titans_scale.model.memory import NeuralMemory
    from titans_scale.ops.memory import memory_scan
    from titans_scale.train.hardware import host_allocator, measured_matmul_flops

    torch.set_num_threads(args["threads"])
    allocator = host_allocator()              # as the trainer: tcmalloc if run_child preloaded it, else glibc+retain
    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPE, mem_norm=args.get("norm") == "on")
    L, what, impl = args["length"], args["what"], args["impl"]
    layer = NeuralMemory(cfg)
    layer.impl = impl
    x = torch.randn(1, L, cfg.d_model, requires_grad=True)
    if what == "layer":
        def step():
            out, _ = layer(x)
            out.sum().backward()
    else:
        with torch.no_grad():
            (q, k, v), _ = layer.project(x, None)
            theta, eta, alpha = layer.gate_values(x)
            init = [w.unsqueeze(0).clone() for w in layer.init_weights]
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v, theta, eta, alpha)]
        w0 = [w.requires_grad_(True) for w in init]
        norm = {} if layer.ln_weight is None else {"ln_weight": layer.ln_weight, "ln_bias": layer.ln_bias}

        def step():
            y, _ = memory_scan(*leaves, w0, chunk_size=cfg.chunk_size, impl=impl, **norm)
            y.sum().backward()
    # median of 3 after 2 warm-up steps (the allocator's heap settles in about 3 steps; a
    # training run takes thousands), one step for the slow float64 reference
    sec = timed(step, 1, warmup=0) if impl == "naive" else timed(step, 3, warmup=2)
    op_f, layer_f = layer_flops_per_token(cfg)
    flops = (layer_f if what == "layer" else op_f) * L
    rate = measured_matmul_flops(torch.float32, n=1024)
    return {**args, "allocator": allocator, "seconds": sec, "tokens_per_s": L / sec, "peak_rss_mb": peak_rss_mb(),
            "gflops": flops / 1e9, "achieved_gflops_s": flops / sec / 1e9, "matmul_gflops_s": rate / 1e9,
            "mfu": flops / sec / rate}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,4096,16384,65536")
    ap.add_argument("--impls", default="fused,chunked,naive")
    ap.add_argument("--naive-max", type=int, default=1024)
    ap.add_argument("--chunked-max", type=int, default=16384, help="autograd keeps every chunk's intermediates")
    ap.add_argument("--norms", default="off,on", help="plain (off) and/or normalised (on) memory")
    a = parse_bench_args(ap, child)
    rows = []
    for what in ("op", "layer"):
        for L in map(int, a.lengths.split(",")):
            for impl in a.impls.split(","):
                if (impl == "naive" and L > a.naive_max) or (impl == "chunked" and L > a.chunked_max):
                    continue
                for norm in a.norms.split(","):
                    r = run_child(__file__, {"what": what, "impl": impl, "length": L, "norm": norm,
                                             "threads": a.threads}, a.timeout)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    plain = {(r["what"], r["impl"], r["length"]): r.get("tokens_per_s") for r in rows if r["norm"] == "off"}
    for r in rows:
        base = plain.get((r["what"], r["impl"], r["length"]))
        if r["norm"] == "on" and base and r.get("tokens_per_s"):
            r["norm_ratio"] = r["tokens_per_s"] / base
    growth = growth_exponents(rows, ("what", "impl", "norm"), 4096, 65536)
    print()
    print(table(rows, [("what", "what", ""), ("impl", "impl", ""), ("norm", "norm", ""), ("length", "tokens", "{:,}"),
                       ("tokens_per_s", "tokens/s", "{:,.0f}"), ("norm_ratio", "on/off", "{:.3f}"),
                       ("seconds", "s/step", "{:.3f}"),
                       ("peak_rss_mb", "peak RSS MB", "{:,.0f}"), ("achieved_gflops_s", "GFLOP/s", "{:.1f}"),
                       ("mfu", "MFU", "{:.1%}"), ("error", "error", "")]))
    for what, g in growth.items():
        print(f"{what}: time grows as L^{g:.3f} from 4k to 64k")
    path = write("bench_memory", {"machine": machine(), "shape": SHAPE, "rows": rows, "growth_exponent": growth})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
