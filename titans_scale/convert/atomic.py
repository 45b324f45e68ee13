"""A conversion's output folder is written with io.atomic.staged_dir: built beside the destination
under a temporary name, renamed into place only when complete. A failure (corrupt input, a crash,
Ctrl-C) leaves nothing at the destination.

A conversion never writes into, over or inside its own source, and --overwrite replaces only a
folder a conversion wrote (it carries the MARKER file), never a training run or anything else."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from titans_scale.errors import ConvertError
from titans_scale.io.atomic import staged_dir

MARKER = ".titans-convert-output"      # written into every conversion output: --overwrite may replace it


def check_not_overlapping(src: str | Path, out: str | Path) -> None:
    """Refuse a destination that is the source, lies inside it, or contains it (resolved paths:
    symlinks and `..` cannot hide it)."""
    s, o = Path(src).resolve(), Path(out).resolve()
    if s == o or s in o.parents or o in s.parents:
        raise ConvertError(f"destination '{out}' overlaps the source '{src}' (the same folder, or one inside "
                           "the other); conversion never writes into its own source: choose a new path")


@contextmanager
def staged_output(out: str | Path, overwrite: bool = False, *, src: str | Path):
    """Yields a temporary folder; on success it becomes `out` (replacing it if overwrite and it
    is an earlier conversion's output). `src`: what is read, which `out` must not overlap."""
    out = Path(out)
    check_not_overlapping(src, out)
    if out.exists() and not overwrite:
        raise ConvertError(f"destination '{out}' already exists; choose a new path or pass --overwrite")
    if out.exists() and not (out / MARKER).is_file():
        raise ConvertError(f"destination '{out}' exists and was not written by convert (no {MARKER}); "
                           "--overwrite replaces only an earlier conversion's output: choose a new path")
    try:
        with staged_dir(out, tag=f"convert-tmp-{os.getpid()}") as tmp:
            yield tmp
            (tmp / MARKER).write_text("written by titans-scale convert; --overwrite may replace this folder\n")
    except OSError as e:     # writing beside `out` failed (read-only, full): one line; other paths are not ours to name
        if e.filename is None or not Path(os.path.abspath(e.filename)).is_relative_to(os.path.abspath(out.parent)):
            raise
        raise ConvertError(f"cannot write the destination '{out}' ({type(e).__name__}: {e}): choose a writable "
                           "folder with free space; nothing was written") from None


__all__ = ["MARKER", "check_not_overlapping", "staged_output"]
