"""The sbatch scripts come from the templates in slurm/: `titans-scale slurm submit --dry-run`
prints exactly slurm/train.sbatch (slurm/sweep_array.sbatch for a job array) filled with the
run's values. The templates are read from the repository's files and filled here, by a renderer
of this test's own, with values written out by hand; the installed package ships the same files."""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY
from titans_scale.cli import main
from titans_scale.errors import TitansError
from titans_scale.launcher.slurm import fill
from titans_scale.launcher.torchrun import AGENT_MODULE

SLURM = ROOT / "slurm"

TORCHRUN_ARGS = ('--nnodes=1 --nproc-per-node=2 \\\n'
                 '    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID" \\\n'
                 '    --max-restarts=0 --log-dir="$LOG_DIR" --redirects=3 --tee=3 \\\n'
                 '    -m titans_scale.launcher.worker "${TRAIN_ARGS[@]}"')


def render(name: str, values: dict[str, str]) -> str:
    """The template file filled in: a line holding only {{name}} becomes the value's lines (none
    when it is empty), any other {{name}} the value; every value is used exactly once."""
    unused = dict(values)
    out = []
    for line in (SLURM / name).read_text(encoding="utf-8").splitlines():
        if re.fullmatch(r"\{\{\w+\}\}", line):
            out += unused.pop(line[2:-2]).splitlines()
            continue
        for key in re.findall(r"\{\{(\w+)\}\}", line):
            line = line.replace("{{" + key + "}}", unused.pop(key))
        out.append(line)
    assert not unused, f"values without a placeholder in slurm/{name}: {sorted(unused)}"
    return "\n".join(out) + "\n"


def dry_run(capsys, *args) -> str:
    assert main(["slurm", "submit", "--config", str(TINY), "--dry-run", *map(str, args)]) == 0
    return capsys.readouterr().out


def common_values(run: Path, workdir: Path) -> dict[str, str]:
    """The values of a 1 node x 2 CPU ranks job of the tiny config, one thread per rank."""
    return {
        "layout": "1 node(s) x 2 CPU rank(s) = 2 ranks: TP=1 PP=1 CP=1 DP=2",
        "python": shlex.quote(sys.executable),
        "train_args": f"train --config {run}/slurm/job.toml",
        "workdir": str(workdir),
        "threads_per_rank": "1",
        "thread_env": "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DS_ACCELERATOR=cpu",
        "log_prefix": "'[rank${rank}]:'",
        "procs_per_node": "2", "kind": "CPU", "world_size": "2",
        "srun_options": "--nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=2 --kill-on-bad-exit=1",
        "torchrun_args": TORCHRUN_ARGS,
    }


def test_submit_prints_the_train_template_filled_with_the_runs_values(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "r"
    script = dry_run(capsys, "--procs-per-node", 2, "--partition", "p q", "--time", "00:10:00",
                     f"train.run_dir={run}")
    expected = render("train.sbatch", {
        **common_values(run, tmp_path),
        "requeue_note": "# Preemption: every rank gets SIGUSR1 120 s before the time limit (and on\n"
                        "# `scancel --signal=USR1 <id>`); it finishes its step, the run checkpoints, rank 0 runs\n"
                        "# `scontrol requeue`, and the requeued job resumes from the newest checkpoint.",
        "sbatch_options": "\n".join([
            "#SBATCH --job-name=titans-r", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
            "#SBATCH --cpus-per-task=2", '#SBATCH "--partition=p q"', "#SBATCH --time=00:10:00",
            f"#SBATCH --output={run}/slurm/job-%j.out", "#SBATCH --open-mode=append",
            "#SBATCH --signal=USR1@120", "#SBATCH --requeue"]),
        "run_dir": str(run),
        "rank_env": "PYTHONUNBUFFERED=1 TITANS_NO_PROGRESS=1 TITANS_SLURM_REQUEUE=1",
    })
    assert script == expected


def test_sweep_prints_the_array_template_and_an_empty_block_drops_its_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "points.txt"
    sweep.write_text("optim.lr=1e-3\noptim.lr=3e-3 'data.shard_dir=a b'\n")
    run = tmp_path / "sw"
    script = dry_run(capsys, "--procs-per-node", 2, "--no-requeue", "--sweep", sweep, f"train.run_dir={run}")
    expected = render("sweep_array.sbatch", {
        **common_values(run, tmp_path),
        "points_count": "2",
        "requeue_note": "",                                      # --no-requeue: the line goes
        "sbatch_options": "\n".join([
            "#SBATCH --job-name=titans-sw", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
            "#SBATCH --cpus-per-task=2", "#SBATCH --array=0-1",
            f"#SBATCH --output={run}/slurm/job-%A_%a.out", "#SBATCH --open-mode=append"]),
        "points": "\n".join([
            f"    0) RUN_DIR={run}/sweep_000; POINT=(optim.lr=1e-3 train.run_dir={run}/sweep_000) ;;",
            f"    1) RUN_DIR={run}/sweep_001; POINT=(optim.lr=3e-3 'data.shard_dir=a b' "
            f"train.run_dir={run}/sweep_001) ;;"]),
        "rank_env": "PYTHONUNBUFFERED=1 TITANS_NO_PROGRESS=1",
    })
    assert script == expected


def test_template_syntax_inside_a_value_is_not_expanded(capsys, tmp_path):
    script = dry_run(capsys, "--job-name", "a {{python}} b", f"train.run_dir={tmp_path}/r")
    assert '#SBATCH "--job-name=a {{python}} b"' in script


def test_fill_refuses_a_template_and_values_that_disagree():
    assert fill("a {{x}}\n{{block}}\nb\n", {"x": "1", "block": ""}) == "a 1\nb\n"
    with pytest.raises(TitansError, match=r"no value for \['y'\]"):
        fill("{{x}} {{y}}", {"x": "1"})
    with pytest.raises(TitansError, match=r"no placeholder for \['z'\]"):
        fill("{{x}}", {"x": "1", "z": "2"})


@pytest.mark.parametrize("name", ["train.sbatch", "sweep_array.sbatch"])
def test_templates_ship_in_the_package_and_run_the_agent(name):
    installed = resources.files("titans_scale.slurm").joinpath(name).read_text(encoding="utf-8")
    assert installed == (SLURM / name).read_text(encoding="utf-8")
    assert f'"$PYTHON" -m {AGENT_MODULE} \\\n' in installed          # the module torchrun.py names
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["titans_scale.slurm"] == "slurm"
    assert any(Path(name).match(g) for g in setuptools["package-data"]["titans_scale.slurm"])
