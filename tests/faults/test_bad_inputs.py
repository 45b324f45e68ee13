"""Corrupted, truncated, missing and crafted files at every place the trainer (checkpoint,
manifest, config, data shards), the evaluator (eval, generate) and the converter read: each is
refused by the CLI, run as a subprocess, in one line naming the file, with no traceback, and
nothing under the run folder, the shards or the convert source changes (hashed before and after).
No crafted pickle ever runs (it would create a file). The CI part is FAST; the rest is slow."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from tests.faults import tally
from tests.faults.runs import refuses
from titans_scale.io.manifest import write_manifest

CKPT = Path("checkpoints") / "step_00000012"           # the newest checkpoint of the reference run
SHARD = CKPT / "model_optim" / "__0_0.distcp"
METADATA = CKPT / "model_optim" / ".metadata"
NO_FALLBACK = "train.resume_fallback=false"            # else a damaged newest falls back to step 8


class Payload:
    """A pickle that runs code when loaded: touches the file PWNED names."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = b"garbage!"
    p.write_bytes(bytes(data))


def _crafted(p: Path, marker: Path) -> list[str]:
    """`p` replaced by a code-running pickle, and the checkpoint's manifest rewritten to match
    (as an attacker would): only the loader's allow-list stands in the way. No extra arguments."""
    p.write_bytes(pickle.dumps(Payload(marker)))
    write_manifest(p.parent if p.parent.name.startswith("step_") else p.parent.parent)
    return []


def _manifest(run: Path, edit) -> None:
    p = run / CKPT / "manifest.json"
    p.write_text(json.dumps(edit(json.loads(p.read_text()))))


# name: (damage(run, shards, tmp) -> extra command arguments, command, the words the line names)
# command: "train" resumes the run for 4 more steps; "eval" / "generate" / "convert" read it.
CASES = {
    # -- the trainer's checkpoint ------------------------------------------------------------
    "checkpoint shard truncated": (lambda r, s, t: _truncate(r / SHARD) or [NO_FALLBACK], "train",
                                   ("__0_0.distcp", "truncated", "step_00000008")),
    "checkpoint shard corrupt": (lambda r, s, t: _flip(r / SHARD) or [NO_FALLBACK], "train",
                                 ("__0_0.distcp", "checksum")),
    "checkpoint shard missing": (lambda r, s, t: (r / SHARD).unlink() or [NO_FALLBACK], "train",
                                 ("__0_0.distcp", "missing")),
    ".metadata crafted pickle": (lambda r, s, t: _crafted(r / METADATA, t / "PWNED"), "train",
                                 (".metadata", "refusing")),
    ".metadata truncated (manifest rewritten)": (lambda r, s, t: (_truncate(r / METADATA), write_manifest(r / CKPT))
                                                 and [], "train", (".metadata", "truncated")),
    "trainer.pt crafted pickle": (lambda r, s, t: _crafted(r / CKPT / "trainer.pt", t / "PWNED"), "train",
                                  ("trainer.pt", "refusing")),
    "trainer.pt garbage (manifest rewritten)": (lambda r, s, t: ((r / CKPT / "trainer.pt").write_bytes(b"\0" * 99),
                                                                 write_manifest(r / CKPT)) and [], "train",
                                                ("trainer.pt",)),
    "manifest missing": (lambda r, s, t: (r / CKPT / "manifest.json").unlink() or [NO_FALLBACK], "train",
                         ("manifest.json", "step_00000008")),
    "manifest not JSON": (lambda r, s, t: ((r / CKPT / "manifest.json").write_bytes(b"\x00\xff{"), [NO_FALLBACK])[1],
                          "train", ("manifest.json", "corrupt")),
    "manifest files is a list": (lambda r, s, t: _manifest(r, lambda m: {**m, "files": [1, 2]}) or [NO_FALLBACK],
                                 "train", ("manifest.json",)),
    "manifest size is text": (lambda r, s, t: _manifest(r, lambda m: {**m, "files": {
        k: {**v, "bytes": "many"} for k, v in m["files"].items()}}) or [NO_FALLBACK], "train", ("manifest.json",)),
    "manifest names a file outside": (lambda r, s, t: _manifest(r, lambda m: {**m, "files": {
        "../../config.toml": {"bytes": 1, "sha256": "0"}}}) or [NO_FALLBACK], "train",
        ("manifest.json", "../../config.toml")),
    # -- the config ----------------------------------------------------------------------------
    "config empty": (lambda r, s, t: ["--config", _write(t / "empty.toml", b"")], "train", ("empty.toml", "empty")),
    "config comments only": (lambda r, s, t: ["--config", _write(t / "c.toml", b"# [model]\n")], "train",
                             ("c.toml", "empty")),
    "config binary": (lambda r, s, t: ["--config", _write(t / "b.toml", bytes(range(256)))], "train", ("b.toml",)),
    "config truncated": (lambda r, s, t: ["--config", _write(t / "t.toml", b"[model]\nd_model = 32\n[tra")],
                         "train", ("t.toml", "TOML")),
    "config is a folder": (lambda r, s, t: ["--config", _folder(t / "cfg.toml")], "train", ("cfg.toml",)),
    # -- the data --------------------------------------------------------------------------------
    "shard index not JSON": (lambda r, s, t: (s / "index.json").write_bytes(b"{\"format\": ") and [], "train",
                             ("index.json",)),
    "shard index crafted dtype": (lambda r, s, t: _edit_json(s / "index.json", dtype="object") or [], "train",
                                  ("train_00000.bin", "index says")),
    "shard index names a file outside": (lambda r, s, t: _edit_json(s / "index.json", splits={
        "train": {"files": ["../../etc/passwd"], "tokens": [1], "documents": 1}}) or [], "train",
        ("index.json", "../../etc/passwd")),
    "data shard truncated": (lambda r, s, t: _truncate(s / "train_00000.bin") or [], "train", ("train_00000.bin",)),
    "data.source other than the shards'": (lambda r, s, t: [f"data.source={_write(t / 'bad.jsonl', b'{oops}')}"],
                                           "train", ("bad.jsonl", "data.shard_dir")),
    "data.source binary": (lambda r, s, t: [f"data.source={_write(t / 'elf.txt', bytes(range(256)) * 64)}",
                                            f"data.shard_dir={t / 'new_shards'}"], "train", ("elf.txt",)),
    # -- the evaluator and generate --------------------------------------------------------------
    "eval: checkpoint shard truncated": (lambda r, s, t: _truncate(r / SHARD) or [], "eval", ("truncated",)),
    "eval: .metadata crafted pickle": (lambda r, s, t: _crafted(r / METADATA, t / "PWNED"), "eval", (".metadata",)),
    "eval: run config garbage": (lambda r, s, t: (r / "config.toml").write_bytes(b"\x00\x01[[[") and [], "eval",
                                 ("config.toml",)),
    "eval: run config missing": (lambda r, s, t: (r / "config.toml").unlink() or [], "eval", ("config.toml",)),
    "eval: no checkpoint": (lambda r, s, t: shutil.rmtree(r / "checkpoints") or [], "eval", ("checkpoint",)),
    "generate: .metadata crafted pickle": (lambda r, s, t: _crafted(r / METADATA, t / "PWNED"), "generate",
                                           (".metadata",)),
    # -- the converter ---------------------------------------------------------------------------
    "convert: .metadata crafted pickle": (lambda r, s, t: _crafted(r / METADATA, t / "PWNED"), "convert",
                                          (".metadata",)),
    "convert: trainer.pt crafted pickle": (lambda r, s, t: _crafted(r / CKPT / "trainer.pt", t / "PWNED"),
                                           "convert", ("trainer.pt",)),
    "convert: checkpoint shard truncated": (lambda r, s, t: _truncate(r / SHARD) or [], "convert", ("truncated",)),
}
FAST = (".metadata crafted pickle", "config empty", "data.source other than the shards'",
        "convert: trainer.pt crafted pickle")


