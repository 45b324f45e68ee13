"""Metrics: one JSON line per event in <run_dir>/metrics.jsonl, TensorBoard scalars beside it."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:      # tensorboard is a dependency, but never fail a run for it
                self._tb = None

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        # Strict JSON: a non-finite value is written null and named under "nonfinite".
        bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            rec.update({k: None for k in bad}, nonfinite=bad)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(run_dir: str | Path, kind: str = "train") -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [r for r in map(json.loads, p.read_text().splitlines()) if r["kind"] == kind]
