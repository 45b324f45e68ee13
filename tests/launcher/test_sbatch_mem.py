"""`#SBATCH --mem` in the rendered sbatch scripts (train.sbatch and the sweep's job array): the
node's memory (0) for GPU jobs unless told otherwise, `--mem SIZE` for any job, Slurm's default
for CPU jobs; a malformed size or two --mem requests are one-line errors."""

from __future__ import annotations

import pytest

from tests.helpers import TINY
from titans_scale.cli import main


def sbatch_lines(capsys, tmp_path, *args) -> list[str]:
    assert main(["slurm", "submit", "--config", str(TINY), "--dry-run", *map(str, args),
                 f"train.run_dir={tmp_path}/r"]) == 0
    return [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("#SBATCH")]


def mem_lines(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.startswith("#SBATCH --mem")]


def test_gpu_jobs_ask_for_the_nodes_memory_after_their_cpus(capsys, tmp_path):
    lines = sbatch_lines(capsys, tmp_path, "--gpus-per-node", 2)
    assert mem_lines(lines) == ["#SBATCH --mem=0"]
    assert lines[lines.index("#SBATCH --mem=0") - 1].startswith("#SBATCH --cpus-per-task=")


def test_cpu_jobs_keep_slurms_default(capsys, tmp_path):
    assert mem_lines(sbatch_lines(capsys, tmp_path, "--procs-per-node", 2)) == []


@pytest.mark.parametrize("kind", [["--gpus-per-node", 2], ["--procs-per-node", 2]])
def test_mem_is_configurable(capsys, tmp_path, kind):
    assert mem_lines(sbatch_lines(capsys, tmp_path, *kind, "--mem", "64G")) == ["#SBATCH --mem=64G"]


def test_sweep_array_gets_it_too(capsys, tmp_path):
    points = tmp_path / "points.txt"
    points.write_text("optim.lr=1e-3\n")
    lines = sbatch_lines(capsys, tmp_path, "--gpus-per-node", 2, "--mem", "200000", "--sweep", points)
    assert mem_lines(lines) == ["#SBATCH --mem=200000"] and "#SBATCH --array=0-0" in lines


def test_an_extra_sbatch_mem_replaces_the_default(capsys, tmp_path):
    lines = sbatch_lines(capsys, tmp_path, "--gpus-per-node", 2, "--sbatch-arg=--mem=32G")
    assert mem_lines(lines) == ["#SBATCH --mem=32G"]


@pytest.mark.parametrize("args, needle", [
    (["--mem", "64GB"], "--mem '64GB'"),
    (["--mem", "8G", "--sbatch-arg=--mem=4G"], "--mem is given twice"),
])
def test_bad_mem_is_one_line(capsys, args, needle):
    assert main(["slurm", "submit", "--config", str(TINY), "--dry-run", "--gpus-per-node", "2", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
