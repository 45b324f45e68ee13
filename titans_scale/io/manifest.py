"""A folder's manifest.json: the size and SHA-256 of every other file in it, written last, so a
folder with a manifest is complete; verify_manifest refuses a missing, truncated or altered file
with one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

from titans_scale.errors import CheckpointError
from titans_scale.io.atomic import file_sha256, write_json_atomic

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_json_atomic(folder / MANIFEST, {"format_version": FORMAT_VERSION, "files": files})


def verify_manifest(folder: Path) -> None:
    man = folder / MANIFEST
    if not man.is_file():
        raise CheckpointError(f"checkpoint '{folder}' has no {MANIFEST}: it was never completed; "
                              "resume from an earlier checkpoint or start afresh")
    for rel, size, sha in _entries(man):
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint '{folder}' is missing '{rel}'")
        if p.stat().st_size != size:
            raise CheckpointError(f"checkpoint '{folder}': '{rel}' is truncated "
                                  f"({p.stat().st_size} of {size} bytes)")
        if file_sha256(p) != sha:
            raise CheckpointError(f"checkpoint '{folder}': '{rel}' does not match its checksum (corrupt)")


def _entries(man: Path) -> list[tuple[str, int, str]]:
    """(relative path, bytes, sha256) of each file a manifest lists; a manifest that is not what
    write_manifest writes (garbled, or crafted to name files outside its folder) is corrupt."""
    try:
        files = json.loads(man.read_text(encoding="utf-8"))["files"]
        out = [(rel, meta["bytes"], meta["sha256"]) for rel, meta in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"checkpoint '{man.parent}': {MANIFEST} is corrupt") from None
    for rel, size, sha in out:
        if Path(rel).is_absolute() or ".." in Path(rel).parts or type(size) is not int or not isinstance(sha, str):
            raise CheckpointError(f"checkpoint '{man.parent}': {MANIFEST} is corrupt (its entry '{rel}' is not "
                                  "a file of the checkpoint with a size and a checksum)")
    return out


__all__ = ["FORMAT_VERSION", "MANIFEST", "verify_manifest", "write_manifest"]
