"""The rendered launch lines: the 4 nodes x 8 GPUs TP=8 PP=2 DP=2 sbatch script line by line,
quoting that survives hostile job names, paths and overrides (bash -n, then a run under a fake
srun), job arrays, the torchrun line of `titans-scale launch`, and the requeue hook."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import TINY, fake_slurm_bin, read_argv
from titans_scale.cli import main


def dry_run(capsys, *args) -> str:
    args = [*map(str, args)]
    assert main(args if "--dry-run" in args else [*args, "--dry-run"]) == 0
    return capsys.readouterr().out


def run_under_fake_srun(script: str, tmp: Path, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run a rendered script with bash, fake srun/scontrol first on PATH; returns srun's argv."""
    bin_dir = fake_slurm_bin(tmp / "fakebin")
    path = tmp / "job.sbatch"
    path.write_text(script)
    out = tmp / "srun.args"
    out.unlink(missing_ok=True)
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SRUN_ARGS": str(out),
            "FAKE_SCONTROL_ARGS": str(tmp / "scontrol.args"), "SLURM_JOB_ID": "123",
            "SLURM_JOB_NODELIST": "gpu[001-004]", **env}
    r = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=full, cwd=tmp, timeout=60)
    return r, (read_argv(out) if out.exists() else [])


def bash_n(script: str, tmp: Path) -> None:
    p = tmp / "check.sbatch"
    p.write_text(script)
    r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def srun_command(script: str) -> str:
    """The srun command of a script with its line continuations joined."""
    joined = script.replace(" \\\n    ", " ")
    (line,) = [ln for ln in joined.splitlines() if ln.startswith("srun ")]
    return line


# ----------------------------------------------------------------------------- 4 x 8 GPUs


def test_four_nodes_eight_gpus_tp8_pp2_dp2(capsys, tmp_path):
    run = tmp_path / "runs" / "big"
    script = dry_run(capsys, "slurm", "submit", "--config", TINY, "--nodes", 4, "--gpus-per-node", 8,
                     "--partition", "gpu", "--account", "proj", "--qos", "high", "--time", "04:00:00",
                     "--cpus-per-task", 64, "model.d_model=256", "model.n_heads=8", "parallel.tp=8", "parallel.pp=2",
                     f"train.run_dir={run}")
    bash_n(script, tmp_path)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "4 node(s) x 8 GPU rank(s) = 32 ranks: TP=8 PP=2 CP=1 DP=2" in lines[1]
    sbatch = [ln for ln in lines if ln.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=titans-big",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=64",
        "#SBATCH --mem=0",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --time=04:00:00",
        f"#SBATCH --output={run}/slurm/job-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue",
    ]
    assert "export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DS_ACCELERATOR=cuda" in lines
    assert "export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE='[rank${rank}]:'" in lines
    assert any(ln.startswith("export ") and "TITANS_SLURM_REQUEUE=1" in ln for ln in lines)
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in lines
    assert "RDZV_PORT=$((29500 + SLURM_JOB_ID % 1000))" in lines
    assert f"TRAIN_ARGS=(train --config {run}/slurm/job.toml)" in lines
    assert srun_command(script) == (
        'srun --nodes=4 --ntasks=4 --ntasks-per-node=1 --cpus-per-task=64 --kill-on-bad-exit=1 '
        '--gpus-per-node=8 '
        '"$PYTHON" -m titans_scale.launcher.torchrun '
        '--nnodes=4 --nproc-per-node=8 '
        '--rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID" '
        '--max-restarts=0 --log-dir="$LOG_DIR" --redirects=3 --tee=3 '
        '-m titans_scale.launcher.worker "${TRAIN_ARGS[@]}"')

    # What srun really receives once bash has expanded it (job 123 on gpu[001-004]).
    r, argv = run_under_fake_srun(script, tmp_path)
    assert r.returncode == 0, r.stderr
    i = argv.index("-m")
    assert argv[:i - 1] == ["--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--cpus-per-task=64",
                            "--kill-on-bad-exit=1", "--gpus-per-node=8"]
    assert Path(argv[i - 1]).name.startswith("python")                 # "$PYTHON", the submitting venv
    assert argv[i:] == [
        "-m", "titans_scale.launcher.torchrun", "--nnodes=4", "--nproc-per-node=8",
        "--rdzv-backend=c10d", "--rdzv-endpoint=gpu001:29623", "--rdzv-id=123",
        "--max-restarts=0", f"--log-dir={run}/logs/job-123.0", "--redirects=3", "--tee=3",
        "-m", "titans_scale.launcher.worker", "train", "--config", f"{run}/slurm/job.toml"]
    assert (run / "logs" / "job-123.0").is_dir()


