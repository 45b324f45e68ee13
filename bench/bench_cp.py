"""Context-parallel benchmark: bytes per layer, time per step, peak memory per rank.

Part 1 (sweep): a one-layer MAG model (linear memory, so all three strategies apply) at
several sequence lengths, single process and CP = 2, 4 with a2a / state_passing / ring.
For each: bytes each rank sent for the layer in forward and backward, counted by CPComm
(max over ranks), beside the analytical formula (titans_scale/parallel/context/cost.py:
memory op + halo + the shard-length gather); time of one forward + backward step (median,
max over ranks); peak resident memory per rank.

Part 2 (big): a 4-layer MAG model (d_model 256, depth-2 memory) on one 16k-token sequence,
single process vs 4 CP ranks (a2a and ring): peak memory per rank against the single
process (the acceptance bound is 0.35x).

Part 3 (train): 4 CP ranks train a small MAG model on one 16k-token sequence (a repeated
random pattern, so the loss can fall) with AdamW, following apply_context_parallel's
contract: local loss over the global token count, gradients summed over the CP group.
Prints the global loss per step and checks the ranks' parameters stay identical.

Every configuration runs in fresh processes (launch_utils.run_distributed, one thread per
rank), so each peak is that process's own: ru_maxrss, the kernel's high-water mark of the
resident set, read in each rank after its step. glibc's mmap threshold is pinned
(--mmap-threshold, MALLOC_MMAP_THRESHOLD_, 4096 by default) so freed tensors leave the
resident set: with glibc's usual 64 KiB, tensors below it are recycled inside the heap and
the high-water mark also counts that fragmentation, which grows with the number of small
tensors (a2a's one-head shards, the ring's one-head micro-batches) rather than with live
memory: at 64 KiB the 16k run below measured 0.364 instead of 0.33. "act" is the peak above
the resident set measured once the model and its inputs exist (activations, gradients,
communication buffers); "peak" is the raw high-water mark (Python, torch, the model included).

    python bench/bench_cp.py                      # both parts, writes bench/results/cp.json
    python bench/bench_cp.py --part sweep --lengths 1024,2048
    python bench/bench_cp.py --part big --big-length 16384
    python bench/bench_cp.py --part train
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


STRATEGIES = ("a2a", "state_passing", "ring")


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(spec: dict) -> dict:
    """One rank (or the single process when spec['cp'] == 1): build, step, measure."""
    import torch

    from titans_scale.model import ModelConfig, TitansLM
    from titans_scale.parallel.context import CPComm, shard_bounds
    from titans_scale.parallel.context.apply import apply_context_parallel

    torch.manual_seed(0)
    cfg = ModelConfig(**spec["model"])
    model = TitansLM(cfg)
    L, P = spec["length"], spec["cp"]
    tokens = torch.randint(0, cfg.vocab_size, (spec["batch"], L), generator=torch.Generator().manual_seed(1))
    comm = None
    if P > 1:
        comm = CPComm()
        a, b = shard_bounds(L, P, cfg.chunk_size)[comm.rank]
        tokens = tokens[:, a:b]
        apply_context_parallel(model, comm, spec["strategy"])
    base = _rss_mb()

    def step():
        model.zero_grad(set_to_none=True)
        if comm is not None:
            comm.reset_stats()
        logits, _ = model(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()

    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    timed = times[1:] if len(times) > 1 else times
    out = {"rank": comm.rank if comm else 0, "length_local": tokens.shape[1],
           "step_s": statistics.median(timed), "base_mb": base,
           "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if comm is not None:
        out["bytes"] = {f"{s}/{p}": v for (s, p, _), v in comm.stats.items()}
        out["bytes_fwd"], out["bytes_bwd"] = comm.total_bytes("fwd"), comm.total_bytes("bwd")
    return out


def _train_worker(spec: dict) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from titans_scale.model import ModelConfig, TitansLM
    from titans_scale.parallel.context import CPComm, shard_bounds
    from titans_scale.parallel.context.apply import apply_context_parallel, cp_allreduce_grads

    torch.manual_seed(0)
    cfg = ModelConfig(**spec["model"])
    model = TitansLM(cfg)
    L = spec["length"]
    g = torch.Generator().manual_seed(1)
    pattern = torch.randint(0, cfg.vocab_size, (97,), generator=g)
    seq = pattern.repeat(L // 97 + 2)[: L + 1].unsqueeze(0)
    comm = CPComm()
    a, b = shard_bounds(L, comm.size, cfg.chunk_size)[comm.rank]
    inp, tgt = seq[:, a:b], seq[:, a + 1:b + 1]
    apply_context_parallel(model, comm, "auto")
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"])
    losses, times = [], []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        logits, _ = model(inp)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum") / L
        loss.backward()
        cp_allreduce_grads(model, comm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total, group=comm.group)
        losses.append(total.item())
        times.append(time.perf_counter() - t)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX, group=comm.group)
    return {"losses": losses, "step_s": statistics.median(times), "param_spread": (spread - flat).abs().max().item(),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


TRAIN_MODEL = dict(d_model=64, n_heads=2, mem_heads=4, layers=["swa", "mag"], mem_depth=2, mem_expansion=2,
                   chunk_size=64, window=64, segment_len=64, n_persistent=4, vocab_size=259)


def _formula(spec: dict, lengths: list[int], rank: int) -> dict:
    """Analytical bytes of one MAG layer: memory op + the window's and the conv's halos
    (window-1 and kernel-1 tokens)."""
    from titans_scale.parallel.context.cost import MemoryShape, halo_bytes, memory_bytes

    m = spec["model"]
    H = m.get("mem_heads") or m["n_heads"]
    d = m["d_model"] // H
    depth = m.get("mem_depth", 2)
    hidden = m.get("mem_expansion", 4) * d
    W = d * d if depth == 1 else 2 * d * hidden + (depth - 2) * hidden ** 2
    shape = MemoryShape(spec["batch"], H, d, d, W, ndims=12 * depth)
    mem = memory_bytes(spec["strategy"], shape, lengths, rank, micro_batches=2 * len(lengths))
    halos = [halo_bytes(n - 1, lengths, rank, m["d_model"] * 4)
             for n in (m.get("window", 128), m.get("conv_kernel", 4))]
    layers = len(m["layers"])
    return {p: (mem[p] + sum(h[p] for h in halos)) * layers for p in ("fwd", "bwd")}


def run(spec: dict) -> dict:
    from titans_scale.parallel.context import shard_bounds
    from titans_scale.parallel.launch_utils import run_distributed

    P = spec["cp"]
    try:
        ranks = run_distributed(_worker, P, spec, timeout_s=spec.get("timeout", 1800))
    except Exception as e:                                  # noqa: BLE001 - report and go on
        return {**spec, "error": str(e).splitlines()[-1][:200]}
    row = {"cp": P, "strategy": spec.get("strategy", "-") if P > 1 else "single", "length": spec["length"],
           "step_s": max(r["step_s"] for r in ranks),
           "peak_mb": max(r["peak_mb"] for r in ranks),
           "act_mb": max(r["peak_mb"] - r["base_mb"] for r in ranks),
           "ranks": ranks}
    if P > 1:
        lengths = [b - a for a, b in shard_bounds(spec["length"], P, spec["model"]["chunk_size"])]
        formula = [_formula(spec, lengths, r) for r in range(P)]
        layers = len(spec["model"]["layers"])
        row["kb_fwd"] = max(r["bytes_fwd"] for r in ranks) / layers / 1024
        row["kb_bwd"] = max(r["bytes_bwd"] for r in ranks) / layers / 1024
        row["kb_fwd_formula"] = max(f["fwd"] for f in formula) / layers / 1024
        row["kb_bwd_formula"] = max(f["bwd"] for f in formula) / layers / 1024
        row["formula_exact"] = all(r["bytes_fwd"] == f["fwd"] and r["bytes_bwd"] == f["bwd"]
                                   for r, f in zip(ranks, formula))
    return row


SWEEP_MODEL = dict(d_model=256, n_heads=4, layers=["mag"], mem_depth=1, chunk_size=64, window=128,
                   segment_len=128, n_persistent=4, vocab_size=259)
BIG_MODEL = dict(d_model=256, n_heads=4, mem_heads=4, layers=["mag"] * 4, mem_depth=2, mem_expansion=2,
                 chunk_size=64, window=128, segment_len=128, n_persistent=4, vocab_size=259)


def main() -> None:
    from common import machine, table, write

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["sweep", "big", "train", "all"], default="all")
    ap.add_argument("--lengths", default="1024,2048,4096", help="sweep sequence lengths")
    ap.add_argument("--cps", default="2,4")
    ap.add_argument("--big-length", type=int, default=16384)
    ap.add_argument("--out", default="cp", help="results file name under bench/results/")
    ap.add_argument("--mmap-threshold", type=int, default=4096,
                    help="glibc MALLOC_MMAP_THRESHOLD_ for the measured processes (see the docstring)")
    args = ap.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)      # inherited by the ranks
    results: dict = {"machine": machine(), "mmap_threshold": args.mmap_threshold}
    cols = [("cp", "cp", ""), ("strategy", "strategy", ""), ("length", "L", ""),
            ("kb_fwd", "KiB/layer fwd", "{:.1f}"), ("kb_fwd_formula", "formula", "{:.1f}"),
            ("kb_bwd", "KiB/layer bwd", "{:.1f}"), ("kb_bwd_formula", "formula", "{:.1f}"),
            ("formula_exact", "exact", ""), ("step_s", "step s", "{:.2f}"),
            ("peak_mb", "peak MB/rank", "{:.0f}"), ("act_mb", "act MB/rank", "{:.0f}")]
    if args.part in ("sweep", "all"):
        rows = []
        for L in [int(x) for x in args.lengths.split(",")]:
            base = {"model": SWEEP_MODEL, "length": L, "batch": 1, "steps": 3}
            rows.append(run({**base, "cp": 1}))
            for P in [int(x) for x in args.cps.split(",")]:
                for s in STRATEGIES:
                    rows.append(run({**base, "cp": P, "strategy": s}))
                    print(table([rows[-1]], cols).splitlines()[-1], flush=True)
        print("\nSweep: one MAG layer, d_model 256, 4 memory heads x 64, depth 1, chunk 64, window 128, batch 1")
        print(table(rows, cols))
        results["sweep"] = rows
    if args.part in ("big", "all"):
        base = {"model": BIG_MODEL, "length": args.big_length, "batch": 1, "steps": 1}
        single = run({**base, "cp": 1})
        rows = [single] + [run({**base, "cp": 4, "strategy": s}) for s in ("a2a", "ring")]
        print(f"\nBig: 4 MAG layers, d_model 256, 4 memory heads x 64, depth 2, {args.big_length} tokens, batch 1")
        print(table(rows, cols))
        results["big_ratio"] = {}
        for row in rows[1:]:
            if "error" in single or "error" in row:
                continue
            ratio, act_ratio = row["peak_mb"] / single["peak_mb"], row["act_mb"] / single["act_mb"]
            print(f"{row['strategy']}: peak memory per rank / single process {ratio:.3f} (raw high-water "
                  f"mark), {act_ratio:.3f} (above the model-built baseline); bound 0.35")
            results["big_ratio"][row["strategy"]] = {"peak": ratio, "act": act_ratio}
        results["big"] = rows
    if args.part in ("train", "all"):
        from titans_scale.parallel.launch_utils import run_distributed

        spec = {"model": TRAIN_MODEL, "length": args.big_length, "steps": 8, "lr": 3e-3}
        ranks = run_distributed(_train_worker, 4, spec, timeout_s=1800)
        losses = ranks[0]["losses"]
        print(f"\nTrain: 4 CP ranks, layers {TRAIN_MODEL['layers']}, {args.big_length} tokens, AdamW lr 3e-3")
        print("loss per step: " + ", ".join(f"{x:.3f}" for x in losses))
        print(f"step {max(r['step_s'] for r in ranks):.2f} s, parameters identical across ranks to "
              f"{max(r['param_spread'] for r in ranks):.1e}, peak {max(r['peak_mb'] for r in ranks):.0f} MB/rank")
        results["train"] = ranks
    print(f"\nwrote {write(args.out, results)}")


if __name__ == "__main__":
    main()
