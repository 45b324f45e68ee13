"""Metrics: one JSON line per event in <run_dir>/metrics.jsonl, TensorBoard scalars beside it.

A run resumed from step S replays the steps after S (a kill -9 lost them, or the newest
checkpoint was damaged): their rows are replaced, not duplicated. The logger starts by dropping
the rows of steps after S (and a line torn by the kill), and TensorBoard purges its events from
S + 1 on. A file that cannot be written (disk full, read-only) stops the run in one line.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

from titans_scale.errors import TitansError
from titans_scale.io.atomic import write_text_atomic

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        with self._writing():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_rows_after(start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1)
            except ImportError:      # tensorboard is a dependency, but never fail a run for it
                self._tb = None

    @contextmanager
    def _writing(self):
        try:
            yield
        except OSError as e:
            raise TitansError(f"cannot write '{self.path}' ({type(e).__name__}: {e}): free space or make the "
                              "run folder writable, then resume (from the last checkpoint)") from None

    def _drop_rows_after(self, step: int) -> None:
        """Keep the rows of steps <= `step` (the ones this run will not log again)."""
        if not self.path.is_file():
            return
        lines = [ln for ln in self.path.read_text().split("\n") if ln]
        keep = [ln for ln in lines if (row := _row(ln)) is not None and row["step"] <= step]
        if len(keep) < len(lines):
            write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))
            log.info("%s: %d rows after step %d dropped (those steps are trained again)",
                     self.path, len(lines) - len(keep), step)

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        # Strict JSON: a non-finite value is written null and named under "nonfinite".
        bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            rec.update({k: None for k in bad}, nonfinite=bad)
        with self._writing(), open(self.path, "a") as f:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _row(line: str) -> dict | None:
    """One row of metrics.jsonl; None for a line that is not a whole row (torn by a kill mid-write)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("step"), int) and "kind" in rec else None


def read_metrics(run_dir: str | Path, kind: str = "train") -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [r for r in map(_row, p.read_text().splitlines()) if r is not None and r["kind"] == kind]
