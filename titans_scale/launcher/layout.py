"""How many ranks a launch starts, and whether that world fits the config's parallel layout.

The world is nnodes x nproc_per_node ranks; tensor, pipeline and context parallelism take
tp*pp*cp of them per model replica and data parallelism gets the rest (dp = world / (tp*pp*cp)),
the same rule titans_scale.parallel.state.init_parallel applies at start-up. Checking it here
turns a wrong --nodes/--gpus-per-node into one line at submit time instead of a failed job.
"""

from __future__ import annotations

from dataclasses import dataclass

from titans_scale.config import ParallelConfig
from titans_scale.errors import ConfigError


@dataclass(frozen=True)
class ProcessGrid:
    """The processes a launch starts: nodes x ranks per node, and the model-parallel sizes they
    must fit (the trainer's full layout is titans_scale.parallel.layout.Layout)."""

    nnodes: int
    nproc_per_node: int       # ranks per node: one per GPU, or CPU processes
    gpu: bool                 # ranks drive GPUs (NCCL, DS_ACCELERATOR=cuda) or CPUs (gloo)
    tp: int = 1
    pp: int = 1
    cp: int = 1

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        return self.world_size // self.model_parallel

    def describe(self) -> str:
        return (f"{self.nnodes} node(s) x {self.nproc_per_node} {'GPU' if self.gpu else 'CPU'} rank(s) = "
                f"{self.world_size} ranks: TP={self.tp} PP={self.pp} CP={self.cp} DP={self.dp}")


def process_grid(parallel: ParallelConfig, nnodes: int, nproc_per_node: int, gpu: bool,
                 nodes_flag: str = "--nnodes", procs_flag: str = "--nproc-per-node") -> ProcessGrid:
    """A checked ProcessGrid; errors name the command-line flag or config key to change."""
    if not isinstance(nnodes, int) or nnodes < 1:
        raise ConfigError(f"{nodes_flag}: must be an integer >= 1, got {nnodes!r}")
    if not isinstance(nproc_per_node, int) or nproc_per_node < 1:
        raise ConfigError(f"{procs_flag}: must be an integer >= 1, got {nproc_per_node!r}")
    grid = ProcessGrid(nnodes, nproc_per_node, gpu, parallel.tp, parallel.pp, parallel.cp)
    if grid.world_size % grid.model_parallel:
        raise ConfigError(
            f"{nodes_flag} {nnodes} x {procs_flag} {nproc_per_node} = {grid.world_size} ranks is not a "
            f"multiple of parallel.tp*pp*cp = {grid.tp}*{grid.pp}*{grid.cp} = {grid.model_parallel}; "
            f"use a world size that is a multiple of {grid.model_parallel} or change parallel.tp/pp/cp")
    return grid
