"""The sbatch script for a training job, and its submission.

One Slurm task per node runs the torchrun agent (titans_scale.launcher.torchrun), which starts
that node's ranks; the agents meet at a c10d rendezvous served by the first node of the
allocation. The script is meant to be read and edited by a person: `#SBATCH` options first,
then plain variables, then one srun line.

Every value that comes from the user (job name, paths, overrides, extra sbatch options) is
quoted: shell words with shlex.quote, `#SBATCH` values with sbatch's own rules (double quotes,
backslash escapes; a newline is refused, since it would end the comment and start a command).
The only unquoted text is shell code written here (class Shell), such as "$HEAD_NODE:$RDZV_PORT".
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

from titans_scale.errors import ConfigError, TitansError
from titans_scale.launcher.env import rank_env
from titans_scale.launcher.layout import ProcessGrid
from titans_scale.launcher.requeue import REQUEUE_ENV
from titans_scale.launcher.shell import Shell, command, word
from titans_scale.launcher.torchrun import AGENT_MODULE, Rendezvous, TorchrunCommand

RDZV_PORT_BASE = 29500       # + job id % 1000: below Linux's ephemeral ports (32768+)


class SlurmError(TitansError):
    """sbatch is missing or refused the job."""


@dataclass(frozen=True)
class SweepPoint:
    """One task of a job array: its run folder and its overrides on top of the job's config."""

    run_dir: str
    overrides: list[str]


@dataclass(frozen=True)
class SlurmJob:
    grid: ProcessGrid
    job_name: str
    run_dir: str                 # absolute: the slurm/ and logs/ folders live here
    workdir: str                 # absolute: the script cd's here, so relative data paths resolve
    config: str                  # absolute path of the frozen config the job trains
    train_args: list[str] = field(default_factory=list)   # more `titans-scale train` arguments
    python: str = sys.executable
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None      # None: ranks per node x threads per rank
    threads_per_rank: int = 1
    signal_lead_s: int = 120              # SIGUSR1 this long before the time limit
    requeue: bool = True
    sbatch_args: list[str] = field(default_factory=list)  # extra options, e.g. "--mem=0"
    sweep: list[SweepPoint] = field(default_factory=list)  # non-empty: a job array
    array_limit: int | None = None        # at most this many array tasks at once

    @property
    def output(self) -> str:
        """The job's combined log (Slurm's --output), every rank and every requeue appended."""
        pattern = "job-%A_%a.out" if self.sweep else "job-%j.out"
        return f"{_slurm_filename(self.run_dir)}/slurm/{pattern}"


# ------------------------------------------------------------------------------ quoting

_SAFE_DIRECTIVE = re.compile(r"[A-Za-z0-9_.,:/=@%+-]*")


def _slurm_filename(path: str) -> str:
    """A path inside --output: '%' starts a Slurm filename pattern, '%%' is a literal '%'."""
    return path.replace("%", "%%")


def directive(option: str, value: str | int | None = None) -> str:
    """One `#SBATCH` line, quoted for sbatch's parser (not for bash: to bash it is a comment)."""
    text = option if value is None else f"{option}={value}"
    if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in text):
        raise ConfigError(f"sbatch option {option!r}: control characters or newlines cannot go into "
                          "an #SBATCH line; remove them")
    if _SAFE_DIRECTIVE.fullmatch(text):
        return f"#SBATCH {text}"
    return '#SBATCH "' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _assign(name: str, value: str) -> str:
    return f"{name}={word(value)}"


def _array(name: str, words: list[str]) -> str:
    return f"{name}=(" + " ".join(map(word, words)) + ")"


# ------------------------------------------------------------------------------ render


def _cpus(job: SlurmJob) -> int:
    return job.cpus_per_task or job.grid.nproc_per_node * job.threads_per_rank


def _header(job: SlurmJob) -> list[str]:
    grid = job.grid
    cpus = _cpus(job)
    d = [directive("--job-name", job.job_name), directive("--nodes", grid.nnodes),
         directive("--ntasks-per-node", 1)]
    if grid.gpu:
        d.append(directive("--gpus-per-node", grid.nproc_per_node))
    d.append(directive("--cpus-per-task", cpus))
    for opt, val in (("--partition", job.partition), ("--account", job.account),
                     ("--qos", job.qos), ("--time", job.time)):
        if val:
            d.append(directive(opt, val))
    if job.sweep:
        limit = f"%{job.array_limit}" if job.array_limit else ""
        d.append(directive("--array", f"0-{len(job.sweep) - 1}{limit}"))
    d += [directive("--output", job.output), directive("--open-mode", "append")]
    if job.requeue:
        d += [directive("--signal", f"USR1@{job.signal_lead_s}"), directive("--requeue")]
    for extra in job.sbatch_args:
        if not extra.startswith("-"):
            raise ConfigError(f"--sbatch-arg {extra!r}: must be an sbatch option such as --mem=0")
        d.append(directive(extra))
    return d


