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
    try:
        files = json.loads(man.read_text())["files"]
    except (ValueError, KeyError):
        raise CheckpointError(f"checkpoint '{folder}': {MANIFEST} is corrupt") from None
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint '{folder}' is missing '{rel}'")
        if p.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"checkpoint '{folder}': '{rel}' is truncated "
                                  f"({p.stat().st_size} of {meta['bytes']} bytes)")
        if file_sha256(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint '{folder}': '{rel}' does not match its checksum (corrupt)")


__all__ = ["FORMAT_VERSION", "MANIFEST", "verify_manifest", "write_manifest"]
