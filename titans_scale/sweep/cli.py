"""`titans-scale sweep ...`: plan, run, collect, fit, plot (or all of them in order).

  sweep plan    --spec sweeps/cpu.toml [--force] [section.field=value ...]
  sweep run     --spec S | --sweep DIR [--variants mag,mac] [--index I] [--slurm [--dry-run] [slurm.x=v ...]]
  sweep collect --spec S | --sweep DIR
  sweep fit     --spec S | --sweep DIR [--loss val_loss|train_loss] [--bootstrap 200]
  sweep plot    --spec S | --sweep DIR
  sweep all     --spec S [section.field=value ...]   (plan -> run -> collect -> fit -> plot; rerun to resume)

--spec finds the sweep folder through the spec's sweep.out_dir (after the overrides); --sweep
names it directly. `run --slurm` takes [slurm] from the folder's spec.toml, overrides on top.
"""

from __future__ import annotations

import json
from pathlib import Path


def _spec(args):
    from titans_scale.sweep.spec import load_sweep_spec
    return load_sweep_spec(args.spec, getattr(args, "overrides", ()))


def _folder(args) -> Path:
    if getattr(args, "sweep", None):
        return Path(args.sweep)
    if getattr(args, "spec", None):
        return Path(_spec(args).sweep.out_dir)
    from titans_scale.errors import ConfigError
    raise ConfigError("pass --spec sweeps/<name>.toml or --sweep <sweep folder>")


def _variants(args) -> list[str] | None:
    return [v.strip() for v in args.variants.split(",") if v.strip()] if getattr(args, "variants", None) else None


def cmd_plan(args) -> int:
    from titans_scale.sweep.plan import write_plan

    out, plan = write_plan(_spec(args), force=args.force)
    active = plan.active()
    for p in plan.points:
        what = f"skipped: {p.skipped}" if p.skipped else f"steps={p.steps} lr={p.lr:.3g}"
        print(f"  {p.index:3d} {p.name:28s} N={p.params:>12,} D={p.tokens:>15,} C={p.flops:.3g}  {what}")
    print(json.dumps({"sweep": str(out), "points": len(active), "skipped": len(plan.points) - len(active),
                      "total_flops": sum(p.flops for p in active)}))
    return 0


def cmd_run(args) -> int:
    from titans_scale.sweep.run import run_local, submit_slurm

    folder = _folder(args)
    if args.slurm:
        from titans_scale.sweep.spec import load_sweep_spec
        # [slurm] as planned (the folder's spec.toml), with this command's overrides on top
        spec = load_sweep_spec(folder / "spec.toml", getattr(args, "overrides", ()))
        script, job = submit_slurm(folder, spec.slurm, variants=_variants(args), dry_run=args.dry_run)
        print(json.dumps({"script": str(script), "job_id": job}))
        return 0
    s = run_local(folder, variants=_variants(args), index=args.index)
    print(json.dumps({"done": s.done, "trained_now": s.ran, "skipped": s.skipped, "failed": s.failed,
                      "interrupted": s.preempted}))
    return 130 if s.preempted else (1 if s.failed else 0)


def cmd_collect(args) -> int:
    from titans_scale.sweep.collect import collect

    path, rows = collect(_folder(args))
    counts: dict = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(json.dumps({"csv": str(path), **counts}))
    return 0


def cmd_fit(args) -> int:
    from titans_scale.sweep.analyze import fit_sweep

    out = fit_sweep(_folder(args), loss=args.loss, bootstrap=args.bootstrap, seed=args.seed)
    for v, res in out["variants"].items():
        a3, a2 = res["approach3"], res["approach2"]
        line = f"{v} ({res['n_runs']} runs): "
        if "alpha" in a3:
            line += (f"approach 3: alpha={a3['alpha']:.3f} {_ci(a3['alpha_ci'])}, beta={a3['beta']:.3f} "
                     f"{_ci(a3['beta_ci'])}, N_opt ~ C^{a3['a']:.3f} {_ci(a3['a_ci'])}; ")
        else:
            line += f"approach 3: {a3['error']}; "
        line += (f"approach 2: N_opt ~ C^{a2['a']:.3f} {_ci(a2['a_ci'])}, D_opt ~ C^{a2['b']:.3f} {_ci(a2['b_ci'])}"
                 if "a" in a2 else f"approach 2: {a2['error']}")
        print(line)
    print(json.dumps({"fit": str(_folder(args) / "fit.json")}))
    return 0


def _ci(ci) -> str:
    return "[n/a]" if ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def cmd_plot(args) -> int:
    from titans_scale.sweep.analyze import plot_sweep

    print(json.dumps({"plots": [str(p) for p in plot_sweep(_folder(args))]}))
    return 0


def cmd_all(args) -> int:
    args.force = False
    cmd_plan(args)
    rc = cmd_run(args)
    if rc == 130 or args.slurm:          # interrupted, or the points now run on the cluster
        return rc
    cmd_collect(args)
    cmd_fit(args)
    cmd_plot(args)
    return rc


def add_sweep_parser(sub) -> None:
    """Register `sweep` and its subcommands on the top-level CLI's subparsers."""
    sw = sub.add_parser("sweep", help="scaling-law sweeps: plan, run, collect, fit, plot")
    ss = sw.add_subparsers(dest="sweep_command", required=True)

    def where(p, spec_required=False):
        p.add_argument("--spec", required=spec_required, help="sweep spec TOML (sweeps/<name>.toml)")
        if not spec_required:
            p.add_argument("--sweep", help="the sweep folder (the spec's sweep.out_dir)")

    def spec_overrides(p):
        p.add_argument("overrides", nargs="*", help="spec overrides section.field=value, e.g. "
                       "sweep.out_dir=/scratch/sw slurm.partition=gpu")

    def run_args(p):
        p.add_argument("--variants", help="comma-separated subset of the sweep's variants")
        p.add_argument("--slurm", action="store_true", help="submit the unfinished points as a Slurm job array")
        p.add_argument("--dry-run", action="store_true", help="with --slurm: write the array script, do not submit")

    def fit_args(p):
        p.add_argument("--loss", default="val_loss", choices=["val_loss", "train_loss"])
        p.add_argument("--bootstrap", type=int, default=200, help="bootstrap rounds for the intervals")
        p.add_argument("--seed", type=int, default=0)

    p = ss.add_parser("plan", help="write one run config per sweep point")
    where(p, spec_required=True)
    spec_overrides(p)
    p.add_argument("--force", action="store_true", help="replace a different existing plan")
    p.set_defaults(fn=cmd_plan)

    p = ss.add_parser("run", help="train the unfinished points (locally, or --slurm)")
    where(p)
    run_args(p)
    spec_overrides(p)
    p.add_argument("--index", type=int, help="run only this point of the plan")
    p.set_defaults(fn=cmd_run)

    p = ss.add_parser("collect", help="gather final losses into results.csv")
    where(p)
    p.set_defaults(fn=cmd_collect)

    p = ss.add_parser("fit", help="fit approach 3 and approach 2 into fit.json")
    where(p)
    fit_args(p)
    p.set_defaults(fn=cmd_fit)

    p = ss.add_parser("plot", help="draw the PNGs into the sweep folder")
    where(p)
    p.set_defaults(fn=cmd_plot)

    p = ss.add_parser("all", help="plan, run, collect, fit and plot (rerun to resume)")
    where(p, spec_required=True)
    spec_overrides(p)
    run_args(p)
    fit_args(p)
    p.set_defaults(fn=cmd_all, index=None, sweep=None)
