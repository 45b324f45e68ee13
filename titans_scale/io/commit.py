"""The checkpoint commit, the one sequence every checkpoint writer follows:

    <ckpt_dir>/.step_N.tmp/ is written  ->  manifest.json last  ->  fsync  ->  renamed step_N/
    ->  `latest` (a file naming step_N) replaced atomically  ->  older step_* folders pruned

A crash at any moment leaves the previous checkpoint and `latest` untouched (`latest` moves only
once step_N is whole); leftovers of a crash (.step_*.tmp) are removed by the next prune.
TITANS_TEST_KILL_AT=<point>:<step> makes the process SIGKILL itself at a named point, so tests
prove it (points: save_mid, written by the caller mid-write; save_before_latest, here).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from titans_scale.errors import CheckpointError
from titans_scale.io.atomic import staged_dir, staging_path, write_text_atomic
from titans_scale.io.manifest import write_manifest

CHECKPOINTS = "checkpoints"      # <run_dir>/checkpoints/step_*/
LATEST = "latest"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_folder(step: int) -> str:
    return f"step_{step:08d}"


def kill_point(name: str, step: int) -> None:
    """Test hook: SIGKILL this process here when TITANS_TEST_KILL_AT is `<name>:<step>`."""
    if os.environ.get("TITANS_TEST_KILL_AT") == f"{name}:{step}":
        os.kill(os.getpid(), 9)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The folder `latest` names (None before the first complete checkpoint)."""
    f = ckpt_dir / LATEST
    if not f.is_file():
        return None
    name = f.read_text().strip()
    if not name or "/" in name or not (ckpt_dir / name).is_dir():
        raise CheckpointError(f"'{f}' names '{name}', which is not a checkpoint folder; "
                              "point it at an existing step_* folder or delete it to start afresh")
    return ckpt_dir / name


def commit_checkpoint(ckpt_dir: Path, name: str, keep: int) -> None:
    """Point `latest` at the complete folder `name`, then keep only the newest `keep` step_*
    folders (and never `name`) and drop crash leftovers."""
    write_text_atomic(ckpt_dir / LATEST, name)
    done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for p in done[:-keep]:
        if p.name != name:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_dir.glob(".step_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


@contextmanager
def staged_checkpoint(ckpt_dir: Path, step: int, keep: int, owner: bool = True):
    """Yields the temporary folder of checkpoint `step`; when the block returns, the whole
    commit above runs. If the block raises, nothing of this checkpoint remains.
    owner=False (the other ranks of a distributed save): the folder only, which rank 0 (the
    owner) creates and commits; the caller orders them with barriers."""
    name = step_folder(step)
    if not owner:
        yield staging_path(ckpt_dir / name)
        return
    with staged_dir(ckpt_dir / name) as tmp:
        yield tmp
        write_manifest(tmp)
    kill_point("save_before_latest", step)
    commit_checkpoint(ckpt_dir, name, keep)


__all__ = ["CHECKPOINTS", "LATEST", "checkpoint_dir", "commit_checkpoint", "kill_point", "latest_checkpoint",
           "staged_checkpoint", "step_folder"]
