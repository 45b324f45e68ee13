"""Packed rows of many short documents (TitansLM.forward(cu_seqlens=...)) against the same
tokens as one stream per row: training-step tokens/s and what the per-document re-layout pads.

configs/tiny.toml's model narrowed to d_model 64 (4 heads) and two layers, MAG (swa, mag) or
MAC (seg, mac), so a 16k-token step fits a shared 2-core CPU; batch 1, fp32, 2 threads, at 2k
and 16k tokens per row; document lengths exponential with mean --mean-doc tokens (cut at the
row end). Modes: "stream" (no boundaries: the row is one sequence), "packed" (length buckets up
to the next power of two, ops/varlen.py), "packed_one" (one bucket: every document padded to
the longest). One fresh process per (variant, length) times the modes interleaved, step by
step, and reports each mode's median, so load on a shared machine hits them alike.

    python bench/bench_pack.py [--lengths 2048,16384] [--mean-doc 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import machine, parse_bench_args, peak_rss_mb, run_child, table, write  # noqa: E402

VARIANTS = {"mag": ["swa", "mag"], "mac": ["seg", "mac"]}
NARROW = ["model.d_model=64", "model.n_heads=4"]
MODES = ("stream", "packed", "packed_one")


def doc_starts(length: int, mean: float, seed: int = 0) -> list[int]:
    """Start offsets of documents with exponential lengths (>= 1) filling one row."""
    import torch

    g = torch.Generator().manual_seed(seed)
    starts, pos = [], 0
    while pos < length:
        starts.append(pos)
        pos += max(1, int(torch.empty(1).exponential_(1 / mean, generator=g)))
    return starts


def child(args: dict) -> dict:
    import statistics
    import time

    import torch
    import torch.nn.functional as F

    import titans_scale.model.titans as titans
    from titans_scale.config import load_run_config
    from titans_scale.model import TitansLM
    from titans_scale.ops.varlen import DocumentLayout, Documents
    from titans_scale.train.optim import build_optimizer

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    L = args["length"]
    layers = json.dumps(VARIANTS[args["variant"]])
    cfg = load_run_config(str(ROOT / "configs" / "tiny.toml"), [f"model.layers={layers}", *NARROW])
    model = TitansLM(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    tok = torch.randint(0, cfg.model.vocab_size, (1, L + 1))
    starts = doc_starts(L, args["mean_doc"])
    cu = torch.tensor(starts + [L], dtype=torch.int32)

    def buckets(mode: str) -> str:
        return "one" if mode == "packed_one" else "pow2"

    def step(mode: str) -> float:
        titans.Documents = functools.partial(Documents, buckets=buckets(mode))   # what the Block seam builds
        t = time.perf_counter()
        logits, _ = model(tok[:, :-1], **({} if mode == "stream" else {"cu_seqlens": cu}))
        F.cross_entropy(logits.flatten(0, 1), tok[0, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for mode in MODES:                          # warm-up: one step each
        step(mode)
    times = {mode: [] for mode in MODES}
    for _ in range(args["repeats"]):
        for mode in MODES:
            times[mode].append(step(mode))
    rows = []
    for mode in MODES:
        sec = statistics.median(times[mode])
        padded = L if mode == "stream" else DocumentLayout(cu, 1, L, buckets(mode)).padded_tokens
        rows.append({**args, "mode": mode, "documents": len(starts), "seconds": sec, "tokens_per_s": L / sec,
                     "padded_over_tokens": padded / L})
    return {"rows": rows, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--lengths", default="2048,16384")
    ap.add_argument("--mean-doc", type=float, default=64.0)
    ap.add_argument("--repeats", type=int, default=3)
    a = parse_bench_args(ap, child)
    rows = []
    for variant in a.variants.split(","):
        for L in map(int, a.lengths.split(",")):
            args = {"variant": variant, "length": L, "mean_doc": a.mean_doc, "repeats": a.repeats,
                    "threads": a.threads}
            r = run_child(__file__, args, a.timeout)
            got = r.get("rows", [{**args, "error": r.get("error", "no rows")}])
            rows += got
            for row in got:
                print(json.dumps(row), flush=True)
    print()
    print(table(rows, [("variant", "variant", ""), ("length", "tokens", "{:,}"), ("mode", "mode", ""),
                       ("documents", "docs", "{:,}"), ("padded_over_tokens", "padded/tokens", "{:.2f}"),
                       ("tokens_per_s", "tokens/s", "{:,.0f}"), ("error", "error", "")]))
    path = write("bench_pack", {"machine": machine(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
