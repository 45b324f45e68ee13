"""An embedded text corpus that exists on every fresh machine: the Python standard library.

The `.py` sources of the running interpreter's standard library (tests, site-packages and
machine-specific files left out) are read in sorted path order up to a byte budget. That
gives several MB of real, structured text with long-range dependencies (imports, names
defined far above their use) with no download, so `make train` works offline.
A file goes to the validation split when a hash of its name says so (~2%), so the split
does not depend on the budget or on the order files are read.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from titans_scale.errors import DataError

DEFAULT_MAX_BYTES = 8_000_000
DEFAULT_VAL_FRACTION = 0.02

# Test suites are missing from slim installs (Debian ships them separately); the rest is
# machine-specific or third-party. Leaving them out keeps the corpus the same across machines.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's .py files in sorted (relative, posix) path order."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise DataError(f"embedded corpus: standard library folder '{root}' not found; "
                        "pass your own text files as the data sources")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune in place: never walk into site-packages or test suites
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        files.extend(Path(dirpath, f) for f in filenames
                     if f.endswith(".py") and not f.startswith("_sysconfigdata"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_text(path: Path) -> str:
    # A few files hold odd bytes; replacing them keeps the corpus deterministic.
    return path.read_bytes().decode("utf-8", errors="replace")


def _hash01(name: str) -> float:
    return int(hashlib.sha256(name.encode()).hexdigest()[:12], 16) / 16**12


def split_of(name: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
    return "val" if _hash01(name) < val_fraction else "train"


def embedded_documents(max_bytes: int = DEFAULT_MAX_BYTES, root: str | Path | None = None) -> list[Document]:
    """Whole files in sorted order; the last one is cut so the total is exactly `max_bytes` UTF-8 bytes."""
    if max_bytes <= 0:
        raise DataError(f"embedded corpus: max_bytes={max_bytes} must be positive")
    root_path = Path(root) if root is not None else stdlib_root()
    docs, total = [], 0
    for p in stdlib_files(root_path):
        text = read_text(p)
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            text = text.encode("utf-8")[: max_bytes - total].decode("utf-8", errors="ignore")
            size = len(text.encode("utf-8"))
        if text:
            docs.append(Document("stdlib/" + p.relative_to(root_path).as_posix(), text))
            total += size
        if total >= max_bytes:
            break
    if not docs:
        raise DataError(f"embedded corpus: no .py files under '{root_path}'; pass your own text files")
    return docs


def embedded_corpus(max_bytes: int = DEFAULT_MAX_BYTES, val_fraction: float = DEFAULT_VAL_FRACTION,
                    root: str | Path | None = None) -> dict[str, list[Document]]:
    """{"train": [...], "val": [...]}, both non-empty when there are at least two files."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"embedded corpus: val_fraction={val_fraction} must be in [0, 1)")
    docs = embedded_documents(max_bytes, root)
    splits: dict[str, list[Document]] = {"train": [], "val": []}
    for d in docs:
        splits[split_of(d.name, val_fraction)].append(d)
    if val_fraction > 0 and len(docs) >= 2:
        # A small budget can leave a split empty: move the file whose hash is nearest the cut.
        if not splits["val"]:
            d = min(splits["train"], key=lambda d: _hash01(d.name))
            splits["train"].remove(d)
            splits["val"].append(d)
        elif not splits["train"]:
            d = max(splits["val"], key=lambda d: _hash01(d.name))
            splits["val"].remove(d)
            splits["train"].append(d)
    return splits


def embedded_fingerprint(max_bytes: int = DEFAULT_MAX_BYTES, val_fraction: float = DEFAULT_VAL_FRACTION,
                         root: str | Path | None = None) -> str:
    """Identifies the corpus a budget selects here (file names and sizes, not just the settings)."""
    root_path = Path(root) if root is not None else stdlib_root()
    h = hashlib.sha256(f"{max_bytes}:{val_fraction}".encode())
    total = 0
    for p in stdlib_files(root_path):
        size = p.stat().st_size
        h.update(f"{p.relative_to(root_path).as_posix()}:{size};".encode())
        total += size
        if total >= max_bytes:  # the file sizes in bytes bound the text read
            break
    return f"embedded-stdlib:py{sys.version_info[0]}.{sys.version_info[1]}:{h.hexdigest()[:16]}"


@functools.lru_cache(maxsize=4)
def _cached_files(root: str | None) -> tuple[Path, ...]:
    return tuple(stdlib_files(root))


def iter_stdlib_text(start: int = 0, root: str | Path | None = None) -> Iterator[str]:
    """Endless stream of stdlib file texts, starting at file `start` (mod count), cycling; lazy."""
    files = _cached_files(str(root) if root is not None else None)
    if not files:
        raise DataError("embedded corpus: no standard library .py files found; use the noise haystack")
    i = start % len(files)
    while True:
        yield read_text(files[i])
        i = (i + 1) % len(files)


__all__ = ["Document", "stdlib_root", "stdlib_files", "embedded_documents", "embedded_corpus",
           "embedded_fingerprint", "iter_stdlib_text", "split_of", "DEFAULT_MAX_BYTES",
           "DEFAULT_VAL_FRACTION"]
