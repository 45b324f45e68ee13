"""Packed rows of many short documents (TitansLM.forward(cu_seqlens=...)) against the same
tokens as one stream per row: training-step tokens/s and what the per-document re-layout pads.

configs/tiny.toml's model narrowed to d_model 64 (4 heads) and two layers, MAG (swa, mag) or
MAC (seg, mac), so a 16k-token step fits a shared 2-core CPU; batch 1, fp32, 2 threads,
at 2k and 16k tokens per row; document lengths exponential with mean --mean-doc tokens (cut at
the row end). Modes: "stream" (no boundaries: the row is one sequence), "packed" (length buckets
up to the next power of two, ops/varlen.py), "packed_one" (one bucket: every document padded to
the longest). One fresh process per point.

    python bench/bench_pack.py [--lengths 2048,16384] [--mean-doc 200]
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

from common import machine, parse_bench_args, peak_rss_mb, run_child, table, timed, write  # noqa: E402

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
    import torch
    import torch.nn.functional as F

    import titans_scale.model.titans as titans
    from titans_scale.config import load_run_config
    from titans_scale.model import TitansLM
    from titans_scale.ops.varlen import DocumentLayout
    from titans_scale.train.optim import build_optimizer

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    L, mode = args["length"], args["mode"]
    layers = json.dumps(VARIANTS[args["variant"]])
    cfg = load_run_config(str(ROOT / "configs" / "tiny.toml"), [f"model.layers={layers}", *NARROW])
    model = TitansLM(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    tok = torch.randint(0, cfg.model.vocab_size, (1, L + 1))
    starts = doc_starts(L, args["mean_doc"])
    cu = torch.tensor(starts + [L], dtype=torch.int32)
    buckets = "one" if mode == "packed_one" else "pow2"
    if mode == "packed_one":        # the model's seam builds its layout with this bucketing
        titans.Documents = functools.partial(titans.Documents, buckets="one")
    kw = {} if mode == "stream" else {"cu_seqlens": cu}

    def step():
        logits, _ = model(tok[:, :-1], **kw)
        F.cross_entropy(logits.flatten(0, 1), tok[0, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = timed(step, repeats=args["repeats"], warmup=1)
    padded = DocumentLayout(cu, 1, L, buckets).padded_tokens if mode != "stream" else L
    return {**args, "documents": len(starts), "seconds": sec, "tokens_per_s": L / sec,
            "padded_over_tokens": padded / L, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--lengths", default="2048,16384")
    ap.add_argument("--mean-doc", type=float, default=200.0)
    ap.add_argument("--repeats", type=int, default=3)
    a = parse_bench_args(ap, child)
    rows = []
    for variant in a.variants.split(","):
        for L in map(int, a.lengths.split(",")):
            for mode in MODES:
                r = run_child(__file__, {"variant": variant, "length": L, "mode": mode, "mean_doc": a.mean_doc,
                                         "repeats": a.repeats, "threads": a.threads}, a.timeout)
                rows.append(r)
                print(json.dumps(r), flush=True)
    print()
    print(table(rows, [("variant", "variant", ""), ("length", "tokens", "{:,}"), ("mode", "mode", ""),
                       ("documents", "docs", "{:,}"), ("padded_over_tokens", "padded/tokens", "{:.2f}"),
                       ("tokens_per_s", "tokens/s", "{:,.0f}"), ("peak_rss_mb", "peak RSS MB", "{:,.0f}"),
                       ("error", "error", "")]))
    path = write("bench_pack", {"machine": machine(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
