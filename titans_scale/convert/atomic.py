"""Write a conversion's output folder atomically: build it beside the destination under a
temporary name, rename it into place only when complete. A failure (corrupt input, a crash,
Ctrl-C) leaves nothing at the destination."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import ConvertError


def fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*"), reverse=True):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staged_output(out: str | Path, overwrite: bool = False):
    """Yields a temporary folder; on success it becomes `out` (replacing it if overwrite)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConvertError(f"destination '{out}' already exists; choose a new path or pass --overwrite")
    made_parent = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.convert-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_parent:
            try:
                out.parent.rmdir()
            except OSError:
                pass
        raise
    if out.exists():
        old = out.parent / f".{out.name}.convert-old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


__all__ = ["staged_output", "fsync_tree"]