def test_cpu_job_has_no_gpu_request_and_gloo_env(capsys, tmp_path):
    script = dry_run(capsys, "slurm", "submit", "--config", TINY, "--nodes", 2, "--procs-per-node", 2,
                     "--threads-per-rank", 3, "--no-requeue", f"train.run_dir={tmp_path}/r")
    assert "gpus-per-node" not in script and "--signal" not in script and "--requeue" not in script
    assert "#SBATCH --cpus-per-task=6" in script
    assert "export OMP_NUM_THREADS=3 MKL_NUM_THREADS=3 DS_ACCELERATOR=cpu" in script
    assert "TITANS_SLURM_REQUEUE" not in script
    assert "--cpus-per-task=6 " in srun_command(script) and "--nnodes=2 --nproc-per-node=2" in srun_command(script)


@pytest.mark.parametrize("args, needle", [
    (["--nodes", "3", "--gpus-per-node", "8", "parallel.tp=8", "parallel.pp=2"], "--nodes 3 x --gpus-per-node 8"),
    (["--nodes", "4", "--gpus-per-node", "8", "model.d_model=128", "model.n_heads=4", "parallel.tp=8",
      "parallel.pp=2"], "model.n_heads=4"),
    (["--nodes", "1", "--procs-per-node", "4", "parallel.pp=4", 'model.layers=["swa","mag"]'], "parallel.pp*vpp"),
    (["--nodes", "1", "--procs-per-node", "3", "parallel.tp=2"], "--procs-per-node 3"),
    (["--nodes", "0"], "--nodes"),
    (["--gpus-per-node", "8", "--procs-per-node", "4"], "--procs-per-node 4"),
    (["--job-name", "two\nlines"], "--job-name"),
    (["--sbatch-arg", "mem=0"], "--sbatch-arg"),
    (["--sweep", "/nonexistent/sweep.txt"], "--sweep"),
    (["parallel.tq=2"], "parallel.tq"),
    (["--threads-per-rank", "0"], "--threads-per-rank"),
])
def test_bad_layouts_and_arguments_are_one_line(capsys, tmp_path, args, needle):
    assert main(["slurm", "submit", "--config", str(TINY), "--dry-run", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("titans-scale slurm: error:") and needle in err[0], err


# ----------------------------------------------------------------------------- quoting


def test_hostile_names_paths_and_overrides_cannot_run_commands(capsys, tmp_path):
    canary = tmp_path / "INJECTED"
    inject = f"$(touch {canary})`touch {canary}`;touch {canary};'\"&&touch {canary} #"
    run = tmp_path / f"run dir {inject}"
    shard = f"/data/shards {inject}"
    job_name = f"my job {inject}"
    extra = f"--comment=note {inject}"
    script = dry_run(capsys, "slurm", "submit", "--config", TINY, "--procs-per-node", 2,
                     "--job-name", job_name, "--partition", "p q", "--sbatch-arg", extra,
                     f"data.shard_dir={shard}", f"train.run_dir={run}")
    bash_n(script, tmp_path)
    # #SBATCH lines are bash comments; sbatch reads them with its own quoting rules
    assert '#SBATCH "--job-name=' + job_name.replace("\\", "\\\\").replace('"', '\\"') + '"' in script
    assert '#SBATCH "--partition=p q"' in script

    r, argv = run_under_fake_srun(script, tmp_path)
    assert r.returncode == 0, r.stderr
    assert not canary.exists(), "a rendered value ran a command"
    assert f"--log-dir={run}/logs/job-123.0" in argv            # the path arrived as one word, intact
    assert argv[-3:] == ["train", "--config", f"{run}/slurm/job.toml"]
    assert (run / "logs" / "job-123.0").is_dir()


def test_submit_writes_script_and_frozen_config_and_overrides_stay_words(tmp_path, monkeypatch, capsys):
    """Without --dry-run the script and config land in <run_dir>/slurm/ (sbatch faked here)."""
    canary = tmp_path / "INJECTED"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\nprintf "%s\\0" "$@" > {tmp_path}/sbatch.args\necho "4242;cl"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    run = tmp_path / "r x"
    assert main(["slurm", "submit", "--config", str(TINY), f"train.run_dir={run}",
                 f"data.shard_dir=s; touch {canary}"]) == 0
    out = capsys.readouterr().out
    assert '"job_id": "4242"' in out and f"{run}/slurm/job-4242.out" in out
    script = run / "slurm" / "job.sbatch"
    assert read_argv(tmp_path / "sbatch.args") == ["--parsable", str(script)]
    frozen = (run / "slurm" / "job.toml").read_text()
    assert f'shard_dir = "s; touch {canary}"' in frozen and f'run_dir = "{run}"' in frozen
    assert not canary.exists()


def test_sweep_renders_a_job_array_and_each_task_gets_its_overrides(capsys, tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# learning rates\noptim.lr=1e-3\n\noptim.lr=3e-3 'data.shard_dir=a b;c'  # quoted\n"
                     f"optim.lr=1e-2 train.run_dir={tmp_path}/own\n")
    run = tmp_path / "sw"
    script = dry_run(capsys, "slurm", "submit", "--config", TINY, "--sweep", sweep, "--array-limit", 2,
                     f"train.run_dir={run}")
    bash_n(script, tmp_path)
    assert "#SBATCH --array=0-2%2" in script and f"#SBATCH --output={run}/slurm/job-%A_%a.out" in script
    r, argv = run_under_fake_srun(script, tmp_path, SLURM_ARRAY_TASK_ID="1")
    assert r.returncode == 0, r.stderr
    assert argv[-6:] == ["train", "--config", f"{run}/slurm/job.toml", "optim.lr=3e-3", "data.shard_dir=a b;c",
                         f"train.run_dir={run}/sweep_001"]
    assert f"--log-dir={run}/sweep_001/logs/job-123.0" in argv
    r, argv = run_under_fake_srun(script, tmp_path, SLURM_ARRAY_TASK_ID="2")
    assert argv[-2:] == ["optim.lr=1e-2", f"train.run_dir={tmp_path}/own"]
    r, argv = run_under_fake_srun(script, tmp_path, SLURM_ARRAY_TASK_ID="7")
    assert r.returncode == 2 and argv == [] and "no sweep point" in r.stderr


def test_sweep_line_with_a_bad_key_names_it(capsys, tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("optim.lr=1e-3\noptim.lrr=2\n")
    assert main(["slurm", "submit", "--config", str(TINY), "--sweep", str(sweep), "--dry-run"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


# ----------------------------------------------------------------------------- launch


def test_launch_dry_run_prints_the_torchrun_line(capsys, tmp_path):
    out = dry_run(capsys, "launch", "--config", TINY, "--cpu", "--nproc-per-node", 2, "--dry-run",
                  f"train.run_dir={tmp_path}/r", "train.steps=3")
    head, line = out.strip().splitlines()
    assert head == "# 1 node(s) x 2 CPU rank(s) = 2 ranks: TP=1 PP=1 CP=1 DP=2"
    assert line.startswith("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DS_ACCELERATOR=cpu ")
    assert re.search(r" -m titans_scale\.launcher\.torchrun --nnodes=1 --nproc-per-node=2 --standalone "
                     rf"--max-restarts=0 --log-dir={tmp_path}/r/logs/launch-\d{{8}}-\d{{6}} --redirects=3 --tee=3 "
                     rf"-m titans_scale\.launcher\.worker train --config {TINY} train\.run_dir={tmp_path}/r "
                     r"train\.steps=3$", line), line

    out = dry_run(capsys, "launch", "--config", TINY, "--cpu", "--nnodes", 2, "--rdzv-endpoint", "node1:29400",
                  "--dry-run", f"train.run_dir={tmp_path}/r", "parallel.tp=1")
    assert "--nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=node1:29400 --rdzv-id=titans-" in out

    assert main(["launch", "--config", str(TINY), "--nnodes", "2", "--dry-run"]) == 2
    assert "--rdzv-endpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- requeue, logs


def test_requeue_only_from_rank_zero_of_our_slurm_jobs(tmp_path):
    from titans_scale.launcher.requeue import requeue_after_preemption

    bin_dir = fake_slurm_bin(tmp_path / "bin")
    args = tmp_path / "scontrol.args"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SCONTROL_ARGS": str(args)}
    ours = {**env, "SLURM_JOB_ID": "77", "TITANS_SLURM_REQUEUE": "1"}
    assert requeue_after_preemption({**ours, "RANK": "0"}) == 0
    assert read_argv(args) == ["requeue", "77"]
    args.unlink()
    assert requeue_after_preemption({**ours, "RANK": "1"}) == 0                  # other ranks just exit
    assert requeue_after_preemption({**env, "SLURM_JOB_ID": "77"}) == 0          # not our script
    assert requeue_after_preemption({k: v for k, v in ours.items() if k != "SLURM_JOB_ID"}) == 0
    assert not args.exists()
    assert requeue_after_preemption({**ours, "FAKE_SCONTROL_RC": "1"}) == 1      # requeue refused
    assert requeue_after_preemption({**ours, "PATH": str(tmp_path / "nowhere")}) == 1   # no scontrol


def test_worker_links_each_rank_log_under_its_global_rank(tmp_path):
    from titans_scale.launcher.worker import link_rank_logs

    folder = tmp_path / "logs" / "run_abc" / "attempt_0" / "3"
    folder.mkdir(parents=True)
    (folder / "stdout.log").write_text("hello\n")
    link = link_rank_logs({"TORCHELASTIC_ERROR_FILE": str(folder / "error.json"), "RANK": "11",
                           "WORLD_SIZE": "16"})
    assert link == tmp_path / "logs" / "rank_11" and (link / "stdout.log").read_text() == "hello\n"
    assert os.readlink(link) == "run_abc/attempt_0/3"                    # relative: the folder can move
    assert link_rank_logs({"RANK": "0"}) is None                         # not under torchrun
    assert link_rank_logs({"TORCHELASTIC_ERROR_FILE": str(tmp_path / "x" / "error.json"), "RANK": "0"}) is None
