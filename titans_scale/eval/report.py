"""Writes a sweep: JSON (every cell, chance level, streaming cost) and a length x depth heat map.

Matplotlib runs on its Agg backend (no display). Cells whose needle is within reach of the
attention are hatched in the heat map: accuracy there needs no memory.
"""

from __future__ import annotations

import json
from pathlib import Path

from titans_scale.eval.sweep import SweepResult


def write_json(result: SweepResult, path: str | Path, **extra) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**extra, **result.to_json()}, indent=1) + "\n")
    return path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def length_label(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("k", 1 << 10)):
        if n >= size and n % (size // 4) == 0:
            v = n / size
            return f"{v:g}{unit}"
    return str(n)


def heatmap(result: SweepResult, path: str | Path, title: str = "") -> Path:
    """Accuracy per (depth row, length column), chance level and attention reach in the caption."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    lengths = list(dict.fromkeys(c.length for c in result.cells))
    depths = list(dict.fromkeys(c.depth for c in result.cells))
    grid = [[result.cell(n, d).accuracy for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 0.9 * len(lengths)), 1.8 + 0.45 * len(depths)))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for i, d in enumerate(depths):
        for j, n in enumerate(lengths):
            c = result.cell(n, d)
            ax.text(j, i, f"{100 * c.accuracy:.0f}", ha="center", va="center", fontsize=9)
            if c.min_distance <= result.beyond:           # attention could see this needle
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", lw=0, alpha=0.4))
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), ["random" if d is None else f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    spec = result.spec
    what = f"{spec.suite}: {spec.answer_kind}, {spec.digits} digits, {spec.haystack} haystack"
    ax.set_title((title + "\n" if title else "") + what, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy", fraction=0.05)
    fig.text(0.01, 0.01, f"chance {100 * result.chance:.2g}%, {spec.samples} samples per cell\n"
             f"hatched: needle within {result.beyond:g} tokens (attention reach)", fontsize=7)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["write_json", "heatmap", "length_label"]
