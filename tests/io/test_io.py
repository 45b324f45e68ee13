"""titans_scale/io: a file or folder appears whole or not at all, and the checkpoint commit
moves `latest` only to a complete folder, then prunes."""

from __future__ import annotations

import stat

import pytest

from titans_scale.errors import CheckpointError
from titans_scale.io.atomic import staged_dir, write_json_atomic, write_text_atomic
from titans_scale.io.commit import LATEST, latest_checkpoint, resume_checkpoint, staged_checkpoint, step_folder
from titans_scale.io.manifest import verify_manifest


def test_write_text_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    p = tmp_path / "job.sbatch"
    p.write_text("old")
    write_text_atomic(p, "#!/bin/bash\n", chmod=0o755)
    assert p.read_text() == "#!/bin/bash\n" and p.stat().st_mode & stat.S_IXUSR
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text() == '{\n "x": 1\n}'
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a.json", "job.sbatch"]


def test_staged_dir_failure_leaves_the_old_folder_and_nothing_else(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash")
    assert not (tmp_path / "new").exists()              # not even the parent it made
    out.mkdir(parents=True)
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            raise RuntimeError("crash")
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"] and (out / "old").is_file()
    with staged_dir(out) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_checkpoint_commit_moves_latest_last_and_prunes(tmp_path):
    ck = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        with staged_checkpoint(ck, step, keep=2) as tmp:
            (tmp / "trainer.pt").write_bytes(bytes([step]) * 10)
            # `latest` still names the previous checkpoint while this one is written
            assert latest_checkpoint(ck) == (ck / step_folder(step - 1) if step > 1 else None)
    assert sorted(p.name for p in ck.iterdir()) == [LATEST, "step_00000002", "step_00000003"]
    assert latest_checkpoint(ck) == ck / "step_00000003"
    verify_manifest(ck / "step_00000003")
    with open(ck / "step_00000003" / "trainer.pt", "r+b") as f:
        f.truncate(5)
    with pytest.raises(CheckpointError, match="truncated"):
        verify_manifest(ck / "step_00000003")
    with pytest.raises(ValueError):
        with staged_checkpoint(ck, 4, keep=2):
            raise ValueError("crash mid-write")
    assert latest_checkpoint(ck) == ck / "step_00000003" and not (ck / "step_00000004").exists()


def test_resume_scans_verified_folders_and_never_silently_starts_over(tmp_path):
    """`latest` is a hint: without it the newest step_* is found; a damaged newest one falls back
    (or is refused naming the older); none verifying is refused, never step 0 (issue 22)."""
    ck = tmp_path / "checkpoints"
    assert resume_checkpoint(ck) is None                # nothing yet: a fresh start
    for step in (1, 2):
        with staged_checkpoint(ck, step, keep=2) as tmp:
            (tmp / "trainer.pt").write_bytes(bytes([step]) * 10)
    (ck / LATEST).unlink()
    assert latest_checkpoint(ck) == resume_checkpoint(ck) == ck / "step_00000002"
    (ck / "step_00000002" / "trainer.pt").write_bytes(b"x")
    assert resume_checkpoint(ck) == ck / "step_00000001"
    with pytest.raises(CheckpointError, match="truncated.*step_00000001.*resume_fallback=true"):
        resume_checkpoint(ck, fallback=False)
    (ck / "step_00000001" / "trainer.pt").write_bytes(b"y")
    with pytest.raises(CheckpointError, match="no older checkpoint verifies.*--fresh"):
        resume_checkpoint(ck)
