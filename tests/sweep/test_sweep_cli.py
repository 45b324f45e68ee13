"""`titans-scale sweep`: plan -> run (killed, restarted) -> collect -> fit -> plot on a micro
sweep of real training runs; the fit stage against synthetic results with known exponents;
the cluster spec renders (plan + Slurm array script) without running; bad specs fail in one line."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ENV, ROOT, cli as run_cli
from titans_scale.cli import main
from titans_scale.config import load_run_config
from titans_scale.flops import model_flops_per_token
from titans_scale.model import TitansLM
from titans_scale.sweep.collect import COLUMNS, read_results
from titans_scale.sweep.plan import load_plan
from titans_scale.sweep.run import point_overrides
from titans_scale.train.metrics import read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

MICRO_SPEC = """
[sweep]
name = "micro"
out_dir = "{out}"
base_config = "{repo}/configs/tiny.toml"
design = "isoflop"
variants = ["mag", "transformer"]
overrides = ["data.shard_dir={shards}", "data.max_bytes=300000", "data.seq_len=32", "data.batch_size=2",
             "train.eval_batches=1", "train.threads=1", "model.chunk_size=8", "model.window=16",
             "model.segment_len=16", "model.mem_expansion=2"]

[sizes]
d_model = [16, 32]
n_layers = [1, 2]
head_dim = 8

[budgets]
flops = [3e7, 6e7]
min_steps = 1

[lr]
base = 3e-3
base_width = 32
exponent = 0.5

