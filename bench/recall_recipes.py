"""The recall recipes, measured: each configs/recall/<mixer>.toml trained for several seeds, then
scored on needles beyond every attention window (issue 19's acceptance; docs/long_context.md).

For every recipe x seed: `titans-scale train --config configs/recall/<m>.toml --fresh
train.seed=S train.run_dir=<out>/<m>_s<S> [overrides]`, then `titans-scale eval --suite niah
--lengths 512,1024 --depths 0,0.25,0.5,0.75,1 --samples 32`. Two at a time (one thread each).
Prints one row per run (accuracy beyond attention, per length, chance, the memory weights'
largest norm, non-finite steps, train time) and writes bench/results/recall_recipes.json.

    python bench/recall_recipes.py --recipes mac,mag,mal,lmm,seg,swa --seeds 1,2,3
    python bench/recall_recipes.py --recipes mac --seeds 1 --set model.max_lr=1.0 --tag mac_lr1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table, write  # noqa: E402

EVAL = ["--suite", "niah", "--lengths", "512,1024", "--depths", "0,0.25,0.5,0.75,1", "--samples", "32", "--no-plot"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "titans_scale.cli", *args]


def one(recipe: str, seed: int, out: Path, overrides: list[str]) -> dict:
    run = out / f"{recipe}_s{seed}"
    row = {"recipe": recipe, "seed": seed, "run_dir": str(run), "overrides": overrides}
    t0 = time.perf_counter()
    train = subprocess.run(cli("train", "--config", str(ROOT / "configs" / "recall" / f"{recipe}.toml"), "--fresh",
                               f"train.seed={seed}", f"train.run_dir={run}", "train.progress=false", *overrides),
                           capture_output=True, text=True, cwd=ROOT)
    row["train_s"] = time.perf_counter() - t0
    if train.returncode != 0:
        return {**row, "error": (train.stderr.strip().splitlines() or ["train failed"])[-1][:300]}
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "metrics.jsonl").exists() else []
    row["steps"] = max((r.get("step", 0) for r in logs), default=0)
    row["nonfinite_steps"] = sum(r.get("kind") == "skipped" for r in logs)     # the trainer logs each skipped step
    row["final_loss"] = next((r["loss"] for r in reversed(logs) if "loss" in r), None)
    row["val_loss"] = next((r["val_loss"] for r in reversed(logs) if "val_loss" in r), None)
    ev = subprocess.run(cli("eval", "--run-dir", str(run), *EVAL), capture_output=True, text=True, cwd=ROOT)
    if ev.returncode != 0:
        return {**row, "error": (ev.stderr.strip().splitlines() or ["eval failed"])[-1][:300]}
    summary = json.loads(ev.stdout.strip().splitlines()[-1])
    cells = json.loads(Path(summary["niah_json"]).read_text())["cells"]
    row.update(beyond=summary["niah_beyond_acc"], acc512=summary["niah_acc@512"],
               acc1024=summary["niah_acc@1024"], chance=summary["niah_chance"],
               mem_norm_max=max((c.get("memory_weight_norm") or 0.0) for c in cells))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="mac,mag,mal,lmm,seg,swa")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--set", action="append", default=[], help="a config override for every run (repeatable)")
    ap.add_argument("--out", default="runs/recall_sweep")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--tag", default="recall_recipes")
    a = ap.parse_args()
    out = (ROOT / a.out).resolve()
    jobs = [(r, int(s)) for r in a.recipes.split(",") for s in a.seeds.split(",")]
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = []
        for row in pool.map(lambda job: one(*job, out, a.set), jobs):
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows, [("recipe", "recipe", ""), ("seed", "seed", ""), ("beyond", "beyond attention", "{:.3f}"),
                       ("acc512", "512", "{:.3f}"), ("acc1024", "1024", "{:.3f}"), ("chance", "chance", "{:.3f}"),
                       ("mem_norm_max", "|W| max", "{:.1f}"), ("nonfinite_steps", "non-finite", ""),
                       ("final_loss", "loss", "{:.3f}"), ("train_s", "train s", "{:.0f}"), ("error", "error", "")]))
    print(write(a.tag, {"machine": machine(), "overrides": a.set, "eval": EVAL, "runs": rows}))


if __name__ == "__main__":
    main()
