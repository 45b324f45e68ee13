"""What the fault tests share: the micro run's config, running it (killed or not), and the checks
(an exact resume; a clean refusal that changed nothing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import ENV, ROOT, TORCHRUN, cli, micro_config, tree_sha, write_config
from titans_scale.train.metrics import read_metrics

MICRO_STEPS = 12                 # checkpoints at 4, 8, 12 (two kept), eval at 6 and 12
KILLED = -signal.SIGKILL


def write_run(tmp: Path, shards: Path, name: str, steps: int = MICRO_STEPS, **sections: dict) -> Path:
    """<tmp>/<name>.toml: the micro run for `steps` steps into <tmp>/<name> (sections: micro_config's)."""
    train = {"steps": steps, **sections.pop("train", {})}
    return write_config(tmp / f"{name}.toml", micro_config(shards, tmp / name, train=train, **sections))


def train_command(cfg: Path, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "titans_scale.cli", "train", "--config", str(cfg)]
    return [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m", "titans_scale.cli", "train",
            "--config", str(cfg)]


class Launch:
    """A training command in its own process group (torchrun, its ranks and whatever they spawn:
    a rank killed -9 orphans its multiprocessing helpers, which would hold our pipes open), its
    stderr in a file. Leaving the block kills whatever of the group is left."""

    def __init__(self, cfg: Path, nproc: int = 1, env: dict | None = None):
        self.err = tempfile.TemporaryFile()
        self.p = subprocess.Popen(train_command(cfg, nproc), cwd=ROOT, env=env or ENV, stdout=subprocess.DEVNULL,
                                  stderr=self.err, start_new_session=True)

    def __enter__(self):
        return self

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = 900) -> int:
        return self.p.wait(timeout)

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")[-4000:]

    def __exit__(self, *exc):
        self.kill()
        self.p.wait()
        self.err.close()


def kill_at(cfg: Path, point: str, step: int, nproc: int = 1) -> None:
    """Train until the process reaches kill point `point` at `step` (io/commit.py) and SIGKILLs itself."""
    with Launch(cfg, nproc, {**ENV, "TITANS_TEST_KILL_AT": f"{point}:{step}"}) as run:
        rc = run.wait()
        # one process: killed by the signal; torchrun: a worker died, the launcher fails
        assert rc == (KILLED if nproc == 1 else 1), f"{point}:{step}: exit {rc}\n{run.stderr()}"


def complete_rows(run: Path, kind: str = "train") -> int:
    """How many whole `kind` rows metrics.jsonl has now (a row being written is not counted)."""
    p = run / "metrics.jsonl"
    text = p.read_text() if p.is_file() else ""
    return sum(f'"kind": "{kind}"' in ln for ln in text.split("\n")[:-1])


def kill_after(cfg: Path, run: Path, rows: int, delay: float, nproc: int = 1) -> None:
    """Start training, SIGKILL it (its whole process group: torchrun and every rank) `delay`
    seconds after its `rows`-th train row: anywhere in a step, an eval or a checkpoint write."""
    with Launch(cfg, nproc) as launch:
        deadline = time.time() + 600
        while complete_rows(run) < rows and launch.p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        alive = launch.p.poll() is None
        launch.kill()
        assert alive, f"the run ended before it could be killed (exit {launch.p.returncode}):\n{launch.stderr()}"


def train(cfg: Path, nproc: int = 1) -> None:
    """Train (or resume) the run of `cfg` to its end."""
    with Launch(cfg, nproc) as run:
        rc = run.wait()
        assert rc == 0, f"training failed: exit {rc}\n{run.stderr()}"


def assert_same_run(run: Path, ref: Path) -> None:
    """Every train and eval row of `run` equals the uninterrupted `ref`'s bit for bit, each step
    once (a replayed step's row replaces the killed run's, issue 22)."""
    for kind, value in (("train", "loss"), ("eval", "val_loss")):
        got, want = read_metrics(run, kind), read_metrics(ref, kind)
        steps = [r["step"] for r in got]
        assert steps == [r["step"] for r in want], f"{kind} rows of steps {steps} (each step once)"
        for g, w in zip(got, want):
            assert g[value] == w[value], f"step {g['step']}: {value} {g[value]!r} != uninterrupted {w[value]!r}"


def refused_cleanly(r: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2, no traceback, and exactly one error line, naming each of `names`; returns it."""
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and '  File "' not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, r.stderr[-3000:]
    for n in names:
        assert str(n) in lines[0], f"{n!r} not named in: {lines[0]}"
    return lines[0]


def refuses(args: list, names: tuple = (), untouched: tuple[Path, ...] = (), **kw) -> str:
    """Run `titans-scale ARGS`; it must refuse cleanly naming `names` and leave every folder or
    file in `untouched` exactly as it was (hashed before and after). Returns the error line."""
    before = [tree_sha(p) if p.is_dir() else (p.read_bytes() if p.exists() else None) for p in untouched]
    line = refused_cleanly(cli(*args, check=False, **kw), *names)
    after = [tree_sha(p) if p.is_dir() else (p.read_bytes() if p.exists() else None) for p in untouched]
    for p, b, a in zip(untouched, before, after):
        assert a == b, f"a refused command changed '{p}'"
    return line
