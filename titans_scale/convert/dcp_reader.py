"""Read torch.distributed.checkpoint (DCP) folders tensor by tensor, whatever wrote them.

Handles the trainer's checkpoints (<run>/checkpoints/step_N/{model_optim/, trainer.pt,
manifest.json}) and bare DCP folders written by one process or by several ranks: DCP's
metadata lists every stored piece (chunk offsets and sizes) of every tensor, so the full
tensor is assembled from the pieces, one tensor at a time, without a process group.
Everything is read through io/safe_load.py (no arbitrary unpickling). A layout that stores other
key names (another engine's parallel checkpoint) passes key_map: its key -> ours, or None
to skip the key.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

from titans_scale.config import RunConfig, load_run_config
from titans_scale.errors import CheckpointError, ConvertError
from titans_scale.io.commit import checkpoint_dir, latest_checkpoint
from titans_scale.io.manifest import verify_manifest
from titans_scale.io.safe_load import SafeFileSystemReader, SafeLoadPlanner, dcp_errors, safe_torch_load
from titans_scale.model import ModelConfig
from titans_scale.precision.fp8_emulation import is_fp8_meta_key

from .reader import MODEL, OPTIM, CheckpointReader, check_model_tensors
from .safetensors_io import TensorInfo


class _StreamPlanner(SafeLoadPlanner):
    """Loads the keys of a dict of meta tensors (placeholders): a stored piece that is the whole
    tensor is adopted as is; a tensor stored in pieces gets one buffer, filled piece by piece."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.out: dict[str, Any] = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        # DefaultLoadPlanner would allocate every meta placeholder here; we allocate lazily.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def _size(self, fqn: str) -> torch.Size:
        return self.metadata.state_dict_metadata[fqn].size

    def adopt_tensor(self, req, tensor: torch.Tensor) -> bool:
        fqn = req.dest_index.fqn
        if fqn in self.out or tuple(tensor.shape) != tuple(self._size(fqn)):
            return False
        self.out[fqn] = tensor
        return True

    def resolve_tensor(self, req) -> torch.Tensor:
        fqn = req.dest_index.fqn
        if fqn not in self.out:
            md = self.metadata.state_dict_metadata[fqn]
            self.out[fqn] = torch.empty(md.size, dtype=md.properties.dtype)
        return narrow_tensor_by_index(self.out[fqn], req.dest_offsets, req.lengths)

    def load_bytes(self, read_item, value) -> None:
        super().load_bytes(read_item, value)
        self.out[read_item.dest_index.fqn] = self.state_dict[read_item.dest_index.fqn]


def _step_of(folder: Path) -> int | None:
    m = re.fullmatch(r"step_(\d+)", folder.name)
    return int(m.group(1)) if m else None


