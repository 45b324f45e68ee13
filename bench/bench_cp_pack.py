"""Packed rows under context parallelism: what re-laying the documents across the group costs.

A 2-layer model (MAG + LMM, linear memory so every strategy applies) on one row of L tokens
packed with many short documents (lengths uniform in [32, 512], seeded), CP = 2 ranks per
strategy, one forward + backward step each: median step time (max over ranks) with the rows
packed (cu_seqlens) and the same rows unpacked, and the bytes each rank sent (max over ranks):
the strategy's own ("memory", "halo") and the re-layout of the documents that span shards
("documents": two all-to-alls of their activations per Block, forward and backward; the
documents inside a shard run there alone). The single process
(cp = 1) runs both as well. Every configuration runs in fresh processes of one thread each.

    python bench/bench_cp_pack.py                     # L = 2048, 8192; writes bench/results/cp_pack.json
    python bench/bench_cp_pack.py --lengths 2048 --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = dict(d_model=64, n_heads=4, mem_heads=4, mem_depth=1, layers=["mag", "lmm"], chunk_size=64, window=128,
             segment_len=128, vocab_size=256)


def documents(length: int, seed: int = 0) -> list[int]:
    import torch

    g, out = torch.Generator().manual_seed(seed), []
    while sum(out) < length:
        out.append(int(torch.randint(32, 513, (1,), generator=g)))
    out[-1] -= sum(out) - length
    return [n for n in out if n > 0]


def _rank(spec: dict) -> dict:
    """One rank (or the single process): the step times and bytes of one configuration."""
    import torch

    from titans_scale.model import ModelConfig, TitansLM
    from titans_scale.parallel.context import CPComm, apply_context_parallel, local_shard

    torch.manual_seed(0)
    cfg = ModelConfig(**MODEL)
    model = TitansLM(cfg)
    L, P = spec["length"], spec["cp"]
    tokens = torch.randint(0, cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0] + documents(L)).cumsum(0).to(torch.int32) if spec["packed"] else None
    comm = None
    if P > 1:
        comm = CPComm()
        tokens = local_shard(tokens, comm.rank, P, cfg.chunk_size)
        apply_context_parallel(model, comm, spec["strategy"])
    times = []
    for _ in range(spec["steps"]):
        model.zero_grad(set_to_none=True)
        if comm is not None:
            comm.reset_stats()
        t = time.perf_counter()
        logits, _ = model(tokens, cu_seqlens=cu)
        logits.float().square().mean().backward()
        times.append(time.perf_counter() - t)
    out = {"step_s": statistics.median(times[1:] or times)}
    if comm is not None:
        for scope in ("memory", "halo", "documents"):
            out[f"{scope}_bytes"] = comm.total_bytes(scope=scope)
    return out


def measure(spec: dict) -> dict:
    from titans_scale.parallel.launch_utils import run_distributed

    ranks = run_distributed(_rank, spec["cp"], spec, timeout_s=1800)      # one thread per rank
    return {**spec, **{k: max(r[k] for r in ranks) for k in ranks[0]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for L in map(int, args.lengths.split(",")):
        for cp, strategy in [(1, "-"), (2, "a2a"), (2, "state_passing"), (2, "ring")]:
            for packed in (False, True):
                rows.append(measure(dict(length=L, cp=cp, strategy=strategy, packed=packed, steps=args.steps,
                                         documents=len(documents(L)))))
                r = rows[-1]
                print(f"L={L:6d} cp={cp} {strategy:13s} packed={str(packed):5s} step {r['step_s'] * 1e3:8.1f} ms"
                      + "".join(f"  {s} {r.get(f'{s}_bytes', 0) / 2**20:7.2f} MiB" for s in
                                ("memory", "halo", "documents")), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cp_pack.json").write_text(json.dumps({"model": MODEL, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
