"""Nothing is unpickled beyond tensors and plain values: a checkpoint carrying a pickled object
(in DCP's .metadata, in a stored value, in trainer.pt) is refused with a clear message, the
object's code never runs, and nothing is written. Each crafted payload is first shown to be
live: torch's default readers run it."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from tests.helpers import leftovers, make_run
from titans_scale import convert
from titans_scale.io.manifest import write_manifest

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Payload:
    """Unpickling this creates the file `path` (a stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.fixture()
def run(tmp_path):
    run, cfg, model, _ = make_run(tmp_path, step=1, layers=["lmm"])
    return run, run / "checkpoints" / "step_00000001"


def test_pickled_object_in_dcp_metadata_is_refused(run, tmp_path):
    run_dir, ckpt = run
    meta = ckpt / "model_optim" / ".metadata"
    meta.write_bytes(pickle.dumps(Payload(tmp_path / "ran")))
    write_manifest(ckpt)                       # an attacker can rewrite the checksums too
    with pytest.raises(convert.UnsafeCheckpointError) as e:
        convert.write_consolidated(convert.open_checkpoint(run_dir), tmp_path / "out")
    msg = str(e.value)
    assert ".metadata" in msg and "posix.mkdir" in msg and "refusing" in msg and "\n" not in msg
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists() and not leftovers(tmp_path)
    with pytest.raises(AttributeError):      # control: torch's reader runs it (then trips on the result)
        FileSystemReader(str(ckpt / "model_optim")).read_metadata()
    assert (tmp_path / "ran").exists()


def test_pickled_object_in_a_stored_value_is_refused(tmp_path):
    run_dir, cfg, model, _ = make_run(tmp_path, step=1, layers=["lmm"])
    bad = tmp_path / "bad_dcp"
    state = {"model": model.state_dict(), "optim": {"param_groups": [{"lr": Payload(tmp_path / "ran")}]}}
    dcp.save(state, checkpoint_id=str(bad))
    reader = convert.open_checkpoint(bad, cfg)
    with pytest.raises(convert.UnsafeCheckpointError, match="optim.param_groups.0.lr"):
        reader.values()
    assert not (tmp_path / "ran").exists()
    dcp.load({"optim": {"param_groups": [{"lr": None}]}}, checkpoint_id=str(bad))   # control: default planner runs it
    assert (tmp_path / "ran").exists()


def test_pickled_object_in_trainer_state_is_refused(run, tmp_path):
    run_dir, ckpt = run
    torch.save({"step": 1, "extra": Payload(tmp_path / "ran")}, ckpt / "trainer.pt")
    write_manifest(ckpt)
    with pytest.raises(convert.UnsafeCheckpointError, match="trainer.pt"):
        convert.write_consolidated(convert.open_checkpoint(run_dir), tmp_path / "out")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists() and not leftovers(tmp_path)
    torch.load(ckpt / "trainer.pt", weights_only=False)                # control
    assert (tmp_path / "ran").exists()


def test_safe_reader_drops_into_dcp_load(run, tmp_path):
    """The trainer can use the same reader/planner: a clean checkpoint loads as with torch's."""
    _, ckpt = run
    shutil.copytree(ckpt / "model_optim", tmp_path / "copy")
    ref = {"model": {"norm.weight": torch.zeros(32)}}
    got = {"model": {"norm.weight": torch.zeros(32)}}
    dcp.load(ref, checkpoint_id=str(tmp_path / "copy"))
    dcp.load(got, storage_reader=convert.SafeFileSystemReader(tmp_path / "copy"), planner=convert.SafeLoadPlanner())
    assert torch.equal(ref["model"]["norm.weight"], got["model"]["norm.weight"])
    assert not torch.equal(got["model"]["norm.weight"], torch.zeros(32))
