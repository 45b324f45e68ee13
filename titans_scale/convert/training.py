"""Any checkpoint -> a training run folder that `titans-scale train` resumes and `eval` reads.

    <out>/config.toml                         the run config (train.run_dir = <out>)
    <out>/checkpoints/step_N/model_optim/     torch.distributed.checkpoint, the trainer's keys
    <out>/checkpoints/step_N/trainer.pt       copied byte for byte from the source
    <out>/checkpoints/step_N/manifest.json    sizes and sha256 (the trainer's own format)
    <out>/checkpoints/latest

Streaming: the DCP save plans with meta placeholders (shapes only) and reads each tensor
from the source only when DCP writes it, in row blocks of at most `block_bytes` (DCP stores
each block as a chunk of the tensor, as a sharded save would; loading reassembles them in
any layout). So at most one block is in memory, plus the copy torch.save makes of it.
Files are cut every `block_bytes` too: DCP's writer keeps each file's tensors alive until
the file is closed. The written checkpoint is re-read and checked against the source's
checksums before it is renamed into place.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import queue
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _item_size
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from titans_scale.config import RunConfig
from titans_scale.config_io import dump_toml
from titans_scale.errors import ConvertError
from titans_scale.io.commit import LATEST, checkpoint_dir, step_folder
from titans_scale.io.manifest import write_manifest
from titans_scale.io.safe_load import dcp_errors, safe_torch_load

from .atomic import staged_output
from .dcp_reader import DcpReader
from .reader import MODEL, OPTIM, CheckpointReader, stream_tensors
from .safetensors_io import tensor_bytes

BLOCK_BYTES = 8 << 20       # DCP row block and file size: bounds the memory of a conversion


class _BlockedWriter(FileSystemWriter):
    """FileSystemWriter that starts a new file every `block_bytes` of tensors (in plan order).
    Files are fsynced once, with the whole output folder, before it is renamed into place."""

    def __init__(self, path, block_bytes: int):
        super().__init__(path, single_file_per_rank=True, sync_files=False, thread_count=1, overwrite=False)
        self.block_bytes = block_bytes

    def write_data(self, plan, planner):
        prefix = plan.storage_data.prefix
        files: list[list] = [[]]
        size = 0
        for item in plan.items:
            if item.type != WriteItemType.BYTE_IO:
                if size and size + _item_size(item) > self.block_bytes:
                    files.append([])
                    size = 0
                size += _item_size(item)
            files[-1].append(item)
        q: queue.Queue = queue.Queue()
        for i, items in enumerate(files):
            name = f"{prefix}{i}.distcp"
            q.put((self.fs.concat_path(self.path, name), name, items))
        return self._write_data(planner, q)


class _LazySavePlanner(DefaultSavePlanner):
    """Plans from meta placeholders; each tensor is split into row blocks of <= block_bytes,
    read from the source only when written, and hashed as it streams past."""

    def __init__(self, reader: CheckpointReader, block_bytes: int):
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True)
        self.reader, self.block_bytes = reader, block_bytes
        self.sha: dict[str, Any] = {}
        self._next_row: dict[str, int] = {}

    def create_local_plan(self):
        plan = super().create_local_plan()
        items: list[WriteItem] = []
        for it in plan.items:
            td = it.tensor_data
            if it.type == WriteItemType.BYTE_IO or td is None or len(td.size) == 0 or td.size[0] < 2:
                items.append(it)
                continue
            n = td.size[0]
            row_bytes = max(1, _item_size(it) // n)
            step = max(1, self.block_bytes // row_bytes)
            for r0 in range(0, n, step):
                rows = min(step, n - r0)
                offsets = torch.Size([r0] + [0] * (len(td.size) - 1))
                items.append(WriteItem(
                    index=MetadataIndex(it.index.fqn, offsets), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets, torch.Size([rows, *td.size[1:]])),
                                                properties=td.properties, size=td.size)))
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, item: WriteItem):
        if item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(item)
        key = item.index.fqn
        td = item.tensor_data
        if len(td.size) == 0 or td.size[0] < 2 or tuple(td.chunk.sizes) == tuple(td.size):
            t = self.reader.read(key)
        else:
            r0, rows = td.chunk.offsets[0], td.chunk.sizes[0]
            if self._next_row.get(key, 0) != r0:
                raise ConvertError(f"internal: blocks of '{key}' written out of order")
            t = self.reader.read_rows(key, r0, r0 + rows)
            self._next_row[key] = r0 + rows
        if tuple(t.shape) != tuple(td.chunk.sizes):
            raise ConvertError(f"source tensor '{key}' block has shape {tuple(t.shape)}, "
                               f"expected {tuple(td.chunk.sizes)} (corrupt source)")
        self.sha.setdefault(key, hashlib.sha256()).update(tensor_bytes(t))
        return t


def _nest(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> dict:
    """Flat keys -> the trainer's nesting {"model": {fqn}, "optim": {"state": {fqn: {stat}},
    "param_groups": [{...}]}}, so DCP records the same key paths as CheckpointManager.save."""
    out: dict = {"model": {}, "optim": {}}
    for key, v in {**tensors, **values}.items():
        if key.startswith(MODEL):
            out["model"][key[len(MODEL):]] = v
            continue
        rest = key[len(OPTIM):]
        if rest.startswith("state."):
            fqn, _, stat = rest[len("state."):].rpartition(".")
            out["optim"].setdefault("state", {}).setdefault(fqn, {})[stat] = v
        elif rest.startswith("param_groups."):
            idx, _, name = rest[len("param_groups."):].partition(".")
            groups = out["optim"].setdefault("param_groups", [])
            while len(groups) <= int(idx):
                groups.append({})
            groups[int(idx)][name] = v
        else:
            out["optim"][rest] = v
    if not out["optim"]:
        del out["optim"]
    return out


def write_training_checkpoint(reader: CheckpointReader, out: str | Path, *, run_config: RunConfig | None = None,
                              overwrite: bool = False, block_bytes: int = BLOCK_BYTES) -> Path:
    """Write `reader` as a run folder at `out`; returns the checkpoint folder inside it.

    A source with optimizer and trainer state (a training checkpoint, or a consolidated one
    of kind "training") gives a checkpoint `train` resumes exactly. A weights-only source
    gives one that eval/generate read (CheckpointManager.load_model); `train` refuses to
    resume it because it has no optimizer state."""
    run = copy.deepcopy(run_config or reader.run_config())
    if run is None:
        raise ConvertError(f"{reader.describe()} carries no run config; pass one (--config run.toml)")
    if dataclasses.asdict(run.model) != dataclasses.asdict(reader.model_config()):
        raise ConvertError("the run config's [model] differs from the checkpoint's model config; "
                           "use the checkpoint's own config")
    out = Path(out)
    run.train.run_dir = str(out)
    training = reader.has_training_state()
    infos = [i for i in reader.tensors() if training or i.name.startswith(MODEL)]
    placeholders = {i.name: torch.empty(i.shape, dtype=i.dtype, device="meta") for i in infos}
    values = reader.values() if training else {}
    step = reader.step() or 0
    name = step_folder(step)
    with staged_output(out, overwrite, src=reader.path) as tmp:
        ckpt = checkpoint_dir(tmp) / name
        ckpt.mkdir(parents=True)
        planner = _LazySavePlanner(reader, block_bytes)
        with dcp_errors(f"writing '{ckpt / 'model_optim'}'"):
            dcp.save(_nest(placeholders, values), storage_writer=_BlockedWriter(ckpt / "model_optim", block_bytes),
                     planner=planner)
        if training:
            src = reader.trainer_state_path()
            safe_torch_load(src)
            shutil.copyfile(src, ckpt / "trainer.pt")
        write_manifest(ckpt)
        (tmp / "config.toml").write_text(dump_toml(run))
        (checkpoint_dir(tmp) / LATEST).write_text(name)
        _verify(ckpt, run, reader, planner, values)
    return checkpoint_dir(out) / name


def _verify(ckpt: Path, run: RunConfig, source: CheckpointReader, planner: _LazySavePlanner, values: dict) -> None:
    """Re-read what was written: every tensor's sha256 equals the source's (the hash taken as
    it streamed, and the source's own table where it has one); values equal."""
    written = DcpReader(ckpt, run_config=run)
    want = {i.name for i in source.tensors() if i.name in planner.sha}
    got = {i.name for i in written.tensors()}
    if want != got:
        missing = sorted(want ^ got)[0]
        raise ConvertError(f"written checkpoint '{ckpt}' and the source differ in tensor '{missing}'")
    for info, t in stream_tensors(written, [i for i in written.tensors() if i.name in want], planner.block_bytes):
        key = info.name
        streamed = planner.sha[key].hexdigest()
        recorded = source.expected_sha256(key)
        if recorded is not None and recorded != streamed:
            raise ConvertError(f"source tensor '{key}' does not match its checksum: {source.describe()} is corrupt")
        if hashlib.sha256(tensor_bytes(t)).hexdigest() != streamed:
            raise ConvertError(f"written tensor '{key}' in '{ckpt}' does not match the source (disk error?)")
        del t
    if values and written.values() != values:
        raise ConvertError(f"written optimizer values in '{ckpt}' differ from the source")


__all__ = ["write_training_checkpoint", "BLOCK_BYTES"]
