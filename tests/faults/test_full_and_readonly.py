"""Full and read-only destinations: a disk that fills during a checkpoint write stops the run in
one line naming the step that was not saved (after one more try), the previous checkpoint stays
the latest and verifies, and once space is freed the run resumes to the uninterrupted losses bit
for bit; a read-only run folder, checkpoint folder or convert destination is one line and changes
nothing. Real tmpfs / read-only mounts in a user namespace (confined.py); where those are off, the
full disk is injected (enospc_run.py) and the read-only cases are skipped, saying why."""

from __future__ import annotations

import shutil

import pytest

from tests.faults import tally
from tests.faults.confined import cli_line, injected_enospc, namespaces_work, result, run_script
from tests.faults.runs import assert_same_run, refused_cleanly, train, write_run
from tests.helpers import tree_sha
from titans_scale.io.commit import LATEST
from titans_scale.io.manifest import verify_manifest

needs_namespaces = pytest.mark.skipif(not namespaces_work(), reason="user namespaces are off here (unshare -rm "
                                      "cannot mount): no real tmpfs or read-only mount without root")
TMPFS = "1200k"        # the run folder's files and one micro checkpoint (~780 KB) fit, a second does not


def _check_stopped_at_step_8(r, run, named=None) -> None:
    """`r` stopped at step 8 in one line naming `named` (the run folder as the command saw it)."""
    line = refused_cleanly(r, "step 8", f"'{(named or run) / 'checkpoints'}'", "2 tries", "step_00000004")
    assert "No space left on device" in line, line
    ck = run / "checkpoints"
    assert (ck / LATEST).read_text() == "step_00000004"
    assert sorted(p.name for p in ck.iterdir()) == [LATEST, "step_00000004"]      # no half checkpoint
    verify_manifest(ck / "step_00000004")


@needs_namespaces
def test_disk_full_mid_checkpoint_stops_in_one_line_then_resumes_exactly(tmp_path, shards, ref_run):
    ref, _ = ref_run
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    cfg = write_run(tmp_path, shards, "run")
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "run"), str(mnt / "run")))
    with tally.case(tally.FAULTS, f"disk full ({TMPFS} tmpfs) in the step-8 checkpoint, then resumed"):
        run_script([f"mount -t tmpfs -o size={TMPFS} tmpfs {mnt}",
                    cli_line(["train", "--config", cfg], out, "full"),
                    f"cp -a {mnt / 'run'} {out / 'full_run'}",
                    f"mount -o remount,size=16m {mnt}",              # space freed
                    cli_line(["train", "--config", cfg], out, "resumed"),
                    f"cp -a {mnt / 'run'} {out / 'resumed_run'}"], out)
        _check_stopped_at_step_8(result(out, "full"), out / "full_run", named=mnt / "run")
        assert result(out, "resumed").returncode == 0, result(out, "resumed").stderr[-3000:]
        assert_same_run(out / "resumed_run", ref)


@pytest.mark.slow
def test_injected_disk_full_mid_checkpoint_stops_in_one_line_then_resumes_exactly(tmp_path, shards, ref_run):
    """The seam: every write into the step-8 checkpoint fails with ENOSPC."""
    ref, _ = ref_run
    cfg, run = write_run(tmp_path, shards, "run"), tmp_path / "run"
    with tally.case(tally.FAULTS, "disk full (injected ENOSPC) in the step-8 checkpoint, then resumed"):
        _check_stopped_at_step_8(injected_enospc(["train", "--config", cfg], run, "step_00000008"), run)
        train(cfg)
        assert_same_run(run, ref)


@needs_namespaces
@pytest.mark.slow
@pytest.mark.parametrize("what", ["run folder", "checkpoint folder", "convert destination"])
def test_read_only_destination_is_one_line_and_changes_nothing(tmp_path, ref_run, what):
    ref, ref_cfg = ref_run
    run, out, dst = tmp_path / "run", tmp_path / "out", tmp_path / "dst"
    shutil.copytree(ref, run)
    dst.mkdir()
    cfg = tmp_path / "run.toml"
    cfg.write_text(ref_cfg.read_text().replace(str(ref), str(run)))
    ro, args, names = {
        "run folder": (run, ["train", "--config", cfg, "train.steps=16"], (str(run), "Read-only")),
        "checkpoint folder": (run / "checkpoints", ["train", "--config", cfg, "train.steps=16"],
                              ("step 16", "Read-only", "step_00000012")),
        "convert destination": (dst, ["convert", run / "checkpoints" / "step_00000012", dst / "c", "--to",
                                      "consolidated"], (str(dst / "c"), "Read-only")),
    }[what]
    before = tree_sha(ro), tree_sha(run / "checkpoints")
    with tally.case(tally.INPUTS, f"read-only {what}"):
        run_script([f"mount --bind {ro} {ro}", f"mount -o remount,bind,ro {ro}", cli_line(args, out, "ro")], out)
        refused_cleanly(result(out, "ro"), *names)
        assert (tree_sha(ro), tree_sha(run / "checkpoints")) == before