def render_sbatch(job: SlurmJob) -> str:
    grid = job.grid
    kind = "GPU" if grid.gpu else "CPU"
    env = rank_env(grid.gpu, job.threads_per_rank)
    prefix = env.pop("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE")
    if job.requeue:
        env[REQUEUE_ENV] = "1"
    torchrun = TorchrunCommand(
        grid=grid,
        rdzv=Rendezvous(endpoint=Shell('"$HEAD_NODE:$RDZV_PORT"'), run_id=Shell('"$SLURM_JOB_ID"')),
        log_dir=Shell('"$LOG_DIR"'),
        train_args=[Shell('"${TRAIN_ARGS[@]}"')],
    )
    # --cpus-per-task again: srun does not take it from sbatch on Slurm 22.05-23.02, and a task
    # bound to one CPU would squeeze all of a node's ranks onto it.
    srun = ["srun", f"--nodes={grid.nnodes}", f"--ntasks={grid.nnodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={_cpus(job)}", "--kill-on-bad-exit=1"]
    if grid.gpu:
        srun.append(f"--gpus-per-node={grid.nproc_per_node}")
    srun_line = command([srun, [Shell('"$PYTHON"'), "-m", AGENT_MODULE], *torchrun.groups()])

    out = ["#!/bin/bash",
           f"# titans-scale training: {grid.describe()}.",
           "# Written by `titans-scale slurm submit`; edit it freely and resubmit with `sbatch <this file>`.",
           "# Logs: $RUN_DIR/slurm/job-<id>.out (all ranks, prefixed [rankN]:, requeues appended) and",
           "# $RUN_DIR/logs/job-<id>.<restart>/rank_<N>/{stdout,stderr}.log (one folder per rank)."]
    if job.requeue:
        out += [f"# Preemption: every rank gets SIGUSR1 {job.signal_lead_s} s before the time limit (and on",
                "# `scancel --signal=USR1 <id>`); it finishes its step, the run checkpoints, rank 0 runs",
                "# `scontrol requeue`, and the requeued job resumes from the newest checkpoint."]
    out += _header(job)
    out += ["", "set -euo pipefail", "",
            _assign("PYTHON", job.python)]
    if job.sweep:
        out += ["", "# One sweep point per array task: its run folder and its overrides.",
                'case "$SLURM_ARRAY_TASK_ID" in']
        for i, p in enumerate(job.sweep):
            out.append(f"    {i}) {_assign('RUN_DIR', p.run_dir)}; {_array('POINT', p.overrides)} ;;")
        out += ['    *) echo "no sweep point for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac",
                _array("TRAIN_ARGS", ["train", "--config", job.config, *job.train_args,
                                      Shell('"${POINT[@]}"')])]
    else:
        out += [_assign("RUN_DIR", job.run_dir),
                _array("TRAIN_ARGS", ["train", "--config", job.config, *job.train_args])]
    out += [f"cd {word(job.workdir)}",
            "",
            f"# Every rank: {job.threads_per_rank} CPU thread(s); NCCL on GPUs, gloo on CPUs "
            "(the trainer picks), no progress bars.",
            "export " + " ".join(_assign(k, env.pop(k)) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                                   "DS_ACCELERATOR")),
            "export " + " ".join(_assign(k, v) for k, v in env.items()),
            "# torchrun prefixes each console line with the global rank (it substitutes ${rank} itself).",
            f"export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE={shlex.quote(prefix)}",
            "",
            "# The first node of the allocation serves the rendezvous; a port from the job id keeps",
            "# two jobs on one node apart. Each run of the job (requeues too) logs to its own folder.",
            # sed, not head: it reads all input, so scontrol never gets SIGPIPE (fatal under pipefail)
            'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
            f"RDZV_PORT=$(({RDZV_PORT_BASE} + SLURM_JOB_ID % 1000))",
            'LOG_DIR="$RUN_DIR/logs/job-$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}"',
            'mkdir -p "$LOG_DIR"',
            'echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST:'
            ' rendezvous $HEAD_NODE:$RDZV_PORT, logs $LOG_DIR"',
            "",
            f"# One task per node: torchrun starts the node's {grid.nproc_per_node} {kind} rank(s) "
            f"and joins the rendezvous ({grid.world_size} ranks in all).",
            srun_line,
            ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------ submit


def submit(script: str, sbatch: str = "sbatch") -> str:
    """Submit a script file with sbatch; returns the job id Slurm printed."""
    try:
        r = subprocess.run([sbatch, "--parsable", script], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError(f"'{sbatch}' not found: submit from a Slurm login node, or use --dry-run "
                         "to print the script") from None
    except subprocess.TimeoutExpired:
        raise SlurmError("sbatch did not answer within 120 s: is slurmctld reachable?") from None
    if r.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {(r.stderr or r.stdout).strip()[:400]}")
    job_id = r.stdout.strip().split(";")[0]        # --parsable prints "<id>[;<cluster>]"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed {r.stdout.strip()!r}, not a job id")
    return job_id
