"""Several evaluated runs side by side: a Markdown table, accuracy vs needle distance, loss curves.

    python -m titans_scale.eval.compare runs/recall/* --suite niah --out docs/img

Reads each run's metrics.jsonl, config.toml and eval/<suite>.json (written by
`titans-scale eval`), prints the table and writes <out>/<prefix>_distance.png and
<out>/<prefix>_loss.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from titans_scale.errors import DataError


@dataclass
class EvaluatedRun:
    name: str
    layers: list[str]
    steps: int
    train_seconds: float
    final_loss: float
    val_loss: float | None
    sweep: dict                        # the eval JSON

    @property
    def memory(self) -> bool:
        from titans_scale.model.config import MEMORY_MIXERS
        return any(m in MEMORY_MIXERS for m in self.layers)

    def beyond_cells(self, distance: float) -> list[dict]:
        """Cells whose every needle is more than `distance` tokens from its answer."""
        return [c for c in self.sweep["cells"] if c["min_distance"] > distance]


def common_beyond(runs: list[EvaluatedRun]) -> float:
    """One threshold for all runs: beyond the attention of every model compared."""
    return max(float("inf") if r.sweep["beyond_distance"] is None else r.sweep["beyond_distance"] for r in runs)


def _records(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []


def summarize(run: str | Path, suite: str = "niah") -> EvaluatedRun:
    run = Path(run)
    sweep_path, cfg_path = run / "eval" / f"{suite}.json", run / "config.toml"
    for p, fix in ((cfg_path, "is it a training run folder?"),
                   (sweep_path, f"run `titans-scale eval --run-dir {run} --suite {suite}` first")):
        if not p.is_file():
            raise DataError(f"run '{run}': no {p.name}; {fix}")
    cfg = tomllib.loads(cfg_path.read_text())
    recs = _records(run)
    train = [r for r in recs if r["kind"] == "train"]
    start = next((r["time"] for r in recs if r["kind"] == "start"), None)
    evals = [r for r in recs if r["kind"] == "eval"]
    return EvaluatedRun(run.name, list(cfg["model"]["layers"]), train[-1]["step"] if train else 0,
                      (train[-1]["time"] - start) if train and start else float("nan"),
                      train[-1]["loss"] if train else float("nan"),
                      evals[-1]["val_loss"] if evals else None, json.loads(sweep_path.read_text()))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown_table(runs: list[EvaluatedRun]) -> str:
    """Accuracy pooled over the cells beyond every compared model's attention (same cells for all)."""
    far = common_beyond(runs)
    rows = [f"| run | layers | memory | steps | train time | val loss | accuracy, needle > {far:g} tokens back "
            "| all cells | chance |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        beyond = r.beyond_cells(far)
        n = sum(c["answers"] for c in beyond)
        acc = sum(c["correct"] for c in beyond) / n if n else None
        every = sum(c["correct"] for c in r.sweep["cells"]) / max(1, sum(c["answers"] for c in r.sweep["cells"]))
        rows.append(f"| {r.name} | {', '.join(r.layers)} | {'yes' if r.memory else 'no'} | {r.steps} | "
                    f"{r.train_seconds / 60:.1f} min | {'n/a' if r.val_loss is None else f'{r.val_loss:.3f}'} | "
                    f"{_pct(acc)} (n={n}) | {_pct(every)} | {_pct(r.sweep['chance'])} |")
    return "\n".join(rows)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_distance(runs: list[EvaluatedRun], path: Path) -> Path:
    """Accuracy against the needle's distance from its question, one line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for r in runs:
        cells = sorted(r.sweep["cells"], key=lambda c: c["mean_distance"])
        ax.plot([c["mean_distance"] for c in cells], [c["accuracy"] for c in cells], "o-" if r.memory else "s--",
                label=f"{r.name} ({'/'.join(r.layers)})", ms=4)
    reach = common_beyond(runs)
    ax.axvline(reach, color="grey", lw=1, ls=":")
    ax.text(reach, 1.02, " attention reach", fontsize=7, color="grey", va="bottom")
    ax.axhline(runs[0].sweep["chance"], color="grey", lw=1)
    ax.text(ax.get_xlim()[1], runs[0].sweep["chance"], "chance ", fontsize=7, color="grey", ha="right", va="bottom")
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.08)
    ax.set_xlabel("tokens between the needle and the question's answer")
    ax.set_ylabel("exact-match accuracy")
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ema(xs: list[float], keep: float = 0.8) -> list[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else keep * m + (1 - keep) * x
        out.append(m)
    return out


def plot_losses(runs: list[EvaluatedRun], run_dirs: list[Path], path: Path) -> Path:
    """Training loss (corpus + recall answers, smoothed) per step, one line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for r, d in zip(runs, run_dirs):
        train = [x for x in _records(d) if x["kind"] == "train"]
        ax.plot([x["step"] for x in train], _ema([x["loss"] for x in train]), "-" if r.memory else "--",
                label=f"{r.name} ({'/'.join(r.layers)})", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m titans_scale.eval.compare", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="evaluated run folders")
    p.add_argument("--suite", default="niah", choices=["niah", "recall"])
    p.add_argument("--out", default=None, help="folder for the plots (none: table only)")
    p.add_argument("--prefix", default="recall")
    args = p.parse_args(argv)
    try:
        dirs = [Path(r) for r in args.runs]
        runs = [summarize(d, args.suite) for d in dirs]
    except DataError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(runs))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        print(plot_distance(runs, out / f"{args.prefix}_distance.png"), file=sys.stderr)
        print(plot_losses(runs, dirs, out / f"{args.prefix}_loss.png"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
