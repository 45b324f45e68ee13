"""The checkpoint commit, the one sequence every checkpoint writer follows:

    <ckpt_dir>/.step_N.tmp/ is written  ->  manifest.json last  ->  fsync  ->  renamed step_N/
    ->  `latest` (a file naming step_N) replaced atomically  ->  older step_* folders pruned

A crash at any moment leaves the previous checkpoint and `latest` untouched (`latest` moves only
once step_N is whole); leftovers of a crash (.step_*.tmp) are removed by the next prune. Resume
trusts the step_* folders themselves (each appeared whole), newest verified first: `latest` is a
hint for people and tools, and losing it never restarts a run from step 0.
TITANS_TEST_KILL_AT=<point>:<step> makes the process SIGKILL itself at a named point, so tests
prove it (tests/faults). The points, in the order a save passes them: save_mid (the caller, between
its files), save_before_manifest (every file written, on every rank), save_before_latest (step_N
renamed into place), save_in_latest (the pointer's temporary file written, not yet renamed),
save_before_prune (the pointer moved, older folders not yet removed).
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from titans_scale.errors import CheckpointError
from titans_scale.io.atomic import atomic_file, staged_dir, staging_path
from titans_scale.io.manifest import verify_manifest, write_manifest

CHECKPOINTS = "checkpoints"      # <run_dir>/checkpoints/step_*/
LATEST = "latest"

log = logging.getLogger(__name__)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_folder(step: int) -> str:
    return f"step_{step:08d}"


def kill_point(name: str, step: int) -> None:
    """Test hook: SIGKILL this process here when TITANS_TEST_KILL_AT is `<name>:<step>`."""
    if os.environ.get("TITANS_TEST_KILL_AT") == f"{name}:{step}":
        os.kill(os.getpid(), 9)


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Every step_* folder, newest first. Each was renamed into place whole, so the folders
    themselves are the truth; `latest` is only a hint (a crash or a user can lose it)."""
    return sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), reverse=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (None before the first one)."""
    found = checkpoints(ckpt_dir)
    return found[0] if found else None


def resume_checkpoint(ckpt_dir: Path, fallback: bool = True) -> Path | None:
    """The newest checkpoint whose manifest verifies (None when there is no checkpoint at all).
    A damaged newer one is skipped with a warning if `fallback`, else refused in one line that
    names the older good one; none verifying is refused (a run with checkpoints is never
    silently trained over from step 0)."""
    found = checkpoints(ckpt_dir)
    for i, folder in enumerate(found):
        try:
            verify_manifest(folder)
        except CheckpointError as e:
            older = next((p for p in found[i + 1:] if _verifies(p)), None)
            if older is None:
                raise CheckpointError(f"{e}; no older checkpoint verifies either: repair it, or pass --fresh "
                                      "to train from step 0 over this run") from None
            if not fallback:
                raise CheckpointError(f"{e}; the older checkpoint '{older}' verifies: resume from it with "
                                      "train.resume_fallback=true, or move the damaged one aside") from None
            log.warning("%s: resuming from the older verified checkpoint '%s'", e, older)
            return older
        return folder
    return None


def _verifies(folder: Path) -> bool:
    try:
        verify_manifest(folder)
    except CheckpointError:
        return False
    return True


def commit_checkpoint(ckpt_dir: Path, step: int, keep: int) -> None:
    """Point `latest` at the complete folder of `step`, then keep only the newest `keep` step_*
    folders (and never this one) and drop crash leftovers."""
    name = step_folder(step)
    with atomic_file(ckpt_dir / LATEST, encoding="utf-8") as f:
        f.write(name)
        kill_point("save_in_latest", step)
    kill_point("save_before_prune", step)
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
        kill_point("save_before_manifest", step)
        return
    with staged_dir(ckpt_dir / name) as tmp:
        yield tmp
        kill_point("save_before_manifest", step)
        write_manifest(tmp)
    kill_point("save_before_latest", step)
    commit_checkpoint(ckpt_dir, step, keep)


__all__ = ["CHECKPOINTS", "LATEST", "checkpoint_dir", "checkpoints", "commit_checkpoint", "kill_point",
           "latest_checkpoint", "resume_checkpoint", "staged_checkpoint", "step_folder"]
