"""The sbatch script for a training job, and its submission.

One Slurm task per node runs the torchrun agent (titans_scale.launcher.torchrun), which starts
that node's ranks; the agents meet at a c10d rendezvous served by the first node of the
allocation. The script's text is a template, slurm/train.sbatch (slurm/sweep_array.sbatch for a
job array), meant to be read and edited by a person: `#SBATCH` options first, then plain
variables, then one srun line. This module computes the values it fills in.

Every value that comes from the user (job name, paths, overrides, extra sbatch options) is
quoted: shell words with shlex.quote, `#SBATCH` values with sbatch's own rules (double quotes,
backslash escapes; a newline is refused, since it would end the comment and start a command).
The only unquoted text is shell code written here (class Shell), such as "$HEAD_NODE:$RDZV_PORT".
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources

from titans_scale.errors import ConfigError, TitansError
from titans_scale.launcher.env import rank_env
from titans_scale.launcher.layout import ProcessGrid
from titans_scale.launcher.requeue import REQUEUE_ENV
from titans_scale.launcher.shell import Shell, command, word
from titans_scale.launcher.torchrun import Rendezvous, TorchrunCommand


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
    mem: str | None = None                # --mem per node; None: 0 (the node's memory) on GPUs, Slurm's default on CPUs
    threads_per_rank: int = 1
    signal_lead_s: int = 120              # SIGUSR1 this long before the time limit
    requeue: bool = True
    sbatch_args: list[str] = field(default_factory=list)  # extra options, e.g. "--exclusive"
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


def _words(words: list[str]) -> str:
    return " ".join(map(word, words))


def _array(name: str, words: list[str]) -> str:
    return f"{name}=({_words(words)})"


# ------------------------------------------------------------------------------ render

# The templates (slurm/ in the repository, installed as titans_scale.slurm; syntax in
# slurm/README.md): `{{name}}` is replaced by a value already quoted for where it stands, and a
# line holding only `{{name}}` by the value's lines, or by nothing when the value is empty.
_PLACEHOLDER = re.compile(r"^\{\{(?P<line>\w+)\}\}\n|\{\{(?P<name>\w+)\}\}", re.M)


def template_text(name: str) -> str:
    return resources.files("titans_scale.slurm").joinpath(name).read_text(encoding="utf-8")


def fill(template: str, values: dict[str, str]) -> str:
    """The template with its placeholders replaced in one pass (a value that itself holds
    `{{x}}` stays as it is). Every placeholder needs a value and every value a placeholder."""
    used = {m["line"] or m["name"] for m in _PLACEHOLDER.finditer(template)}
    if used != set(values):
        raise TitansError(f"sbatch template and renderer disagree: no value for {sorted(used - set(values))}, "
                          f"no placeholder for {sorted(set(values) - used)}")

    def one(m: re.Match) -> str:
        if m["line"]:
            value = values[m["line"]]
            return value + "\n" if value else ""
        return values[m["name"]]
    return _PLACEHOLDER.sub(one, template)


def _cpus(job: SlurmJob) -> int:
    return job.cpus_per_task or job.grid.nproc_per_node * job.threads_per_rank


_MEM = re.compile(r"\d+[KMGT]?")


def _mem(job: SlurmJob) -> str | None:
    """The job's --mem: given, or 0 (all of each node's memory) for GPU jobs, whose ranks each
    hold a host copy of the model and pinned batches (Slurm's per-CPU default is often a few GB)."""
    given = any(a.split("=")[0] == "--mem" for a in job.sbatch_args)
    if job.mem is not None:
        if not _MEM.fullmatch(job.mem):
            raise ConfigError(f"--mem {job.mem!r}: a size per node such as 64G, 200000 (MB) or 0 (the node's memory)")
        if given:
            raise ConfigError("--mem is given twice (--mem and --sbatch-arg=--mem=...); keep one")
        return job.mem
    return "0" if job.grid.gpu and not given else None


def _directives(job: SlurmJob) -> list[str]:
    grid = job.grid
    cpus = _cpus(job)
    d = [directive("--job-name", job.job_name), directive("--nodes", grid.nnodes),
         directive("--ntasks-per-node", 1)]
    if grid.gpu:
        d.append(directive("--gpus-per-node", grid.nproc_per_node))
    d.append(directive("--cpus-per-task", cpus))
    mem = _mem(job)
    if mem is not None:
        d.append(directive("--mem", mem))
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


def _exports(env: dict[str, str]) -> str:
    return " ".join(_assign(k, v) for k, v in env.items())


def template_values(job: SlurmJob) -> dict[str, str]:
    """Every placeholder of the job's template, quoted for its place in the script."""
    grid = job.grid
    env = rank_env(grid.gpu, job.threads_per_rank)
    prefix = env.pop("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE")
    threads = {k: env.pop(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DS_ACCELERATOR")}
    if job.requeue:
        env[REQUEUE_ENV] = "1"
    torchrun = TorchrunCommand(
        grid=grid,
        rdzv=Rendezvous(endpoint=Shell('"$HEAD_NODE:$RDZV_PORT"'), run_id=Shell('"$SLURM_JOB_ID"')),
        log_dir=Shell('"$LOG_DIR"'),
        train_args=[Shell('"${TRAIN_ARGS[@]}"')],
    )
    srun = [f"--nodes={grid.nnodes}", f"--ntasks={grid.nnodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={_cpus(job)}", "--kill-on-bad-exit=1"]
    if grid.gpu:
        srun.append(f"--gpus-per-node={grid.nproc_per_node}")
    note = ""
    if job.requeue:
        note = (f"# Preemption: every rank gets SIGUSR1 {job.signal_lead_s} s before the time limit (and on\n"
                "# `scancel --signal=USR1 <id>`); it finishes its step, the run checkpoints, rank 0 runs\n"
                "# `scontrol requeue`, and the requeued job resumes from the newest checkpoint.")
    values = {
        "layout": grid.describe(), "requeue_note": note, "sbatch_options": "\n".join(_directives(job)),
        "python": word(job.python), "train_args": _words(["train", "--config", job.config, *job.train_args]),
        "workdir": word(job.workdir), "threads_per_rank": str(job.threads_per_rank),
        "thread_env": _exports(threads), "rank_env": _exports(env), "log_prefix": word(prefix),
        "procs_per_node": str(grid.nproc_per_node), "kind": "GPU" if grid.gpu else "CPU",
        "world_size": str(grid.world_size), "srun_options": " ".join(srun),
        "torchrun_args": command(torchrun.groups()),
    }
    if job.sweep:
        values["points_count"] = str(len(job.sweep))
        values["points"] = "\n".join(f"    {i}) {_assign('RUN_DIR', p.run_dir)}; {_array('POINT', p.overrides)} ;;"
                                     for i, p in enumerate(job.sweep))
    else:
        values["run_dir"] = word(job.run_dir)
    return values


def render_sbatch(job: SlurmJob) -> str:
    name = "sweep_array.sbatch" if job.sweep else "train.sbatch"
    return fill(template_text(name), template_values(job))


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
