"""Plan a sweep: one run config per (variant, size, budget) point, written into the sweep folder.

    <out_dir>/plan.json            every point: size, N, tokens D, compute C, steps, lr, paths
    <out_dir>/spec.toml            the resolved spec the plan came from
    <out_dir>/configs/<point>.toml one run config per point (`titans-scale train --config` runs it)
    <out_dir>/runs/<point>/        each point's run folder (metrics.jsonl, checkpoints)

N is the non-embedding parameter count; compute is model FLOPs (titans_scale.flops, the
"model" count: useful attention pairs, forward + backward) times training tokens. IsoFLOP
design: tokens = budget / flops_per_token(size); grid design: tokens = budget. Steps round
tokens to whole batches; a point outside [min_steps, max_steps] stays in the plan, marked
skipped with the reason, and is never run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from titans_scale.config import RunConfig, load_run_config
from titans_scale.config_io import dump_toml, save_config
from titans_scale.errors import ConfigError
from titans_scale.flops import model_flops_per_token, param_count
from titans_scale.io.atomic import write_text_atomic
from titans_scale.sweep.spec import SweepSpec, SweepSpecError, parse_variant

PLAN_FILE = "plan.json"
# Run-config keys the plan sets per point: a spec override of one would silently break the design.
PER_POINT_KEYS = ("model.d_model", "model.n_heads", "model.layers", "model.mlp_hidden", "model.mem_heads",
                  "optim.lr", "optim.warmup_steps", "optim.min_lr_ratio", "train.steps", "train.run_dir",
                  "train.log_every", "train.eval_every", "train.ckpt_every")


@dataclass
class Point:
    index: int
    name: str
    variant: str
    size_index: int            # position in [sizes]
    layers: list[str]
    d_model: int
    n_layers: int
    n_heads: int
    budget: float              # nominal: FLOPs (isoflop) or tokens (grid)
    params: int                # N: non-embedding parameters
    params_total: int
    flops_per_token: float     # model FLOPs of a training step, per token
    steps: int
    tokens: int                # D: steps * batch * seq_len
    flops: float               # C: flops_per_token * tokens
    lr: float
    config: str = ""           # relative to the sweep folder; empty when skipped
    skipped: str = ""          # why the point is not run

    @property
    def run_dir(self) -> str:
        return f"runs/{self.name}"


@dataclass
class Plan:
    name: str
    design: str
    tokens_per_step: int
    seq_len: int
    points: list[Point]
    data_parallel: int = 1

    def active(self) -> list[Point]:
        return [p for p in self.points if not p.skipped]

    def to_json(self) -> dict:
        return {"name": self.name, "design": self.design, "tokens_per_step": self.tokens_per_step,
                "seq_len": self.seq_len, "data_parallel": self.data_parallel,
                "flops": "titans_scale.flops, count='model', training step",
                "points": [dataclasses.asdict(p) for p in self.points]}

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        return cls(d["name"], d["design"], d["tokens_per_step"], d["seq_len"], [Point(**p) for p in d["points"]],
                   d.get("data_parallel", 1))


def _tag(x: float) -> str:
    """1e12 -> '1e12', 3e11 -> '3e11', 2.5e9 -> '2.5e9', 500 -> '500'."""
    s = f"{x:.3g}"
    if "e" not in s:
        return s
    m, e = s.split("e")
    return f"{m}e{int(e)}"


def base_run_config(spec: SweepSpec) -> RunConfig:
    for ov in spec.sweep.overrides:
        key = ov.partition("=")[0].strip()
        if key in PER_POINT_KEYS:
            raise SweepSpecError(f"sweep spec 'sweep.overrides': '{key}' is set per point by the sweep; "
                                 "use [sizes], [lr], [budgets] or [schedule] instead")
    defaults = ["train.progress=false", "train.tensorboard=false"]
    return load_run_config(spec.sweep.base_config, defaults + list(spec.sweep.overrides))


def point_config(base: RunConfig, spec: SweepSpec, variant: str, i: int, steps: int, run_dir: str) -> RunConfig:
    """The run config of one point (also used by the planner to size the model)."""
    d, nl = spec.sizes.d_model[i], spec.n_layers(i)
    _, pattern = parse_variant(variant)
    layers = [pattern[j % len(pattern)] for j in range(nl)]
    sc = spec.schedule
    try:
        model = dataclasses.replace(base.model, d_model=d, n_heads=d // spec.sizes.head_dim, layers=layers,
                                    mlp_hidden=0, mem_heads=0)
    except ConfigError as e:
        raise SweepSpecError(f"size d_model={d}, variant {variant!r}: {e}") from None
    optim = dataclasses.replace(base.optim, lr=spec.lr_for(i), min_lr_ratio=sc.min_lr_ratio,
                                warmup_steps=round(sc.warmup_fraction * steps))
    train = dataclasses.replace(base.train, steps=steps, run_dir=run_dir,
                                log_every=max(1, steps // sc.logs_per_run),
                                eval_every=max(1, -(-steps // sc.evals_per_run)),
                                ckpt_every=max(1, -(-steps // sc.checkpoints_per_run)))
    return dataclasses.replace(base, model=model, optim=optim, train=train).validate()


def plan_points(spec: SweepSpec, base: RunConfig | None = None) -> Plan:
    spec.validate()
    base = base or base_run_config(spec)
    tps = base.data.batch_size * base.data.seq_len * spec.sweep.data_parallel
    points: list[Point] = []
    for variant in spec.sweep.variants:
        vname = parse_variant(variant)[0]
        for i, d in enumerate(spec.sizes.d_model):
            probe = point_config(base, spec, variant, i, 1, "")
            fpt = model_flops_per_token(probe.model, base.data.seq_len)
            for budget in spec.budget_values:
                tokens = budget / fpt if spec.sweep.design == "isoflop" else budget
                steps = max(1, round(tokens / tps))
                kind = "C" if spec.sweep.design == "isoflop" else "D"
                name = f"{vname}-d{d}-l{len(probe.model.layers)}-{kind}{_tag(budget)}"
                p = Point(index=len(points), name=name, variant=vname, size_index=i,
                          layers=list(probe.model.layers), d_model=d, n_layers=len(probe.model.layers),
                          n_heads=probe.model.n_heads, budget=float(budget),
                          params=param_count(probe.model), params_total=param_count(probe.model, non_embedding=False),
                          flops_per_token=fpt, steps=steps, tokens=steps * tps, flops=fpt * steps * tps,
                          lr=probe.optim.lr)
                b = spec.budgets
                if not b.min_steps <= steps <= b.max_steps:
                    p.skipped = (f"{steps} steps is outside budgets.min_steps..max_steps = "
                                 f"{b.min_steps}..{b.max_steps}")
                else:
                    p.config = f"configs/{name}.toml"
                points.append(p)
    return Plan(spec.sweep.name, spec.sweep.design, tps, base.data.seq_len, points, spec.sweep.data_parallel)


def write_plan(spec: SweepSpec, force: bool = False) -> tuple[Path, Plan]:
    """Plan the sweep and write it into spec.sweep.out_dir; returns (folder, plan).
    Re-planning a folder with the same plan is a no-op; a different plan needs force=True."""
    base = base_run_config(spec)
    plan = plan_points(spec, base)
    out = Path(spec.sweep.out_dir)
    old = out / PLAN_FILE
    new_json = json.dumps(plan.to_json(), indent=1)
    if old.is_file() and not force and old.read_text(encoding="utf-8") != new_json:
        raise SweepSpecError(f"sweep folder '{out}' already holds a different plan; set sweep.out_dir to a new "
                             "folder, or pass --force to re-plan (finished points whose config is unchanged "
                             "stay finished)")
    (out / "configs").mkdir(parents=True, exist_ok=True)
    variants = {parse_variant(v)[0]: v for v in spec.sweep.variants}
    for p in plan.active():
        cfg = point_config(base, spec, variants[p.variant], p.size_index, p.steps, str(out / p.run_dir))
        path = out / p.config
        if not path.is_file() or path.read_text(encoding="utf-8") != dump_toml(cfg):
            save_config(cfg, path)
    write_text_atomic(out / "spec.toml", dump_toml(spec))
    write_text_atomic(old, new_json)
    return out, plan


def load_plan(sweep_dir: str | Path) -> Plan:
    path = Path(sweep_dir) / PLAN_FILE
    if not path.is_file():
        raise SweepSpecError(f"sweep folder '{sweep_dir}' has no {PLAN_FILE}; run `titans-scale sweep plan "
                             "--spec SPEC` first (or pass --spec)")
    return Plan.from_json(json.loads(path.read_text(encoding="utf-8")))
