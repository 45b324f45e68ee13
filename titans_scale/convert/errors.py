"""The converter's errors: one line each, naming the file, shard, tensor or option at fault."""

from __future__ import annotations

from titans_scale.errors import CheckpointError


class ConvertError(CheckpointError, ValueError):
    """A conversion cannot be done: bad input, damaged/partial checkpoint, or a bad argument."""


class UnsafeCheckpointError(ConvertError):
    """A checkpoint file carries a pickled object other than tensors and plain values."""


class IncompatibleError(ConvertError):
    """Another implementation's configuration does not compute the same function as ours."""


__all__ = ["ConvertError", "UnsafeCheckpointError", "IncompatibleError"]
