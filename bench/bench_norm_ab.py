"""The normalised memory's cost (issue 19): model.mem_norm on against off, in one process.

Both models are built side by side and their training steps (forward + backward, one thread)
are timed in alternation, so a shared machine's drift hits both alike; the figure is the
median of the per-pair time ratios. Whole models of configs/small.toml (each variant, memory
in layers 2 and 4) at --length tokens, and the memory layer (NeuralMemory) alone at each of
--layer-lengths.

    python bench/bench_norm_ab.py [--length 2048] [--layer-lengths 4096,16384] [--pairs 6]

Prints a table (tokens/s on / off) and writes bench/results/bench_norm_ab.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import machine, table, write  # noqa: E402

from titans_scale.config import load_run_config  # noqa: E402
from titans_scale.model.memory import NeuralMemory  # noqa: E402
from titans_scale.model.titans import TitansLM  # noqa: E402

CONFIG = str(ROOT / "configs" / "small.toml")
VARIANTS = {"mag": "swa", "mac": "seg", "mal": "swa", "lmm": "swa"}   # memory mixer: its attention layers


def _pair(build, x, pairs: int, warmup: int = 2) -> dict:
    """build(norm) -> module whose forward(x) returns (out, state); times on/off in alternation."""
    models = {}
    for norm in (True, False):
        torch.manual_seed(0)
        models[norm] = build(norm)

    def step(m) -> float:
        t = time.perf_counter()
        out, _ = m(x)
        out.float().mean().backward()
        return time.perf_counter() - t

    for m in models.values():
        for _ in range(warmup):
            step(m)
    on, off = [], []
    for _ in range(pairs):
        on.append(step(models[True]))
        off.append(step(models[False]))
    ratio = statistics.median(a / b for a, b in zip(on, off))
    return {"on_s": statistics.median(on), "off_s": statistics.median(off), "on_over_off_time": ratio,
            "tokens_per_s_on_over_off": 1 / ratio}


def _cfg(norm: bool, layers: list[str] | None = None):
    over = [f"model.mem_norm={str(norm).lower()}"]
    if layers:
        over.append("model.layers=[" + ",".join(f'"{m}"' for m in layers) + "]")
    return load_run_config(CONFIG, over).model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--layer-lengths", default="4096,16384")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    x = torch.randint(0, 256, (1, a.length))
    for v in a.variants.split(","):
        layers = [VARIANTS[v], v, VARIANTS[v], v]
        r = _pair(lambda norm: TitansLM(_cfg(norm, layers)), x, a.pairs)
        rows.append({"what": f"small, {v}, {a.length} tokens", **r})
        print(rows[-1], flush=True)
    for n in (int(s) for s in a.layer_lengths.split(",") if s):
        xs = torch.randn(1, n, _cfg(True).d_model)
        r = _pair(lambda norm: NeuralMemory(_cfg(norm)), xs, a.pairs)
        rows.append({"what": f"memory layer, {n} tokens", **r})
        print(rows[-1], flush=True)
    print(table(rows, [("what", "what", ""), ("on_s", "norm on s", "{:.3f}"), ("off_s", "plain s", "{:.3f}"),
                       ("tokens_per_s_on_over_off", "tokens/s on / off", "{:.3f}")]))
    print(write("bench_norm_ab", {"machine": machine(), "config": CONFIG, "pairs": a.pairs, "threads": 1,
                                  "rows": rows}))


if __name__ == "__main__":
    main()
