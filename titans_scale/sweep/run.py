"""Run a planned sweep's points: locally one by one, or as one Slurm job array.

Resumable at two levels. A point is finished when its run folder holds `sweep_done.json`
(written atomically once its training returned at the last step, holding a hash of the
config it ran), so finished points are skipped. An unfinished point resumes from its newest
checkpoint (the trainer's exact resume). Killed mid-way and restarted, a sweep therefore
skips what finished and carries on where it was.

The Slurm path submits one job array (titans_scale.launcher.slurm renders it) whose tasks train
the unfinished points with `titans-scale train` under torchrun, preempted tasks checkpointing
and requeueing themselves. Such a point counts as finished once its metrics hold the eval of
its last step (train writes no sweep_done.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from titans_scale.errors import ConfigError, TitansError
from titans_scale.io.atomic import write_json_atomic, write_text_atomic
from titans_scale.sweep.plan import PER_POINT_KEYS, Plan, Point, load_plan
from titans_scale.sweep.spec import SlurmSection
from titans_scale.train.metrics import read_metrics

DONE_FILE = "sweep_done.json"
FAILED_FILE = "sweep_failed.json"


class SweepRunError(TitansError):
    """A point could not run or the sweep could not be submitted; the message says why."""


def config_hash(sweep_dir: Path, p: Point) -> str:
    return hashlib.sha256((sweep_dir / p.config).read_bytes()).hexdigest()[:16]


def point_status(sweep_dir: Path, p: Point) -> str:
    """skipped | done | failed | started | pending."""
    if p.skipped:
        return "skipped"
    run = sweep_dir / p.run_dir
    if (run / DONE_FILE).is_file() or any(r["step"] == p.steps for r in read_metrics(run, "eval")):
        return "done"
    if (run / FAILED_FILE).is_file():
        return "failed"
    return "started" if (run / "metrics.jsonl").is_file() else "pending"


def run_point(sweep_dir: Path, p: Point) -> str:
    """Train one point (resuming its checkpoint). Returns 'done', 'skipped' or 'preempted';
    raises on a failed run after recording it in the run folder."""
    from titans_scale.config import load_run_config
    from titans_scale.train.trainer import Trainer

    status = point_status(sweep_dir, p)
    if status in ("skipped", "done"):
        marker = sweep_dir / p.run_dir / DONE_FILE
        if status == "done" and marker.is_file():
            ran = json.loads(marker.read_text()).get("config_hash")
            if ran != config_hash(sweep_dir, p):
                raise SweepRunError(f"point {p.name} finished with a different config than {p.config} now holds; "
                                    f"delete {sweep_dir / p.run_dir} to rerun it")
        return status
    run = sweep_dir / p.run_dir
    (run / FAILED_FILE).unlink(missing_ok=True)
    # The sweep folder may have moved since planning: the run folder is always the one inside it.
    cfg = load_run_config(str(sweep_dir / p.config), [f"train.run_dir={run}"])
    try:
        trainer = Trainer(cfg, resume=True)
        last = trainer.run()
    except (TitansError, ValueError, RuntimeError, FloatingPointError) as e:
        run.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run / FAILED_FILE, {"error": f"{type(e).__name__}: {e}"})
        raise SweepRunError(f"point {p.name} failed: {e}") from e
    if last.get("preempted"):
        return "preempted"
    if trainer.step < cfg.train.steps:
        raise SweepRunError(f"point {p.name} stopped at step {trainer.step} of {cfg.train.steps}")
    write_json_atomic(run / DONE_FILE, {"step": trainer.step, "config_hash": config_hash(sweep_dir, p),
                                        **{k: v for k, v in last.items() if isinstance(v, (int, float))}})
    return "done"


@dataclass
class RunSummary:
    done: int = 0
    ran: int = 0
    skipped: int = 0
    failed: int = 0
    preempted: bool = False


def select(plan: Plan, variants: list[str] | None = None, index: int | None = None) -> list[Point]:
    pts = plan.points
    if index is not None:
        if not 0 <= index < len(pts):
            raise ConfigError(f"--index {index}: the plan has points 0..{len(pts) - 1}")
        return [pts[index]]
    if variants:
        known = sorted({p.variant for p in pts})
        for v in variants:
            if v not in known:
                raise ConfigError(f"--variants: {v!r} is not in this sweep; it has {', '.join(known)}")
        pts = [p for p in pts if p.variant in variants]
    return pts


def run_local(sweep_dir: str | Path, variants: list[str] | None = None, index: int | None = None,
              keep_going: bool = True) -> RunSummary:
    """Run the selected points one after another in this process."""
    sweep_dir = Path(sweep_dir)
    plan = load_plan(sweep_dir)
    if plan.data_parallel != 1:
        raise ConfigError(f"this plan counts tokens for sweep.data_parallel={plan.data_parallel} ranks per point; "
                          "run it with `sweep run --slurm`, or re-plan with data_parallel = 1 to run here")
    pts = select(plan, variants, index)
    out = RunSummary()
    for k, p in enumerate(pts, 1):
        status = point_status(sweep_dir, p)
        head = f"[{k}/{len(pts)}] {p.name}"
        if status in ("skipped", "done"):
            run_point(sweep_dir, p)           # checks a finished point still matches its config
            out.skipped += status == "skipped"
            out.done += status == "done"
            print(f"{head}: {'finished earlier, skipped' if status == 'done' else 'not run: ' + p.skipped}",
                  flush=True)
            continue
        print(f"{head}: {'resuming' if status == 'started' else 'training'} N={p.params:,} D={p.tokens:,} "
              f"steps={p.steps} lr={p.lr:.3g}", flush=True)
        try:
            result = run_point(sweep_dir, p)
        except SweepRunError as e:
            out.failed += 1
            print(f"{head}: FAILED: {e}", flush=True)
            if not keep_going:
                raise
            continue
        if result == "preempted":
            out.preempted = True
            print(f"{head}: stopped by a signal; checkpoint written, rerun to resume", flush=True)
            break
        out.ran += 1
        out.done += 1
        print(f"{head}: done", flush=True)
    return out


# ----------------------------------------------------------------------------- Slurm


def _override_value(v) -> str:
    """A TOML literal the override parser reads back as the same value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)                      # strings and lists of strings: valid TOML too