class DcpReader(CheckpointReader):
    layout = "dcp"

    def __init__(self, path: str | Path, run_config: RunConfig | None = None,
                 key_map: Callable[[str], str | None] | None = None):
        super().__init__(path)
        p = self.path
        self.ckpt_dir = p if (p / "model_optim").is_dir() else None     # the trainer's layout
        self.dcp_dir = p / "model_optim" if self.ckpt_dir else p
        if self.ckpt_dir is not None:
            self.layout = "training"
            try:
                verify_manifest(self.ckpt_dir)                            # sizes + sha256 of every file
            except CheckpointError as e:
                raise ConvertError(str(e)) from None
        self._storage = SafeFileSystemReader(self.dcp_dir)
        self.metadata = self._storage.read_metadata()
        self._run = run_config if run_config is not None else self._find_run_config()
        self._keys: dict[str, str] = {}          # our key -> DCP key
        self._infos: list[TensorInfo] = []
        self._value_keys: dict[str, str] = {}
        bare = not any(k.startswith(MODEL) for k in self.metadata.state_dict_metadata)
        for key, md in self.metadata.state_dict_metadata.items():
            ours = key_map(key) if key_map else (MODEL + key if bare else key)
            if ours is None or is_fp8_meta_key(ours):
                # An FP8 run's scales and amax histories are recipe state, not weights: a model
                # loaded from the conversion starts fresh scales (refilled in amax_history_len steps)
                continue
            if not ours.startswith((MODEL, OPTIM)):
                raise ConvertError(f"{self.describe()} holds '{key}', which is neither model.* nor optim.*; "
                                   "pass a key_map for this layout")
            if isinstance(md, BytesStorageMetadata):
                self._value_keys[ours] = key
                continue
            assert isinstance(md, TensorStorageMetadata)
            self._keys[ours] = key
            self._infos.append(TensorInfo(ours, tuple(md.size), md.properties.dtype))
        self._infos.sort(key=lambda t: (not t.name.startswith(MODEL),))   # model first, stable
        self._check_pieces()
        self._check_model()

    def _check_model(self) -> None:
        """Every weight the model config implies, with its shape (layouts that store tensors
        padded or under other shapes adjust self._infos first)."""
        check_model_tensors(self.model_config(), self._infos, self.describe())

    # -- checks -----------------------------------------------------------------------------
    def _check_pieces(self) -> None:
        """Every tensor is fully covered by stored pieces, and every piece's shard file is there
        and long enough: a partial checkpoint names the missing shard before anything is read."""
        sizes: dict[str, int] = {}
        for ours, key in self._keys.items():
            md = self.metadata.state_dict_metadata[key]
            covered = sum(math.prod(c.sizes) for c in md.chunks)
            if covered != math.prod(md.size):
                raise ConvertError(f"{self.describe()}: tensor '{ours}' is only partly stored "
                                   f"({covered} of {math.prod(md.size)} elements); a rank's shard is missing")
            for c in md.chunks:
                info = self.metadata.storage_data.get(MetadataIndex(key, torch.Size(c.offsets)))
                if info is None:
                    raise ConvertError(f"{self.describe()}: no storage recorded for a piece of '{ours}' "
                                       "(corrupt metadata)")
                f = self.dcp_dir / info.relative_path
                if info.relative_path not in sizes:
                    if not f.is_file():
                        raise ConvertError(f"shard '{f}' is missing (it holds part of '{ours}'); "
                                           "the checkpoint is partial")
                    sizes[info.relative_path] = f.stat().st_size
                if info.offset + info.length > sizes[info.relative_path]:
                    raise ConvertError(f"shard '{f}' is truncated ({sizes[info.relative_path]} bytes; "
                                       f"'{ours}' needs {info.offset + info.length})")

    def _find_run_config(self) -> RunConfig | None:
        if self.ckpt_dir is None:
            return None
        toml = self.ckpt_dir.parent.parent / "config.toml"
        return load_run_config(str(toml)) if toml.is_file() else None

    # -- the interface ----------------------------------------------------------------------
    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def _load(self, keys: dict[str, Any]) -> dict[str, Any]:
        planner = _StreamPlanner()
        with dcp_errors(f"{self.describe()}: cannot read {sorted(keys)[0]!r}"):
            dcp.load(keys, storage_reader=self._storage, planner=planner)
        return planner.out

    def read(self, key: str) -> torch.Tensor:
        return self.read_many([key])[key]

    def read_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """One DCP load for several tensors (each DCP load has a planning cost)."""
        want = {}
        for key in keys:
            if key not in self._keys:
                raise ConvertError(f"{self.describe()} has no tensor '{key}'")
            md = self.metadata.state_dict_metadata[self._keys[key]]
            want[self._keys[key]] = torch.empty(md.size, dtype=md.properties.dtype, device="meta")
        got = self._load(want)
        return {key: got.pop(self._keys[key]) for key in keys}

    def values(self) -> dict[str, Any]:
        if not self._value_keys:
            return {}
        got = self._load({k: None for k in self._value_keys.values()})
        return {ours: got[k] for ours, k in self._value_keys.items()}

    def model_config(self) -> ModelConfig:
        if self._run is None:
            raise ConvertError(f"{self.describe()} has no config.toml beside it (expected at "
                               "<run_dir>/config.toml); pass the run's config (--config)")
        return self._run.model

    def run_config(self) -> RunConfig | None:
        return self._run

    def trainer_state_path(self) -> Path | None:
        if self.ckpt_dir is None or not (self.ckpt_dir / "trainer.pt").is_file():
            return None
        return self.ckpt_dir / "trainer.pt"

    def step(self) -> int | None:
        if self.ckpt_dir is None:
            return None
        st = self.trainer_state_path()
        if st is not None:
            state = safe_torch_load(st)
            if isinstance(state, dict) and "step" in state:
                return int(state["step"])
        return _step_of(self.ckpt_dir)


def resolve_run_dir(path: Path) -> Path:
    """A run folder means its newest complete checkpoint (the `latest` pointer)."""
    try:
        folder = latest_checkpoint(checkpoint_dir(path))
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    if folder is None:
        raise ConvertError(f"run folder '{path}' has no complete checkpoint (no checkpoints/latest)")
    return folder


__all__ = ["DcpReader", "resolve_run_dir"]
