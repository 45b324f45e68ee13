"""A file or a folder appears whole or not at all: it is written under a temporary name beside
its destination, fsynced, then renamed into place (rename is atomic within a file system). A
crash at any moment leaves either the previous content or the new one, plus at most a hidden
`.<name>.tmp` leftover that the next write replaces."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync one file or folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, deepest first, then `folder` itself."""
    for p in sorted(folder.rglob("*"), reverse=True):
        fsync_path(p)
    fsync_path(folder)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", *, chmod: int | None = None, **open_kw):
    """Yields a file open on `.<name>.tmp`; when the block returns it is fsynced (and given
    `chmod`) and replaces `path`. If the block raises, `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if chmod is not None:
            tmp.chmod(chmod)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text_atomic(path: str | Path, text: str, *, chmod: int | None = None) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    with atomic_file(path, chmod=chmod, encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str | Path, obj) -> None:
    """Replace `path` with `obj` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=1))


def staging_path(final: Path, tag: str = "tmp") -> Path:
    """Where staged_dir builds `final`: `.<name>.<tag>` beside it."""
    return final.parent / f".{final.name}.{tag}"


@contextmanager
def staged_dir(final: str | Path, *, tag: str = "tmp"):
    """Yields an empty folder (staging_path(final, tag)); when the block returns, every file in
    it is fsynced and it is renamed to `final`. An existing `final` is first moved aside to
    `.<name>.old.<tag>` and removed after, so the name never holds a partial folder. If the
    block raises, the temporary folder is removed (and a parent folder this call created), and
    `final` is untouched."""
    final = Path(final)
    made_parent = not final.parent.exists()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(final, tag)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_parent:
            try:
                final.parent.rmdir()
            except OSError:
                pass
        raise
    if final.exists():
        old = staging_path(final, f"old.{tag}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(final.parent)


__all__ = ["atomic_file", "file_sha256", "fsync_path", "fsync_tree", "staged_dir", "staging_path",
           "write_json_atomic", "write_text_atomic"]
