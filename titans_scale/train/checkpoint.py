"""Atomic checkpoints: model + optimizer (torch.distributed.checkpoint, reshardable), and the
trainer's own state (step, scheduler, data position, RNG) as plain tensors and numbers.

Layout:  <run_dir>/checkpoints/step_00000100/{model_optim/ (DCP), trainer.pt, manifest.json}
         <run_dir>/checkpoints/latest            (name of the newest complete checkpoint)

A checkpoint is written into a temporary folder, its manifest (file sizes and SHA-256) last,
then renamed into place, and only then does `latest` move (os.replace). A crash at any
moment leaves the previous checkpoint and `latest` untouched; loading verifies the manifest,
so a truncated or altered file is refused with a clear message. Nothing is unpickled beyond
tensors and plain values (convert/safe_load.py): a checkpoint carrying pickled objects is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from titans_scale.convert.errors import ConvertError
from titans_scale.convert.safe_load import SafeFileSystemReader, SafeLoadPlanner, dcp_errors, safe_torch_load
from titans_scale.errors import CheckpointError

FORMAT_VERSION = 1
# One process without a process group is a supported layout, not a mistake worth a warning.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
LATEST = "latest"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _kill_point(name: str, step: int) -> None:
    """Test hook: TITANS_TEST_KILL_AT=<name>:<step> makes the process SIGKILL itself here, so
    tests can prove that a crash mid-write never damages the last good checkpoint."""
    if os.environ.get("TITANS_TEST_KILL_AT") == f"{name}:{step}":
        os.kill(os.getpid(), 9)


def write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=1))
    os.replace(tmp, folder / "manifest.json")


def verify_manifest(folder: Path) -> None:
    man = folder / "manifest.json"
    if not man.is_file():
        raise CheckpointError(f"checkpoint '{folder}' has no manifest.json: it was never completed; "
                              "resume from an earlier checkpoint or start afresh")
    try:
        files = json.loads(man.read_text())["files"]
    except (ValueError, KeyError):
        raise CheckpointError(f"checkpoint '{folder}': manifest.json is corrupt") from None
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint '{folder}' is missing '{rel}'")
        if p.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"checkpoint '{folder}': '{rel}' is truncated "
                                  f"({p.stat().st_size} of {meta['bytes']} bytes)")
        if file_sha256(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint '{folder}': '{rel}' does not match its checksum (corrupt)")


def _safe_dcp_load(state: dict, folder: Path, what: str) -> None:
    """dcp.load that never unpickles arbitrary objects (allow-listed metadata, weights_only
    values) and turns DCP's deep errors (shape or key mismatches) into one line."""
    try:
        with dcp_errors(f"checkpoint '{folder}' does not fit this {what}"):
            dcp.load(state, storage_reader=SafeFileSystemReader(folder / "model_optim"),
                     planner=SafeLoadPlanner())
    except ConvertError as e:
        raise CheckpointError(str(e)) from None


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


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        return latest_checkpoint(self.dir)

    def save(self, step: int, model, optimizer, trainer_state: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:08d}"
        final, tmp = self.dir / name, self.dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "model_optim"))
        _kill_point("save_mid", step)
        torch.save(trainer_state, tmp / "trainer.pt")
        write_manifest(tmp)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _kill_point("save_before_latest", step)
        pointer = self.dir / f".{LATEST}.tmp"
        pointer.write_text(name)
        os.replace(pointer, self.dir / LATEST)
        _fsync_dir(self.dir)
        self._prune(keep_name=name)
        return final

    def _prune(self, keep_name: str) -> None:
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        for p in done[:-self.keep]:
            if p.name != keep_name:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.dir.glob(".step_*.tmp"):       # leftovers of a crash mid-write
            shutil.rmtree(p, ignore_errors=True)

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