def _write(p: Path, data: bytes) -> str:
    p.write_bytes(data)
    return str(p)


def _folder(p: Path) -> str:
    p.mkdir()
    return str(p)


def _edit_json(p: Path, **fields) -> None:
    p.write_text(json.dumps({**json.loads(p.read_text()), **fields}))


def _command(kind: str, run: Path, cfg: Path, tmp: Path, extra: list[str]) -> list:
    if kind == "train":
        config = extra[1] if extra[:1] == ["--config"] else cfg
        return ["train", "--config", config, "train.steps=16", *[a for a in extra if a != "--config" and a != config]]
    if kind == "eval":
        return ["eval", "--run-dir", run, "--suite", "loss", "--batches", "1", "--out", tmp / "eval_out"]
    if kind == "generate":
        return ["generate", "--run-dir", run, "--prompt", "def ", "--max-new-tokens", "2"]
    return ["convert", run / CKPT, tmp / "converted", "--to", "consolidated"]


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(name, tmp_path, shards, ref_run):
    ref, ref_cfg = ref_run
    run, data = tmp_path / "run", tmp_path / "shards"
    shutil.copytree(ref, run)
    shutil.copytree(shards, data)
    cfg = tmp_path / "run.toml"
    cfg.write_text(ref_cfg.read_text().replace(str(ref), str(run)).replace(str(shards), str(data)))
    damage, kind, names = CASES[name]
    extra = damage(run, data, tmp_path)
    with tally.case(tally.INPUTS, name):
        refuses(_command(kind, run, cfg, tmp_path, extra), names, untouched=(run, data, cfg))
        assert not (tmp_path / "PWNED").exists(), "a crafted pickle ran"
        assert not (tmp_path / "converted").exists() and not (tmp_path / "eval_out").exists()
