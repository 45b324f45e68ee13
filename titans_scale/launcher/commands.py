"""`titans-scale launch` (torchrun on this machine, or one node of many) and
`titans-scale slurm submit` (render, write and sbatch a job script). Registered by cli.py."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

from titans_scale.errors import ConfigError
from titans_scale.io.atomic import write_text_atomic


# ------------------------------------------------------------------------------ launch


def _launch_plan(args):
    """(torchrun command, environment for the ranks) of the launch these arguments ask for."""
    from titans_scale.config import load_run_config
    from titans_scale.launcher.env import rank_env
    from titans_scale.launcher.layout import process_grid
    from titans_scale.launcher.torchrun import Rendezvous, TorchrunCommand

    cfg = load_run_config(args.config, args.overrides)
    gpus = 0 if args.cpu else _cuda_devices()
    nproc = args.nproc_per_node or gpus or cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp
    grid = process_grid(cfg.parallel, args.nnodes, nproc, gpu=gpus > 0)
    _check_model_fits(cfg, grid)
    run_dir = Path(cfg.train.run_dir).resolve()
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise ConfigError(f"--rdzv-endpoint: {args.nnodes} nodes need a rendezvous host:port (the first "
                          "node's address, e.g. node001:29500), the same on every node")
    # Every node must use the same id: derive it from the run folder unless given.
    run_id = args.rdzv_id or "titans-" + hashlib.sha1(str(run_dir).encode()).hexdigest()[:10]
    tag = time.strftime("launch-%Y%m%d-%H%M%S")
    train_args = ["train", "--config", args.config, *(["--fresh"] if args.fresh else []), *args.overrides]
    cmd = TorchrunCommand(grid, Rendezvous(args.rdzv_endpoint, run_id), str(run_dir / "logs" / tag),
                          train_args)
    return cmd, rank_env(grid.gpu, args.threads_per_rank)


def _check_model_fits(cfg, grid) -> None:
    """The trainer's own layout rules (heads divisible by tp, a pipeline stage per layer, ...),
    checked now rather than when the job starts."""
    from titans_scale.parallel.layout import plan_layout
    plan_layout(cfg, grid.world_size)


def _cuda_devices() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cmd_launch(args) -> int:
    cmd, env = _launch_plan(args)
    argv = cmd.argv()
    line = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(argv)
    print(f"# {cmd.grid.describe()}\n{line}", flush=True)
    if args.dry_run:
        return 0
    Path(cmd.log_dir).mkdir(parents=True, exist_ok=True)
    os.execve(argv[0], argv, {**os.environ, **env})   # torchrun takes this process over (and its signals)


# ------------------------------------------------------------------------------ slurm


def _sweep_points(path: str, base_args: tuple[str, list[str]], run_dir: Path, grid_of) -> list:
    """Job-array points from a file: one line of overrides per point, '#' comments ignored."""
    from titans_scale.config import load_run_config
    from titans_scale.launcher.slurm import SweepPoint

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--sweep: file '{path}' not found; give a file with one line of overrides per point")
    points = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        try:
            ov = shlex.split(line, comments=True)
        except ValueError as e:
            raise ConfigError(f"--sweep {path}:{n}: {e}; quote values the way a shell would") from None
        if not ov:
            continue
        i = len(points)
        cfg = load_run_config(base_args[0], [*base_args[1], *ov])
        grid_of(cfg)                                # every point must fit the allocation
        if any(o.split("=", 1)[0].strip() == "train.run_dir" for o in ov):
            point_dir = Path(cfg.train.run_dir).resolve()
            ov = [o for o in ov if o.split("=", 1)[0].strip() != "train.run_dir"]
        else:
            point_dir = run_dir / f"sweep_{i:03d}"
        points.append(SweepPoint(str(point_dir), [*ov, f"train.run_dir={point_dir}"]))
    if not points:
        raise ConfigError(f"--sweep: '{path}' has no override lines")
    return points


def cmd_slurm_submit(args) -> int:
    from titans_scale.config import load_run_config
    from titans_scale.config_io import save_config
    from titans_scale.launcher.layout import process_grid
    from titans_scale.launcher.slurm import SlurmJob, render_sbatch, submit

    cfg = load_run_config(args.config, args.overrides)
    if args.gpus_per_node and args.procs_per_node and args.procs_per_node != args.gpus_per_node:
        raise ConfigError(f"--procs-per-node {args.procs_per_node}: with GPUs there is one rank per GPU; "
                          f"leave it out or set it to --gpus-per-node ({args.gpus_per_node})")
    gpu = args.gpus_per_node > 0
    nproc = args.gpus_per_node or args.procs_per_node or 1
    procs_flag = "--gpus-per-node" if gpu else "--procs-per-node"

    def grid_of(cfg):
        grid = process_grid(cfg.parallel, args.nodes, nproc, gpu, nodes_flag="--nodes", procs_flag=procs_flag)
        _check_model_fits(cfg, grid)
        return grid

    grid = grid_of(cfg)
    if args.signal_lead < 1:
        raise ConfigError(f"--signal-lead: must be >= 1 second, got {args.signal_lead}")
    run_dir = Path(cfg.train.run_dir).resolve()
    cfg.train.run_dir = str(run_dir)                # the job does not depend on where it starts
    sweep = _sweep_points(args.sweep, (args.config, args.overrides), run_dir, grid_of) if args.sweep else []
    slurm_dir = run_dir / "slurm"
    config_path = slurm_dir / "job.toml"
    job = SlurmJob(
        grid=grid, job_name=args.job_name or f"titans-{run_dir.name}", run_dir=str(run_dir),
        workdir=str(Path.cwd()), config=str(config_path), python=sys.executable,
        partition=args.partition, account=args.account, qos=args.qos, time=args.time,
        cpus_per_task=args.cpus_per_task, mem=args.mem, threads_per_rank=args.threads_per_rank,
        signal_lead_s=args.signal_lead, requeue=not args.no_requeue, sbatch_args=args.sbatch_arg,
        sweep=sweep, array_limit=args.array_limit)
    script = render_sbatch(job)
    if args.dry_run:
        print(script, end="")
        return 0
    slurm_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, config_path)
    for p in sweep:
        Path(p.run_dir).mkdir(parents=True, exist_ok=True)
    script_path = slurm_dir / "job.sbatch"
    write_text_atomic(script_path, script, chmod=0o755)
    job_id = submit(str(script_path))
    log = job.output.replace("%%", "%").replace("%j", job_id).replace("%A", job_id)
    print(json.dumps({"job_id": job_id, "script": str(script_path), "log": log,
                      "layout": grid.describe()}))
    return 0


# ------------------------------------------------------------------------------ parsers


def add_launch_commands(sub) -> None:
    """Add `launch` and `slurm submit` to the CLI's subparsers."""
    la = sub.add_parser("launch", help="train with torchrun on this machine (or as one node of many)",
                        description="Print and run the torchrun line for a config's layout.")
    la.add_argument("--config", required=True)
    la.add_argument("--nnodes", type=int, default=1)
    la.add_argument("--nproc-per-node", type=int, default=0,
                    help="ranks on this node (default: the GPUs here, else tp*pp*cp CPU ranks)")
    la.add_argument("--rdzv-endpoint", default=None,
                    help="host:port of the c10d rendezvous (the first node); needed for --nnodes > 1")
    la.add_argument("--rdzv-id", default=None, help="rendezvous id, the same on every node "
                    "(default: derived from the run folder)")
    la.add_argument("--threads-per-rank", type=int, default=1)
    la.add_argument("--cpu", action="store_true", help="CPU ranks (gloo) even where GPUs exist")
    la.add_argument("--fresh", action="store_true", help="ignore existing checkpoints (default: resume)")
    la.add_argument("--dry-run", action="store_true", help="print the torchrun line, do not run it")
    la.add_argument("overrides", nargs="*", help="section.field=value")
    la.set_defaults(fn=cmd_launch)

    sl = sub.add_parser("slurm", help="Slurm jobs: render and submit sbatch scripts")
    ssub = sl.add_subparsers(dest="slurm_command", required=True)
    s = ssub.add_parser("submit", help="render the job script from a config, write it to "
                        "<run_dir>/slurm/job.sbatch and sbatch it",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--config", required=True)
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0, help="one rank per GPU; 0 = CPU ranks")
    s.add_argument("--procs-per-node", type=int, default=0, help="CPU ranks per node (no GPUs; default 1)")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--qos")
    s.add_argument("--time", help="time limit, e.g. 04:00:00")
    s.add_argument("--job-name", help="default: titans-<run folder name>")
    s.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs of the per-node task (default: ranks per node x threads per rank)")
    s.add_argument("--mem", help="memory per node, e.g. 64G (sbatch --mem; default: 0, the node's "
                   "memory, with --gpus-per-node; Slurm's default for CPU ranks)")
    s.add_argument("--threads-per-rank", type=int, default=1)
    s.add_argument("--signal-lead", type=int, default=120,
                   help="seconds before the time limit at which SIGUSR1 asks the run to checkpoint")
    s.add_argument("--no-requeue", action="store_true", help="no --signal/--requeue: a preempted job ends")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, e.g. --sbatch-arg=--exclusive (repeatable)")
    s.add_argument("--sweep", help="job array: a file with one line of overrides per array task")
    s.add_argument("--array-limit", type=int, default=None, help="at most this many array tasks at once")
    s.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    s.add_argument("overrides", nargs="*", help="section.field=value")
    s.set_defaults(fn=cmd_slurm_submit)
