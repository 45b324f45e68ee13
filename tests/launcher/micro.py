"""Shared by the launch and Slurm tests: configs/tiny.toml shrunk by overrides so a run takes
seconds on 2 cores, prepared shards, and fake srun/scontrol that record their arguments."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TITANS_NO_PROGRESS": "1"}


def micro(shards: Path, run_dir: Path, steps: int) -> list[str]:
    return ["model.d_model=32", "model.n_heads=2", 'model.layers=["swa","mag"]', "model.mem_expansion=2",
            "model.chunk_size=8", "model.window=16", "model.segment_len=16", "model.n_persistent=2",
            f"data.shard_dir={shards}", "data.max_bytes=300000", "data.seq_len=64", "data.batch_size=4",
            "optim.warmup_steps=5", f"train.steps={steps}", "train.log_every=1", f"train.eval_every={steps}",
            "train.eval_batches=2", "train.ckpt_every=50", "train.progress=false", "train.tensorboard=false",
            f"train.run_dir={run_dir}"]


def cli(*args, cwd=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "titans_scale.cli", *map(str, args)], capture_output=True,
                       text=True, env=ENV, cwd=cwd, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r


def prepare_shards(out: Path) -> Path:
    cli("prepare", "--source", "embedded", "--out", out, "--max-bytes", "300000")
    return out


def losses(run_dir: Path, kind: str = "train") -> dict[int, float]:
    p = Path(run_dir) / "metrics.jsonl"
    recs = [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []
    return {r["step"]: r["loss"] for r in recs if r["kind"] == kind}


def events(run_dir: Path, kind: str) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    recs = [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []
    return [r for r in recs if r["kind"] == kind]


FAKE_SRUN = """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_SRUN_ARGS"
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1" = show ] && [ "$2" = hostnames ]; then printf 'gpu001\\ngpu002\\ngpu003\\ngpu004\\n'; exit 0; fi
printf '%s\\0' "$@" > "$FAKE_SCONTROL_ARGS"
exit "${FAKE_SCONTROL_RC:-0}"
"""


def fake_slurm_bin(folder: Path) -> Path:
    """A folder holding fake `srun` and `scontrol` that write their argv (NUL-separated) to the
    files named by $FAKE_SRUN_ARGS / $FAKE_SCONTROL_ARGS."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        p = folder / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def read_argv(path: Path) -> list[str]:
    return Path(path).read_bytes().decode().split("\0")[:-1]
