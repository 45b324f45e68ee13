"""Gather every point's final losses from its run folder into one CSV (<sweep>/results.csv).

One row per planned point, finished or not (status says which): the plan's N, D, C and
settings, then the final held-out loss (the eval at the last step) and the final training
loss (mean of the last few logged values, less noisy than one step's). A run resumed after
a kill logs some steps twice; the later line of each step wins.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from titans_scale.io.atomic import atomic_file
from titans_scale.sweep.plan import Plan, Point, load_plan
from titans_scale.sweep.run import point_status
from titans_scale.train.metrics import read_metrics

RESULTS_FILE = "results.csv"
COLUMNS = ("index", "name", "variant", "status", "d_model", "n_layers", "n_heads", "params", "params_total",
           "budget", "tokens", "flops", "flops_per_token", "steps", "lr", "final_step", "val_loss",
           "train_loss", "skipped")
TRAIN_TAIL = 3          # logged training losses averaged into train_loss


def _by_step(records: list[dict]) -> list[dict]:
    last = {r["step"]: r for r in records}
    return [last[s] for s in sorted(last)]


def loss_curve(sweep_dir: Path, p: Point, tokens_per_step: int) -> list[tuple[float, float]]:
    """(tokens seen, training loss) of one point, in step order."""
    return [(r["step"] * tokens_per_step, r["loss"]) for r in _by_step(read_metrics(sweep_dir / p.run_dir, "train"))
            if math.isfinite(r.get("loss", math.nan))]


def point_row(sweep_dir: Path, p: Point) -> dict:
    row = {k: getattr(p, k) for k in COLUMNS if hasattr(p, k)}
    row["status"] = point_status(sweep_dir, p)
    run = sweep_dir / p.run_dir
    evals = _by_step(read_metrics(run, "eval"))
    train = _by_step(read_metrics(run, "train"))
    row["final_step"] = train[-1]["step"] if train else 0
    final_eval = [r for r in evals if r["step"] == p.steps]
    row["val_loss"] = final_eval[-1]["val_loss"] if final_eval else ""
    start = p.steps - max(1, p.steps // 5)                 # the last fifth of the run
    tail = [r["loss"] for r in train if r["step"] > start and math.isfinite(r["loss"])][-TRAIN_TAIL:]
    row["train_loss"] = sum(tail) / len(tail) if tail and row["final_step"] == p.steps else ""
    return row


def collect(sweep_dir: str | Path, plan: Plan | None = None) -> tuple[Path, list[dict]]:
    """Write <sweep>/results.csv; returns (path, rows)."""
    sweep_dir = Path(sweep_dir)
    plan = plan or load_plan(sweep_dir)
    rows = [point_row(sweep_dir, p) for p in plan.points]
    path = sweep_dir / RESULTS_FILE
    with atomic_file(path, newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path, rows


def read_results(path: str | Path) -> list[dict]:
    """Rows of a results.csv with numbers parsed (empty cells become None)."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            row: dict = {}
            for k, v in r.items():
                if v == "":
                    row[k] = None
                    continue
                try:
                    row[k] = int(v)
                except ValueError:
                    try:
                        row[k] = float(v)
                    except ValueError:
                        row[k] = v
            out.append(row)
    return out
