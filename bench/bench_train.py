"""Training-step throughput of whole models: tokens/s, peak RSS and CPU MFU.

For configs/tiny.toml and configs/small.toml (issue 3), each variant (MAG, MAC, MAL, LMM with
memory in layers 2 and 4) beside a plain dense causal Transformer of the same width and
depth, at sequence lengths 1k..16k, batch 1, fp32, 2 threads. One fresh process per point.
MFU = model FLOPs (titans_scale.flops, incl. the memory update) x tokens/s / the fp32 GEMM
rate measured in the same process.

    python bench/bench_train.py [--configs small] [--lengths 1024,2048,4096,8192,16384]
                                [--set model.mem_norm=true ...]   (config overrides)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402
    growth_exponents, machine, parse_bench_args, peak_rss_mb, run_child, table, timed, write)

VARIANTS = {
    "mag": ["swa", "mag", "swa", "mag"],
    "mac": ["seg", "mac", "seg", "mac"],
    "mal": ["swa", "mal", "swa", "mal"],
    "lmm": ["swa", "lmm", "swa", "lmm"],
    "dense": ["attn", "attn", "attn", "attn"],
}


def child(args: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from titans_scale.config import load_run_config
    from titans_scale.flops import model_flops_per_token
    from titans_scale.model import TitansLM
    from titans_scale.train.hardware import host_allocator, measured_matmul_flops
    from titans_scale.train.optim import build_optimizer

    torch.set_num_threads(args["threads"])
    allocator = host_allocator()              # as the trainer: tcmalloc if run_child preloaded it, else glibc+retain
    torch.manual_seed(0)
    L = args["length"]
    layers = VARIANTS[args["variant"]]
    if len(layers) != args["n_layers"]:
        layers = (layers * args["n_layers"])[: args["n_layers"]]
    cfg = load_run_config(str(ROOT / "configs" / f"{args['config']}.toml"),
                          [*args.get("set", []), f"model.layers={json.dumps(layers)}"])
    model = TitansLM(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    tok = torch.randint(0, cfg.model.vocab_size, (1, L + 1))

    def step():
        logits, _ = model(tok[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tok[0, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = timed(step, repeats=3, warmup=2)        # the allocator's heap settles in ~3 steps
    fpt = model_flops_per_token(cfg.model, L)
    rate = measured_matmul_flops(torch.float32, n=1024)
    return {**args, "allocator": allocator, "seconds": sec, "tokens_per_s": L / sec, "peak_rss_mb": peak_rss_mb(),
            "gflop_per_token": fpt / 1e9, "mfu": fpt * L / sec / rate, "matmul_gflops_s": rate / 1e9,
            "params_m": model.num_params(False) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--set", action="append", default=[], help="a config override, e.g. model.mem_norm=true")
    a = parse_bench_args(ap, child)
    from titans_scale.config import load_run_config
    rows = []
    for conf in a.configs.split(","):
        n_layers = len(load_run_config(str(ROOT / "configs" / f"{conf}.toml")).model.layers)
        for variant in a.variants.split(","):
            for L in map(int, a.lengths.split(",")):
                r = run_child(__file__, {"config": conf, "variant": variant, "length": L, "n_layers": n_layers,
                                         "threads": a.threads, "set": a.set}, a.timeout)
                rows.append(r)
                print(json.dumps(r), flush=True)
    growth = growth_exponents(rows, ("config", "variant"), 2048, 16384)
    print()
    print(table(rows, [("config", "config", ""), ("variant", "variant", ""), ("length", "tokens", "{:,}"),
                       ("tokens_per_s", "tokens/s", "{:,.0f}"), ("mfu", "MFU", "{:.1%}"),
                       ("peak_rss_mb", "peak RSS MB", "{:,.0f}"), ("error", "error", "")]))
    for k, g in growth.items():
        print(f"{k}: step time grows as L^{g:.3f} from 2k to 16k")
    print(f"fp32 GEMM rate (1024^3, best of 7, in-run): {rows[0].get('matmul_gflops_s', float('nan')):.1f} GFLOP/s")
    path = write("bench_train", {"machine": machine(), "rows": rows, "growth_exponent": growth})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