def point_overrides(sweep_dir: Path, p: Point) -> list[str]:
    """`key=value` overrides that turn any point's config into this point's (plus its run folder)."""
    from titans_scale.config import load_run_config
    from titans_scale.config_io import config_to_dict

    cfg = config_to_dict(load_run_config(str(sweep_dir / p.config)))
    out = []
    for key in PER_POINT_KEYS:
        if key == "train.run_dir":
            continue
        section, name = key.split(".")
        out.append(f"{key}={_override_value(cfg[section][name])}")
    return out + [f"train.run_dir={_override_value(str((sweep_dir / p.run_dir).resolve()))}"]


def slurm_job(sweep_dir: str | Path, slurm: SlurmSection, *, variants: list[str] | None = None,
              job_name: str | None = None):
    """The job array (titans_scale.launcher.slurm.SlurmJob) over the unfinished points: task i
    runs `titans-scale train --config <a point's config> <point i's overrides>` under torchrun."""
    from titans_scale.config import load_run_config
    from titans_scale.launcher.layout import process_grid
    from titans_scale.launcher.slurm import SlurmJob, SweepPoint

    sweep_dir = Path(sweep_dir).resolve()
    plan = load_plan(sweep_dir)
    todo = [p for p in select(plan, variants) if point_status(sweep_dir, p) not in ("done", "skipped")]
    if not todo:
        raise SweepRunError("no points to submit: every selected point is finished or skipped")
    base = sweep_dir / todo[0].config
    gpu = slurm.gpus_per_node > 0
    grid = process_grid(load_run_config(str(base)).parallel, slurm.nodes, slurm.gpus_per_node or slurm.procs_per_node,
                        gpu, nodes_flag="slurm.nodes", procs_flag="slurm.gpus_per_node / procs_per_node")
    if grid.dp != plan.data_parallel:
        raise ConfigError(f"slurm: {grid.describe()} trains with DP={grid.dp}, but the plan counts tokens for "
                          f"sweep.data_parallel={plan.data_parallel}; make them agree and re-plan")
    points = [SweepPoint(str((sweep_dir / p.run_dir).resolve()), point_overrides(sweep_dir, p)) for p in todo]
    job = SlurmJob(grid=grid, job_name=job_name or f"sweep-{plan.name}", run_dir=str(sweep_dir),
                   workdir=os.getcwd(), config=str(base), python=sys.executable,
                   partition=slurm.partition or None, account=slurm.account or None, qos=slurm.qos or None,
                   time=slurm.time or None, cpus_per_task=slurm.cpus_per_task or None,
                   threads_per_rank=slurm.threads_per_rank, requeue=slurm.requeue, sbatch_args=list(slurm.sbatch),
                   sweep=points, array_limit=slurm.max_parallel or None)
    return job, todo


def submit_slurm(sweep_dir: str | Path, slurm: SlurmSection, *, variants: list[str] | None = None,
                 dry_run: bool = False, job_name: str | None = None) -> tuple[Path, str | None]:
    """Write <sweep>/slurm/array.sbatch for the unfinished points and sbatch it (unless
    dry_run). Returns (script path, job id or None)."""
    from titans_scale.launcher.slurm import render_sbatch, submit

    sweep_dir = Path(sweep_dir)
    job, todo = slurm_job(sweep_dir, slurm, variants=variants, job_name=job_name)
    folder = sweep_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "array.sbatch"
    write_text_atomic(script, render_sbatch(job), chmod=0o755)
    if dry_run:
        return script, None
    for p in job.sweep:
        Path(p.run_dir).mkdir(parents=True, exist_ok=True)
    job_id = submit(str(script))
    write_json_atomic(folder / "submitted.json", {"job_id": job_id, "script": str(script),
                                                  "array_task_to_point": [p.name for p in todo]})
    return script, job_id
