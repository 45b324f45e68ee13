"""Atomic checkpoints: model + optimizer (torch.distributed.checkpoint, reshardable), and the
trainer's own state (step, scheduler, data position, RNG) as plain tensors and numbers.

Layout:  <run_dir>/checkpoints/step_00000100/{model_optim/ (DCP), trainer.pt, manifest.json}
         <run_dir>/checkpoints/latest            (name of the newest complete checkpoint)

Written and committed by io/commit.py: a temporary folder, its manifest (file sizes and SHA-256)
last, renamed into place, and only then does `latest` move. A crash at any moment leaves the
previous checkpoint and `latest` untouched; loading verifies the manifest, so a truncated or
altered file is refused with a clear message. Nothing is unpickled beyond tensors and plain
values (io/safe_load.py): a checkpoint carrying pickled objects is refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from titans_scale.errors import CheckpointError, ConvertError
from titans_scale.io.commit import checkpoint_dir, kill_point, latest_checkpoint, staged_checkpoint, step_folder
from titans_scale.io.manifest import verify_manifest
from titans_scale.io.safe_load import SafeFileSystemReader, SafeLoadPlanner, dcp_errors, safe_torch_load

# One process without a process group is a supported layout, not a mistake worth a warning.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _safe_dcp_load(state: dict, folder: Path, what: str) -> None:
    """dcp.load that never unpickles arbitrary objects (allow-listed metadata, weights_only
    values) and turns DCP's deep errors (shape or key mismatches) into one line."""
    try:
        reader = SafeFileSystemReader(folder / "model_optim")
        # Read (and refuse) .metadata here: inside dcp.load a failure is retried as per-rank
        # metadata, logged with two tracebacks and reported as "metadata is None".
        reader.read_metadata()
        with dcp_errors(f"checkpoint '{folder}' does not fit this {what}"):
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    except ConvertError as e:
        raise CheckpointError(str(e)) from None


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.dir = checkpoint_dir(run_dir)
        self.keep = keep

    def latest(self) -> Path | None:
        return latest_checkpoint(self.dir)

    def save(self, step: int, model, optimizer, trainer_state: dict) -> Path:
        with staged_checkpoint(self.dir, step, self.keep) as tmp:
            msd, osd = get_state_dict(model, optimizer)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "model_optim"))
            kill_point("save_mid", step)
            torch.save(trainer_state, tmp / "trainer.pt")
        return self.dir / step_folder(step)

    def load(self, folder: Path, model, optimizer) -> dict:
        verify_manifest(folder)
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        _safe_dcp_load(state, folder, "model/optimizer")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        try:
            return safe_torch_load(folder / "trainer.pt")
        except ConvertError as e:
            raise CheckpointError(str(e)) from None

    def load_model(self, folder: Path, model) -> None:
        """Weights only (eval, generate, export): the optimizer state is not read."""
        verify_manifest(folder)
        state = {"model": model.state_dict()}
        _safe_dcp_load(state, folder, "model")
        model.load_state_dict(state["model"])
