"""A conversion's output folder is written with io.atomic.staged_dir: built beside the destination
under a temporary name, renamed into place only when complete. A failure (corrupt input, a crash,
Ctrl-C) leaves nothing at the destination."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from titans_scale.errors import ConvertError
from titans_scale.io.atomic import staged_dir


@contextmanager
def staged_output(out: str | Path, overwrite: bool = False):
    """Yields a temporary folder; on success it becomes `out` (replacing it if overwrite)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConvertError(f"destination '{out}' already exists; choose a new path or pass --overwrite")
    with staged_dir(out, tag=f"convert-tmp-{os.getpid()}") as tmp:
        yield tmp


__all__ = ["staged_output"]
