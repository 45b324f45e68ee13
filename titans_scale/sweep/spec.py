"""A sweep spec: which models (sizes x variants) to train for how much (budgets), and how.

    spec = load_sweep_spec("sweeps/cpu.toml")

TOML sections (see sweeps/cpu.toml and sweeps/cluster.toml):

  [sweep]    name, out_dir (the sweep folder), base_config (a run config every point starts
             from), design ("isoflop": compute budgets in FLOPs; "grid": token budgets),
             variants (names below), overrides (section.field=value for every point)
  [sizes]    d_model list; n_layers list, or the depth rule
             n_layers = clamp(round(d_model / aspect), min_layers, max_layers); head_dim
  [budgets]  flops (isoflop) or tokens (grid); min_steps / max_steps bound the points run
  [lr]       lr = base * (base_width / d_model) ** exponent, or one value per size
  [schedule] warmup_fraction, log/eval/checkpoint counts per run
  [slurm]    the array job of `sweep run --slurm`: nodes, GPUs, partition, time, ...

A variant is a name: a mixer fills every layer ("mac", "mag", "mal", "lmm", or a memory-off
baseline "swa", "seg", "attn"; "transformer" = "attn", the plain causal Transformer), or
"name=mixer,mixer,..." gives a pattern repeated to each size's depth ("hybrid=swa,mag").
Every variant trains through the same code path; the baselines just have no memory layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn

from titans_scale.config_io import load_config, sectioned
from titans_scale.errors import ConfigError
from titans_scale.model.config import MIXERS

ALIASES = {"transformer": "attn"}


class SweepSpecError(ConfigError):
    """A bad sweep spec value; the message names the key and the fix."""


def _bad(key: str, msg: str) -> NoReturn:
    raise SweepSpecError(f"sweep spec '{key}': {msg}")


@dataclass
class SweepSection:
    name: str = "sweep"
    out_dir: str = "runs/sweeps/sweep"
    base_config: str = "configs/tiny.toml"
    design: Literal["isoflop", "grid"] = "isoflop"
    variants: list[str] = field(default_factory=lambda: ["mag"])
    overrides: list[str] = field(default_factory=list)
    data_parallel: int = 1          # data-parallel ranks per point (Slurm); tokens/step = batch x seq x this

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            _bad("sweep.name", f"must be a non-empty name without '/', got {self.name!r}")
        if self.data_parallel < 1:
            _bad("sweep.data_parallel", f"must be >= 1, got {self.data_parallel}")
        if not self.variants:
            _bad("sweep.variants", 'needs at least one variant, e.g. ["mag", "transformer"]')
        names = [parse_variant(v)[0] for v in self.variants]
        if len(set(names)) != len(names):
            _bad("sweep.variants", f"names repeat: {names}")


@dataclass
class SizesSection:
    d_model: list[int] = field(default_factory=lambda: [32, 64])
    n_layers: list[int] = field(default_factory=list)     # empty: the aspect rule
    aspect: float = 16.0                                   # d_model per layer
    min_layers: int = 1
    max_layers: int = 64
    head_dim: int = 16                                     # n_heads = d_model / head_dim

    def validate(self) -> None:
        if not self.d_model or any(d < 2 for d in self.d_model):
            _bad("sizes.d_model", f"needs one or more widths >= 2, got {self.d_model}")
        if self.n_layers and len(self.n_layers) != len(self.d_model):
            _bad("sizes.n_layers", f"has {len(self.n_layers)} values for {len(self.d_model)} widths; give one "
                 "per d_model or leave it empty for the aspect rule")
        if any(n < 1 for n in self.n_layers) or self.min_layers < 1 or self.max_layers < self.min_layers:
            _bad("sizes.n_layers", "layer counts must be >= 1 and min_layers <= max_layers")
        if self.aspect <= 0 or self.head_dim < 2:
            _bad("sizes.aspect", "aspect must be > 0 and head_dim >= 2")
        for d in self.d_model:
            if d % self.head_dim:
                _bad("sizes.head_dim", f"head_dim={self.head_dim} must divide every d_model (not {d})")


@dataclass
class BudgetsSection:
    flops: list[float] = field(default_factory=list)      # isoflop: training FLOPs per point
    tokens: list[float] = field(default_factory=list)     # grid: training tokens per point
    min_steps: int = 10
    max_steps: int = 1_000_000

    def validate(self) -> None:
        if self.min_steps < 1 or self.max_steps < self.min_steps:
            _bad("budgets.min_steps", "need 1 <= min_steps <= max_steps")


@dataclass
class LrSection:
    base: float = 3e-3
    base_width: int = 128
    exponent: float = 0.0
    values: list[float] = field(default_factory=list)     # one per size; overrides the rule

    def validate(self) -> None:
        if any(not v > 0 for v in self.values) or not self.base > 0 or self.base_width < 1:
            _bad("lr.base", "learning rates and base_width must be > 0")


@dataclass
class ScheduleSection:
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    logs_per_run: int = 20
    evals_per_run: int = 1                                 # the last eval gives the point's loss
    checkpoints_per_run: int = 4

    def validate(self) -> None:
        if not 0 <= self.warmup_fraction < 1:
            _bad("schedule.warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        if min(self.logs_per_run, self.evals_per_run, self.checkpoints_per_run) < 1:
            _bad("schedule.evals_per_run", "logs, evals and checkpoints per run must be >= 1")


@dataclass
class SlurmSection:
    """The array job of `sweep run --slurm` (rendered by titans_scale.launcher.slurm): every
    array task trains one point with torchrun on nodes x (gpus_per_node or procs_per_node)."""

    nodes: int = 1
    gpus_per_node: int = 0                                 # one rank per GPU; 0 = CPU ranks
    procs_per_node: int = 1                                # CPU ranks per node when gpus_per_node = 0
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "04:00:00"
    cpus_per_task: int = 0                                 # 0: ranks per node x threads_per_rank
    threads_per_rank: int = 1
    max_parallel: int = 0                                  # 0: no limit on concurrent array tasks
    requeue: bool = True                                   # checkpoint and requeue on preemption
    sbatch: list[str] = field(default_factory=list)       # extra sbatch options, e.g. "--mem=0"


@sectioned
class SweepSpec:
    sweep: SweepSection
    sizes: SizesSection
    budgets: BudgetsSection
    lr: LrSection
    schedule: ScheduleSection
    slurm: SlurmSection

    @property
    def budget_values(self) -> list[float]:
        return self.budgets.flops if self.sweep.design == "isoflop" else self.budgets.tokens

    def validate(self) -> "SweepSpec":
        """Each section's range checks, then the checks across sections; the loader has checked
        types and choices (Literal fields)."""
        for section in (self.sweep, self.sizes, self.budgets, self.lr, self.schedule):
            section.validate()
        z = self.sizes
        shapes = [(d, self.n_layers(i)) for i, d in enumerate(z.d_model)]
        if len(set(shapes)) != len(shapes):
            _bad("sizes.d_model", f"two sizes have the same (d_model, n_layers): {shapes}")
        key = "budgets.flops" if self.sweep.design == "isoflop" else "budgets.tokens"
        vals = self.budget_values
        if not vals or any(not v > 0 for v in vals):
            _bad(key, f"design '{self.sweep.design}' needs one or more positive budgets in {key}, got {vals}")
        if len(set(vals)) != len(vals):
            _bad(key, f"budgets repeat: {vals}")
        if self.lr.values and len(self.lr.values) != len(z.d_model):
            _bad("lr.values", f"has {len(self.lr.values)} values for {len(z.d_model)} sizes; give one per size")
        return self

    def n_layers(self, i: int) -> int:
        z = self.sizes
        if z.n_layers:
            return z.n_layers[i]
        return max(z.min_layers, min(z.max_layers, round(z.d_model[i] / z.aspect)))

    def lr_for(self, i: int) -> float:
        if self.lr.values:
            return self.lr.values[i]
        return self.lr.base * (self.lr.base_width / self.sizes.d_model[i]) ** self.lr.exponent


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'mag' -> ('mag', ['mag']); 'transformer' -> ('transformer', ['attn']);
    'hybrid=swa,mag' -> ('hybrid', ['swa', 'mag'])."""
    name, sep, pattern = text.partition("=")
    name = name.strip()
    mixers = [m.strip() for m in pattern.split(",")] if sep else [ALIASES.get(name, name)]
    for m in mixers:
        if m not in MIXERS:
            _bad("sweep.variants", f"{text!r} uses unknown mixer {m!r}; use one of {', '.join(MIXERS)}, "
                 "'transformer', or name=mixer,mixer")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        _bad("sweep.variants", f"{text!r} needs a plain name (letters, digits, - _)")
    return name, mixers


def load_sweep_spec(path: str | Path, overrides=()) -> SweepSpec:
    return load_config(SweepSpec, path, list(overrides)).validate()
