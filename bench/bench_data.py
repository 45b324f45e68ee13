"""Data loader benchmark: time per batch of RunData.next_batch with and without packing.

A corpus of many short documents (byte tokens, 20-200 per document) is prepared once; for
each row length (2k and 16k tokens by default) and data.pack off/on, the median wall time
of next_batch over a number of batches, and the fastest one (on a shared machine the median
mostly measures the neighbours), after one first batch, which also finds the document starts
of the split (timed apart). Packing adds one searchsorted and a
scatter per batch, no loop over documents, so its cost should stay a small fraction of the
batch read however many documents a row holds.

    python bench/bench_data.py                        # writes bench/results/data.json
    python bench/bench_data.py --lengths 2048,16384 --batch 8 --docs 60000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write  # noqa: E402

from titans_scale.config import RunConfig  # noqa: E402
from titans_scale.config_io import load_config  # noqa: E402
from titans_scale.train.data import RunData  # noqa: E402


def corpus(folder: Path, docs: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "memory", "titans", "surprise", "token"]
    src = folder / "docs.jsonl"
    with open(src, "w") as f:
        for _ in range(docs):
            n = int(rng.integers(3, 30))
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=n))}) + "\n")
    return src


def measure(src: Path, shards: Path, seq_len: int, batch: int, pack: bool, repeats: int) -> dict:
    cfg = load_config(RunConfig, None, [f"data.source={src}", f"data.shard_dir={shards}", f"data.seq_len={seq_len}",
                                        f"data.batch_size={batch}", f"data.pack={str(pack).lower()}"]).validate()
    data = RunData(cfg)
    t = time.perf_counter()
    first = data.next_batch(0)                   # packing: finds the split's document starts here
    scan = time.perf_counter() - t
    ts = []
    for step in range(1, repeats + 1):
        t = time.perf_counter()
        data.next_batch(step)
        ts.append(time.perf_counter() - t)
    ts.sort()
    docs = (len(first[2]) - 1) / batch if pack else None
    return {"seq_len": seq_len, "batch": batch, "pack": pack, "ms_median": ts[len(ts) // 2] * 1e3,
            "ms_min": ts[0] * 1e3, "mtok_s_best": batch * seq_len / ts[0] / 1e6, "docs_per_row": docs,
            "first_ms": scan * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,16384")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--docs", type=int, default=60_000)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = corpus(Path(tmp), args.docs)
        rows = [measure(src, Path(tmp) / "shards", int(n), args.batch, pack, args.repeats)
                for n in args.lengths.split(",") for pack in (False, True)]
    print(table(rows, [("seq_len", "seq_len", ""), ("batch", "B", ""), ("pack", "pack", ""),
                       ("ms_median", "ms median", "{:.2f}"), ("ms_min", "ms best", "{:.2f}"),
                       ("mtok_s_best", "Mtok/s best", "{:.1f}"),
                       ("docs_per_row", "docs/row", "{:.0f}"), ("first_ms", "first batch ms", "{:.1f}")]))
    print(write("data", {"machine": machine(), "args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
