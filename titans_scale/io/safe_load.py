"""Reading checkpoints without ever unpickling an arbitrary object.

torch.distributed.checkpoint (DCP) stores three kinds of bytes:
  * tensors: torch.save'd pieces, which torch's FileSystemReader already reads with
    torch.load(weights_only=True);
  * non-tensor values (optimizer hyper-parameters): DefaultLoadPlanner.load_bytes reads them
    with torch.load(weights_only=False) -- arbitrary code on load;
  * the `.metadata` file: FileSystemReader.read_metadata calls pickle.load on it -- the same.

SafeFileSystemReader reads `.metadata` with an unpickler that only knows DCP's own metadata
classes (and torch.Size, dtypes, paths); SafeLoadPlanner reads values with weights_only=True.
Use both wherever a checkpoint is read:

    dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())

Anything else is refused with UnsafeCheckpointError naming the file and the object; a missing,
truncated or corrupt file with ConvertError (titans_scale/errors.py), one line each.
SafeFileSystemReader also hands a stored tensor that is the whole requested tensor straight to
a planner that accepts it (`adopt_tensor`), so streaming conversions hold each tensor once.
"""

from __future__ import annotations

import io
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from titans_scale.errors import ConvertError, UnsafeCheckpointError

# (module, name) pairs a DCP `.metadata` pickle may name. Layouts that store more (another
# engine's planner data) add theirs with allow_metadata_globals().
_ALLOWED: set[tuple[str, str]] = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


def allow_metadata_globals(*pairs: tuple[str, str]) -> None:
    """Let `.metadata` pickles name these (module, name) classes too (plain-data classes only)."""
    _ALLOWED.update(pairs)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, where: str):
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"'{self.where}' carries a pickled object '{module}.{name}' that is not checkpoint "
            "metadata: refusing to unpickle it (a checkpoint may hold only tensors and plain values)")


def read_dcp_metadata(folder: str | Path) -> Metadata:
    """A DCP folder's `.metadata`, unpickled with the allow-list above."""
    path = Path(folder) / ".metadata"
    if not path.is_file():
        raise ConvertError(f"'{folder}' has no .metadata: not a complete torch.distributed.checkpoint folder")
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f, str(path)).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or garbled pickle
        raise ConvertError(f"'{path}' is corrupt or truncated ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata):
        raise ConvertError(f"'{path}' holds a {type(md).__name__}, not DCP metadata")
    return md


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    picked = next((ln for ln in lines if "Unsupported global" in ln or "Unsupported operand" in ln), None)
    return (picked or (lines[0] if lines else type(e).__name__))[:300]


def safe_torch_load(source: str | Path | io.IOBase, what: str | None = None) -> Any:
    """torch.load(weights_only=True) on the CPU; a pickled object is refused by name."""
    what = what or str(source)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"'{what}' carries a pickled object that is not a tensor or plain value: refusing to "
            f"load it ({_first_line(e)})") from None
    except FileNotFoundError:
        raise ConvertError(f"'{what}' is missing") from None
    except Exception as e:
        raise ConvertError(f"'{what}' cannot be read: it is corrupt or truncated ({_first_line(e)})") from None


@contextmanager
def dcp_errors(what: str):
    """DCP reports a rank's failure as CheckpointException (a BaseException holding each rank's
    exception and traceback): re-raise our own error as is, anything else as one ConvertError.
    One process without a process group is how conversions run: DCP's warning about it is muted."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    except ConvertError:
        raise
    except CheckpointException as e:
        excs = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        for exc in excs:
            if isinstance(exc, ConvertError):
                raise exc from None
        first = excs[0] if excs else e
        raise ConvertError(f"{what}: {type(first).__name__}: {_first_line(first)}") from None
    except Exception as e:
        raise ConvertError(f"{what}: {type(e).__name__}: {_first_line(e)}") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor values are read with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = safe_torch_load(value, f"checkpoint value '{read_item.dest_index.fqn}'")
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader with an allow-listed `.metadata` unpickler (read once and cached)."""

    def __init__(self, path: str | Path, **kw):
        super().__init__(path, **kw)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise ConvertError(f"'{self.path}': per-rank metadata files are not supported; "
                               "save with a process group so DCP writes one .metadata")
        if self._metadata is None:
            self._metadata = read_dcp_metadata(self.path)
        return self._metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """torch's FileSystemReader.read_data, plus: a stored piece that is exactly the whole
        requested tensor is handed to `planner.adopt_tensor` instead of copied into a second
        buffer, and a missing or short shard file is named in one line."""
        per_file: dict[str, list[ReadItem]] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        adopt = getattr(planner, "adopt_tensor", None)
        for rel, reqs in per_file.items():
            path = Path(self.path) / rel
            if not path.is_file():
                raise ConvertError(f"shard '{path}' is missing (needed for "
                                   f"'{reqs[0].dest_index.fqn}'); the checkpoint is partial")
            size = path.stat().st_size
            with open(path, "rb") as stream:
                for req in reqs:
                    info = self.storage_data[req.storage_index]
                    if info.offset + info.length > size:
                        raise ConvertError(f"shard '{path}' is truncated ({size} bytes, "
                                           f"'{req.dest_index.fqn}' needs {info.offset + info.length})")
                    piece = self.transforms.transform_load_stream(
                        req, info.transform_descriptors or (), self._slice_file(stream, info))
                    if req.type == LoadItemType.BYTE_IO:
                        planner.load_bytes(req, io.BytesIO(piece.read(-1)))
                        continue
                    if not piece.seekable():
                        piece = io.BytesIO(piece.read(-1))
                    what = f"'{req.dest_index.fqn}' in shard '{path}'"
                    tensor = safe_torch_load(piece, what)
                    if not torch.is_tensor(tensor):
                        raise ConvertError(f"{what} holds a {type(tensor).__name__}, not a tensor (corrupt)")
                    tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
                    if adopt is not None and adopt(req, tensor):
                        continue
                    target = planner.resolve_tensor(req).detach()
                    if target.size() != tensor.size():
                        raise ConvertError(f"{what} has shape {tuple(tensor.shape)}, its metadata "
                                           f"says {tuple(target.shape)} (corrupt)")
                    target.copy_(tensor)
                    planner.commit_tensor(req, target)
                    del tensor
        fut: Future = Future()
        fut.set_result(None)
        return fut


__all__ = ["SafeFileSystemReader", "SafeLoadPlanner", "allow_metadata_globals", "dcp_errors", "read_dcp_metadata",
           "safe_torch_load"]
