"""The project's exception types.

Every error a user can cause (a bad config value, a missing data path, a checkpoint that
does not fit) is raised as one of these with a one-line message that names the field or
argument and says how to fix it. The CLI catches `TitansError` and prints that line
instead of a stack trace.
"""

from __future__ import annotations


class TitansError(Exception):
    """Base of every error titans-scale raises on purpose."""


class ConfigError(TitansError, ValueError):
    """A config file, override or argument is invalid (unknown key, wrong type, bad value)."""


class DataError(TitansError, ValueError):
    """Data cannot be used: missing path, empty corpus, corrupt shards, tokenizer mismatch."""


class CheckpointError(TitansError):
    """A checkpoint is missing, damaged, or does not match the model/run being resumed."""


class ConvertError(CheckpointError, ValueError):
    """A checkpoint file cannot be read (missing, truncated, corrupt) or a conversion cannot be
    done (bad input, bad argument): one line naming the file, shard, tensor or option at fault."""


class UnsafeCheckpointError(ConvertError):
    """A checkpoint file carries a pickled object other than tensors and plain values."""


class IncompatibleError(ConvertError):
    """Another implementation's configuration does not compute the same function as ours."""


__all__ = ["TitansError", "ConfigError", "DataError", "CheckpointError", "ConvertError", "UnsafeCheckpointError",
           "IncompatibleError"]
