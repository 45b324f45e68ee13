"""Streaming safetensors: write one tensor at a time, read one tensor (or rows of one) at a time.

safetensors' own `save_file` needs every tensor in memory at once and `safe_open` maps the
whole file (its touched pages count in the process's resident memory), so conversions of
large models use this module instead. The file is the standard format, byte for byte:
8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, ...,
"__metadata__": {str: str}} padded with spaces to 8 bytes, then the tensors back to back.
The tests read our files with safetensors' own loader.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from titans_scale.errors import ConvertError

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one stored tensor (no data)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor in row-major order, without a copy when it is contiguous."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise ConvertError(f"dtype {dtype} cannot be stored in safetensors")
    return DTYPE_NAMES[dtype]


class SafetensorsWriter:
    """Write tensors in the order of `infos`, one at a time; each write returns its sha256."""

    def __init__(self, path: str | Path, infos: list[TensorInfo], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.infos = list(infos)
        header: dict = {"__metadata__": dict(metadata or {})} if metadata else {}
        offset = 0
        for info in self.infos:
            header[info.name] = {"dtype": dtype_name(info.dtype), "shape": list(info.shape),
                                 "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, t: torch.Tensor) -> str:
        info = self.infos[self._next]
        if name != info.name or tuple(t.shape) != info.shape or t.dtype != info.dtype:
            raise ConvertError(f"internal: wrote '{name}' {tuple(t.shape)} {t.dtype}, expected "
                               f"'{info.name}' {info.shape} {info.dtype}")
        buf = tensor_bytes(t)
        self._f.write(buf)
        self._next += 1
        return hashlib.sha256(buf).hexdigest()

    def close(self) -> None:
        if self._next != len(self.infos):
            self._f.close()
            raise ConvertError(f"internal: '{self.path}' got {self._next} of {len(self.infos)} tensors")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


class SafetensorsFile:
    """A safetensors file opened for streaming reads: the header is checked against the file
    size at open, so a truncated file is named before anything is converted."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConvertError(f"'{self.path}' is missing")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(f"'{self.path}' is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ConvertError(f"'{self.path}' is truncated or not a safetensors file (header of {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise ConvertError(f"'{self.path}' has a corrupt safetensors header") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries: dict[str, tuple[TensorInfo, int, int]] = {}
        for name, e in header.items():
            try:
                info = TensorInfo(name, tuple(int(s) for s in e["shape"]), DTYPES[e["dtype"]])
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConvertError(f"'{self.path}': corrupt header entry for tensor '{name}'") from None
            if end - begin != info.nbytes:
                raise ConvertError(f"'{self.path}': tensor '{name}' has {end - begin} bytes for shape "
                                   f"{info.shape} {info.dtype} (corrupt header)")
            if self._start + end > size:
                raise ConvertError(f"'{self.path}' is truncated: tensor '{name}' ends at byte "
                                   f"{self._start + end}, the file has {size}")
            self._entries[name] = (info, begin, end)

    def infos(self) -> list[TensorInfo]:
        return [e[0] for e in sorted(self._entries.values(), key=lambda e: e[1])]

    def info(self, name: str) -> TensorInfo:
        if name not in self._entries:
            raise ConvertError(f"'{self.path}' has no tensor '{name}' (partial or wrong file)")
        return self._entries[name][0]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or rows [start, stop) of its first dimension, read into fresh memory."""
        info, begin, _ = self._entries[name] if name in self._entries else (self.info(name), 0, 0)
        shape = info.shape
        if rows is not None:
            row = info.nbytes // shape[0] if shape and shape[0] else 0
            begin, shape = begin + rows[0] * row, (rows[1] - rows[0], *shape[1:])
        out = torch.empty(shape, dtype=info.dtype)
        buf = tensor_bytes(out)
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            got = f.readinto(buf) if len(buf) else 0
        if got != len(buf):
            raise ConvertError(f"'{self.path}' is truncated inside tensor '{name}'")
        return out

    def sha256(self, name: str, block: int = 1 << 22) -> str:
        """sha256 of a stored tensor's bytes, read in blocks (constant memory)."""
        info, begin, end = self._entries[name] if name in self._entries else (self.info(name), 0, 0)
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            left = end - begin
            while left:
                chunk = f.read(min(block, left))
                if not chunk:
                    raise ConvertError(f"'{self.path}' is truncated inside tensor '{name}'")
                h.update(chunk)
                left -= len(chunk)
        return h.hexdigest()


__all__ = ["TensorInfo", "SafetensorsWriter", "SafetensorsFile", "sha256_tensor", "tensor_bytes",
           "DTYPE_NAMES", "DTYPES", "dtype_name"]