[schedule]
checkpoints_per_run = 4
"""


def write_spec(tmp: Path, shards: Path, **subs) -> Path:
    text = MICRO_SPEC.format(out=tmp / "sweep", repo=ROOT, shards=shards)
    for old, new in subs.items():
        text = text.replace(old, new)
    tmp.mkdir(parents=True, exist_ok=True)
    spec = tmp / "micro.toml"
    spec.write_text(text)
    return spec


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return run_cli(*args, env=env, cwd=ROOT, check=False)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, path


# ----------------------------------------------------------------------------- a real micro sweep


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """Plan, run killed mid-point, rerun, rerun again, collect, fit, plot; keeps what each step saw."""
    tmp = tmp_path_factory.mktemp("micro")
    spec = write_spec(tmp, tmp / "shards")
    out = tmp / "sweep"
    assert main(["sweep", "plan", "--spec", str(spec)]) == 0
    plan = load_plan(out)
    p0, p1 = plan.points[0], plan.points[1]
    # Kill -9 the sweep while point 1 writes a checkpoint that point 0 (fewer steps) never reaches.
    every = -(-p1.steps // 4)
    kill_step = next(s for s in range(every, p1.steps + 1, every) if s > p0.steps)
    first = cli("sweep", "run", "--sweep", out, env={**ENV, "TITANS_TEST_KILL_AT": f"save_mid:{kill_step}"})
    seen = {"first_rc": first.returncode, "kill_step": kill_step, "every": every,
            "p0_metrics": (out / p0.run_dir / "metrics.jsonl").read_bytes(),
            "p1_done_before": (out / p1.run_dir / "sweep_done.json").exists()}
    second = cli("sweep", "run", "--sweep", out)
    third = cli("sweep", "run", "--sweep", out)
    for cmd in ("collect", "fit", "plot"):
        assert main(["sweep", cmd, "--sweep", str(out)]) == 0
    return dict(out=out, plan=plan, first=first, second=second, third=third, **seen)


def test_plan_writes_one_config_per_point(micro):
    plan, out = micro["plan"], micro["out"]
    assert [p.name for p in plan.points] == [
        f"{v}-d{d}-l{n}-C{c}" for v in ("mag", "transformer") for d, n in ((16, 1), (32, 2)) for c in ("3e7", "6e7")]
    for p in plan.points:
        cfg = load_run_config(str(out / p.config))
        mixer = "mag" if p.variant == "mag" else "attn"
        assert cfg.model.layers == [mixer] * p.n_layers and cfg.model.d_model == p.d_model
        assert cfg.model.n_heads == p.d_model // 8
        assert cfg.optim.lr == pytest.approx(3e-3 * (32 / p.d_model) ** 0.5)
        assert cfg.train.steps == p.steps and p.tokens == p.steps * 2 * 32
        assert p.params == TitansLM(cfg.model).num_params()
        fpt = model_flops_per_token(cfg.model, 32)
        assert p.flops == pytest.approx(fpt * p.tokens)
        # IsoFLOP: whole steps land within half a step of the budget
        assert abs(p.flops - p.budget) <= 0.5 * fpt * 64 + 1e-6 * p.budget or p.steps == 1


def test_kill_and_restart_skips_finished_points(micro):
    plan, out = micro["plan"], micro["out"]
    p0, p1 = plan.points[0], plan.points[1]
    assert micro["first_rc"] == -9, micro["first"].stderr[-2000:]        # SIGKILLed mid-checkpoint
    assert not micro["p1_done_before"]
    second = micro["second"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"[1/8] {p0.name}: finished earlier, skipped" in second.stdout
    assert f"[2/8] {p1.name}: resuming" in second.stdout
    # the finished point was not touched again; the killed one resumed from its last good checkpoint
    assert (out / p0.run_dir / "metrics.jsonl").read_bytes() == micro["p0_metrics"]
    starts = [r["step"] for r in read_metrics(out / p1.run_dir, "start")]
    assert starts == [0, micro["kill_step"] - micro["every"]]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary == {"done": 8, "trained_now": 7, "skipped": 0, "failed": 0, "interrupted": False}
    third = json.loads(micro["third"].stdout.strip().splitlines()[-1])
    assert third["done"] == 8 and third["trained_now"] == 0
    assert micro["third"].stdout.count("finished earlier, skipped") == 8


def test_collect_writes_one_csv(micro):
    rows = read_results(micro["out"] / "results.csv")
    assert list(rows[0]) == list(COLUMNS) and len(rows) == 8
    for r, p in zip(rows, micro["plan"].points):
        assert r["name"] == p.name and r["status"] == "done" and r["final_step"] == p.steps
        assert r["params"] == p.params and r["tokens"] == p.tokens
        assert 0 < r["val_loss"] < 7 and 0 < r["train_loss"] < 7
        evals = read_metrics(micro["out"] / p.run_dir, "eval")
        assert r["val_loss"] == evals[-1]["val_loss"]


def test_fit_and_plot_on_a_micro_sweep(micro):
    out = micro["out"]
    fit = json.loads((out / "fit.json").read_text())
    assert set(fit["variants"]) == {"mag", "transformer"}
    for res in fit["variants"].values():
        assert res["n_runs"] == 4
        assert "at least 5" in res["approach3"]["error"]           # 4 runs cannot fit 5 parameters
        assert "parabola needs at least 3" in res["approach2"]["error"]
    for name in ("loss_curves_mag.png", "loss_curves_transformer.png", "variants.png"):
        assert_png(out / name)


# ----------------------------------------------------------------------------- fit stage, known answers


def synthetic_sweep(tmp: Path, loss_of) -> Path:
    """Plan a 4 sizes x 3 budgets sweep (nothing runs) and write results.csv from loss_of(row)."""
    spec = write_spec(tmp, tmp / "shards", **{
        'variants = ["mag", "transformer"]': 'variants = ["mag"]',
        "d_model = [16, 32]": "d_model = [16, 32, 48, 64, 96]", "n_layers = [1, 2]": "n_layers = [1, 2, 3, 4, 4]",
        "flops = [3e7, 6e7]": "flops = [1e11, 1e12, 1e13]"})
    assert main(["sweep", "plan", "--spec", str(spec)]) == 0
    out = tmp / "sweep"
    main(["sweep", "collect", "--sweep", str(out)])
    rows = read_results(out / "results.csv")
    for r in rows:
        r.update(status="done", val_loss=loss_of(r))
    with open(out / "results.csv", "w") as f:
        f.write(",".join(COLUMNS) + "\n")
        for r in rows:
            f.write(",".join("" if r[c] is None else str(r[c]) for c in COLUMNS) + "\n")
    return out


def test_cli_fit_recovers_known_exponents(tmp_path):
    E, A, B, alpha, beta = 1.2, 60.0, 300.0, 0.36, 0.3
    out = synthetic_sweep(tmp_path / "a3", lambda r: E + A / r["params"] ** alpha + B / r["tokens"] ** beta)
    assert main(["sweep", "fit", "--sweep", str(out), "--bootstrap", "20"]) == 0
    a3 = json.loads((out / "fit.json").read_text())["variants"]["mag"]["approach3"]
    assert abs(a3["alpha"] - alpha) < 0.02 and abs(a3["beta"] - beta) < 0.02, a3
    assert a3["n_points"] == 15 and a3["alpha_ci"][0] <= a3["alpha"] <= a3["alpha_ci"][1]
    assert a3["a"] == pytest.approx(beta / (alpha + beta))

    # Approach 2: a parabola in log N per budget, centred on N_opt = k C^0.5.
    k = 40_000 / 1e12 ** 0.5
    out2 = synthetic_sweep(tmp_path / "a2", lambda r: 4 - 0.1 * math.log10(r["budget"])
                           + 0.05 * math.log(r["params"] / (k * r["budget"] ** 0.5)) ** 2)
    assert main(["sweep", "fit", "--sweep", str(out2), "--bootstrap", "20"]) == 0
    a2 = json.loads((out2 / "fit.json").read_text())["variants"]["mag"]["approach2"]
    assert abs(a2["a"] - 0.5) < 0.01 and len(a2["budgets"]) == 3, a2
    for b in a2["budgets"]:
        assert b["N_opt"] == pytest.approx(k * b["C"] ** 0.5, rel=1e-6)
    assert main(["sweep", "plot", "--sweep", str(out2)]) == 0
    for name in ("isoflop_mag.png", "frontier_mag.png", "variants.png"):
        assert_png(out2 / name)
    assert not (out2 / "loss_curves_mag.png").exists()            # no run logged a curve


# ----------------------------------------------------------------------------- cluster spec


def test_cluster_spec_renders_without_running(tmp_path, capsys):
    out = tmp_path / "cluster"
    assert main(["sweep", "plan", "--spec", str(ROOT / "sweeps" / "cluster.toml"), f"sweep.out_dir={out}"]) == 0
    plan = load_plan(out)
    assert len(plan.points) == 60 and not [p for p in plan.points if p.skipped]
    assert plan.tokens_per_step == 16 * 4096 * 8
    totals = sorted({p.params_total for p in plan.points if p.variant == "mag"})
    for got, paper in zip(totals, (170e6, 340e6, 400e6, 760e6)):
        assert abs(got / paper - 1) < 0.05, (got, paper)            # the paper's sizes
    assert not (out / "runs").exists()                               # nothing ran
    capsys.readouterr()
    assert main(["sweep", "run", "--sweep", str(out), "--slurm", "--dry-run", "slurm.partition=big gpu"]) == 0
    script = (out / "slurm" / "array.sbatch").read_text()
    assert "#SBATCH --array=0-59%8" in script and "#SBATCH --gpus-per-node=8" in script
    assert '#SBATCH "--partition=big gpu"' in script
    assert subprocess.run(["bash", "-n", str(out / "slurm" / "array.sbatch")]).returncode == 0
    # Each array task = the base config + its point's overrides = exactly that point's config.
    configs = sorted((out / "configs").glob("*.toml"))
    assert len(configs) == 60
    for p in plan.points[::13]:
        assert p.name in script
        ref = load_run_config(str(out / p.config))
        rebuilt = load_run_config(str(out / plan.points[0].config), point_overrides(out, p))
        ref.train.run_dir = str((out / p.run_dir).resolve())
        assert rebuilt == ref, p.name


def test_slurm_skips_finished_points_and_checks_the_layout(micro, tmp_path):
    out = micro["out"]
    # every micro point is finished: nothing to submit
    assert main(["sweep", "run", "--sweep", str(out), "--slurm", "--dry-run"]) == 2
    spec = write_spec(tmp_path, tmp_path / "shards")
    assert main(["sweep", "plan", "--spec", str(spec)]) == 0
    sweep = tmp_path / "sweep"
    assert main(["sweep", "run", "--sweep", str(sweep), "--slurm", "--dry-run", "--variants", "transformer"]) == 0
    script = (sweep / "slurm" / "array.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script and "mag-d16" not in script and "transformer-d32-l2-C6e7" in script
    # the plan counts tokens for one rank per point: a 2-rank layout is refused
    assert main(["sweep", "run", "--sweep", str(sweep), "--slurm", "--dry-run", "slurm.procs_per_node=2"]) == 2


def _local_slurm() -> bool:
    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _local_slurm(), reason="no local Slurm (sbatch/sinfo) on this machine: "
                    "array submission is tested only where slurmctld answers")
def test_slurm_array_runs_the_sweep(tmp_path):
    """Submit the transformer half of the micro sweep as a real job array; every task trains one
    point under torchrun; then a resubmission has nothing left to submit."""
    import time

    spec = write_spec(tmp_path, tmp_path / "shards")
    sweep = tmp_path / "sweep"
    assert main(["sweep", "plan", "--spec", str(spec)]) == 0
    main(["sweep", "run", "--sweep", str(sweep), "--index", "4"])       # one point finished locally
    r = cli("sweep", "run", "--sweep", sweep, "--variants", "transformer", "--slurm", "slurm.time=00:10:00",
            "slurm.max_parallel=3")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout.strip().splitlines()[-1])["job_id"]
    submitted = json.loads((sweep / "slurm" / "submitted.json").read_text())
    assert job and submitted["array_task_to_point"] == [p.name for p in load_plan(sweep).points[5:8]]
    deadline = time.time() + 300
    while time.time() < deadline:
        rows = read_results(cli("sweep", "collect", "--sweep", sweep) and sweep / "results.csv")
        if all(r["status"] == "done" for r in rows[4:]):
            break
        time.sleep(2)
    assert all(r["status"] == "done" and r["val_loss"] > 0 for r in rows[4:]), rows
    assert all(r["status"] == "pending" for r in rows[:4])
    r = cli("sweep", "run", "--sweep", sweep, "--variants", "transformer", "--slurm")
    assert r.returncode == 2 and "no points to submit" in r.stderr


# ----------------------------------------------------------------------------- errors


def test_bad_specs_fail_in_one_line(tmp_path, capsys):
    def err(*args) -> str:
        capsys.readouterr()
        assert main([*map(str, args)]) == 2
        e = capsys.readouterr().err.strip()
        assert "\n" not in e and "Traceback" not in e, e
        return e

    spec = write_spec(tmp_path, tmp_path / "shards")
    assert "did you mean 'sizes.head_dim'" in err("sweep", "plan", "--spec", spec, "sizes.heads_dim=8")
    assert "unknown mixer 'mog'" in err("sweep", "plan", "--spec", spec, 'sweep.variants=["mog"]')
    assert "set per point" in err("sweep", "plan", "--spec", spec, 'sweep.overrides=["optim.lr=1e-3"]')
    assert "budgets.flops" in err("sweep", "plan", "--spec", spec, "budgets.flops=[]")
    assert "head_dim=8 must divide" in err("sweep", "plan", "--spec", spec, "sizes.d_model=[16, 20]")
    assert "no plan.json" in err("sweep", "run", "--sweep", tmp_path / "nowhere")
    assert main(["sweep", "plan", "--spec", str(spec)]) == 0
    assert "different plan" in err("sweep", "plan", "--spec", spec, "lr.base=1e-2")
    assert main(["sweep", "plan", "--spec", str(spec), "lr.base=1e-2", "--force"]) == 0
    assert "--variants: 'mac' is not in this sweep" in err("sweep", "run", "--sweep", tmp_path / "sweep",
                                                           "--variants", "mac")
    assert "sweep collect" in err("sweep", "fit", "--sweep", tmp_path / "sweep")
    assert len(load_plan(tmp_path / "sweep").points) == 8
