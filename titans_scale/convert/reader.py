"""The reader interface every checkpoint layout implements, so converters never care how a
checkpoint is laid out on disk (one DCP folder, several ranks' shards, a consolidated file,
a tensor/pipeline-parallel layout...).

Keys are flat and engine-neutral:
  model.<fqn>           a weight of TitansLM (fqn as in TitansLM.state_dict())
  optim.<dcp key>       an optimizer tensor, e.g. optim.state.<fqn>.exp_avg
Non-tensor values (optimizer hyper-parameters, keyed optim.param_groups.<i>.<name>) come from
values(); the trainer's own state (step, scheduler, data position, RNG) is a weights_only
torch file, trainer_state_path().

A reader returns each tensor whole and one at a time, so a conversion holds at most one
tensor (plus the pieces it is assembled from) at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from titans_scale.config import RunConfig
from titans_scale.errors import ConvertError
from titans_scale.model import ModelConfig

from .safetensors_io import TensorInfo

MODEL, OPTIM = "model.", "optim."
GROUP_BYTES = 16 << 20       # tensors read together by stream_tensors (one DCP load per group)


class CheckpointReader(ABC):
    layout: str = "?"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._rows_cache: tuple[str, torch.Tensor] | None = None

    # -- what every layout provides ---------------------------------------------------------
    @abstractmethod
    def tensors(self) -> list[TensorInfo]:
        """Every stored tensor (model.* first), in a stable order."""

    @abstractmethod
    def read(self, key: str) -> torch.Tensor:
        """The whole tensor `key`, freshly allocated on the CPU."""

    @abstractmethod
    def model_config(self) -> ModelConfig:
        ...

    # -- optional ---------------------------------------------------------------------------
    def run_config(self) -> RunConfig | None:
        return None

    def values(self) -> dict[str, Any]:
        return {}

    def trainer_state_path(self) -> Path | None:
        return None

    def step(self) -> int | None:
        return None

    def expected_sha256(self, key: str) -> str | None:
        """The checksum the layout recorded for `key`, if it records one."""
        return None

    def read_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Several whole tensors; layouts where one read call has a fixed cost override this."""
        return {k: self.read(k) for k in keys}

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `key`; layouts that can read a row range directly override this.
        The fallback keeps the last whole tensor, so reading a tensor block by block reads it once."""
        if self._rows_cache is None or self._rows_cache[0] != key:
            self._rows_cache = None
            self._rows_cache = (key, self.read(key))
        t = self._rows_cache[1][start:stop]
        if stop >= self._rows_cache[1].shape[0]:
            self._rows_cache = None
        return t

    # -- helpers ----------------------------------------------------------------------------
    def info(self, key: str) -> TensorInfo:
        for t in self.tensors():
            if t.name == key:
                return t
        raise ConvertError(f"'{self.path}' has no tensor '{key}'")

    def model_tensors(self) -> list[TensorInfo]:
        return [t for t in self.tensors() if t.name.startswith(MODEL)]

    def has_training_state(self) -> bool:
        return any(t.name.startswith(OPTIM) for t in self.tensors()) and self.trainer_state_path() is not None

    def describe(self) -> str:
        return f"{self.layout} checkpoint '{self.path}'"


def stream_tensors(reader: CheckpointReader, infos: list[TensorInfo], group_bytes: int = GROUP_BYTES):
    """Yield (info, tensor) in order, reading up to group_bytes at a time (a tensor larger than
    that alone): memory stays within max(largest tensor, group_bytes) plus what the caller keeps."""
    group: list[TensorInfo] = []
    size = 0

    def flush():
        got = reader.read_many([i.name for i in group])
        for i in group:
            yield i, got.pop(i.name)

    for info in infos:
        if group and size + info.nbytes > group_bytes:
            yield from flush()
            group, size = [], 0
        group.append(info)
        size += info.nbytes
    if group:
        yield from flush()


def expected_model_tensors(cfg: ModelConfig) -> dict[str, TensorInfo]:
    """The tensors TitansLM(cfg) has, built on the meta device (no memory)."""
    with torch.device("meta"):
        from titans_scale.model import TitansLM  # noqa: PLC0415
        model = TitansLM(cfg)
    return {MODEL + k: TensorInfo(MODEL + k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_model_tensors(cfg: ModelConfig, found: list[TensorInfo], where: str) -> None:
    """Every weight the config implies is present with its shape, and nothing else: a partial
    checkpoint names its first missing tensor, a config mismatch its first differing one."""
    want = expected_model_tensors(cfg)
    have = {t.name: t for t in found if t.name.startswith(MODEL)}
    for name, exp in want.items():
        if name not in have:
            raise ConvertError(f"{where} lacks tensor '{name}' {exp.shape}: the checkpoint is partial "
                               "or its model config differs")
        if have[name].shape != exp.shape:
            raise ConvertError(f"{where}: tensor '{name}' has shape {have[name].shape}, the model config "
                               f"implies {exp.shape}; use the run's own config")
        if not have[name].dtype.is_floating_point:
            raise ConvertError(f"{where}: tensor '{name}' has dtype {have[name].dtype}, expected a float")
    extra = sorted(set(have) - set(want))
    if extra:
        raise ConvertError(f"{where} has tensor '{extra[0]}' that the model config does not "
                           f"({len(extra)} such); use the run's own config")


__all__ = ["CheckpointReader", "TensorInfo", "MODEL", "OPTIM", "GROUP_BYTES", "stream_tensors", "check_model_tensors",
           "expected_model_tensors"]
