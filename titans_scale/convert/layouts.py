"""Which reader opens a path: a small registry that other layouts plug into.

    register_layout("megatron-tp-pp", detect=lambda p: (p / "metadata.json").is_file(),
                    open=lambda p, run_config: MyReader(p, run_config))

open_checkpoint(path) tries the layouts newest-registered first, then the built-in ones:
a consolidated folder, the parallel trainer's megatron TP x PP x DP checkpoint (a run folder,
step_N or model_optim/ of it: parallel_reader.py), a run folder (its newest checkpoint), a
training checkpoint folder (step_N with model_optim/), a bare DCP folder (one process or several ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from titans_scale.config import RunConfig
from titans_scale.errors import ConvertError
from titans_scale.io.commit import checkpoint_dir

from .consolidated import ConsolidatedReader, is_consolidated
from .dcp_reader import DcpReader, resolve_run_dir
from .parallel_reader import ParallelReader, is_parallel_checkpoint
from .reader import CheckpointReader


@dataclass(frozen=True)
class CheckpointFormat:
    """One on-disk checkpoint layout the converter reads: how to recognise it, how to open it."""
    name: str
    detect: Callable[[Path], bool]
    open: Callable[[Path, RunConfig | None], CheckpointReader]


_BUILTIN = [
    CheckpointFormat("consolidated", is_consolidated, lambda p, run: ConsolidatedReader(p)),
    # before run-dir / training / dcp: a parallel step folder also has model_optim/ and .metadata
    CheckpointFormat("megatron", is_parallel_checkpoint, lambda p, run: ParallelReader(p, run)),
    CheckpointFormat("run-dir", lambda p: checkpoint_dir(p).is_dir() and (p / "config.toml").is_file(),
           lambda p, run: DcpReader(resolve_run_dir(p), run)),
    CheckpointFormat("training", lambda p: (p / "model_optim").is_dir(), lambda p, run: DcpReader(p, run)),
    CheckpointFormat("dcp", lambda p: (p / ".metadata").is_file(), lambda p, run: DcpReader(p, run)),
]
_REGISTERED: list[CheckpointFormat] = []


def register_layout(name: str, detect: Callable[[Path], bool],
                    open: Callable[[Path, RunConfig | None], CheckpointReader]) -> None:  # noqa: A002
    """Add a checkpoint layout; it is tried before the built-in ones."""
    _REGISTERED.insert(0, CheckpointFormat(name, detect, open))


def layouts() -> list[CheckpointFormat]:
    return _REGISTERED + _BUILTIN


def open_checkpoint(path: str | Path, run_config: RunConfig | None = None) -> CheckpointReader:
    """A reader for whatever checkpoint lies at `path`."""
    p = Path(path)
    if not p.exists():
        raise ConvertError(f"checkpoint '{p}' does not exist")
    if not p.is_dir():
        raise ConvertError(f"checkpoint '{p}' is a file; pass the checkpoint folder (a run folder, "
                           "a step_N folder, a DCP folder or a consolidated folder)")
    for layout in layouts():
        if layout.detect(p):
            return layout.open(p, run_config)
    if checkpoint_dir(p).is_dir():
        raise ConvertError(f"'{p}' looks like a run folder but has no config.toml; pass --config")
    raise ConvertError(f"'{p}' is not a checkpoint this version can read (known layouts: "
                       f"{', '.join(lay.name for lay in layouts())})")


__all__ = ["CheckpointFormat", "register_layout", "layouts", "open_checkpoint"]
