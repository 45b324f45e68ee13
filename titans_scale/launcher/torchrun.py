"""The torchrun command line for a layout, and the agent entry it runs.

`python -m titans_scale.launcher.torchrun ARGS` is torchrun (torch.distributed.run) with one
change: SIGUSR1 is ignored by the agent. Slurm sends its preemption / time-limit warning
(`--signal=USR1@T`, `scancel --signal=USR1`) to every process of a job step; torchrun does not
handle SIGUSR1, so it would die at once and Slurm would then kill the ranks mid-checkpoint.
Ignored, the agent keeps waiting while each rank (whose trainer installs its own SIGUSR1 handler)
finishes its step, writes a checkpoint and exits. The ignored disposition is inherited by the
ranks' helper processes too, which is what we want: only the trainer acts on the warning.
SIGTERM keeps torchrun's own handling: it is forwarded to the ranks, which also checkpoint on it.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field

from titans_scale.launcher.layout import ProcessGrid
from titans_scale.launcher.shell import option

AGENT_MODULE = "titans_scale.launcher.torchrun"
WORKER_MODULE = "titans_scale.launcher.worker"


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes meet. endpoint None on one node means torchrun --standalone."""

    endpoint: str | None = None   # host:port of the c10d store, served by the first node
    run_id: str = "titans"        # the same on every node of one launch


@dataclass(frozen=True)
class TorchrunCommand:
    grid: ProcessGrid
    rdzv: Rendezvous
    log_dir: str                  # torchrun --log-dir: per-rank stdout/stderr/error.json
    train_args: list[str] = field(default_factory=list)   # `titans-scale train` arguments

    def groups(self) -> list[list[str]]:
        """torchrun's arguments in readable groups: layout, rendezvous, logs, the rank program."""
        grid = self.grid
        size = [f"--nnodes={grid.nnodes}", f"--nproc-per-node={grid.nproc_per_node}"]
        if self.rdzv.endpoint is None:
            rdzv = ["--standalone"]
        else:
            rdzv = ["--rdzv-backend=c10d", option("--rdzv-endpoint", self.rdzv.endpoint),
                    option("--rdzv-id", self.rdzv.run_id)]
        # A failed rank fails the launch (no elastic restarts): the way back is the checkpoint,
        # through a Slurm requeue or a new launch.
        logs = ["--max-restarts=0", option("--log-dir", self.log_dir), "--redirects=3", "--tee=3"]
        return [size, rdzv, logs, ["-m", WORKER_MODULE, *self.train_args]]

    def args(self) -> list[str]:
        """torchrun's arguments (everything after the agent program)."""
        return [a for g in self.groups() for a in g]

    def argv(self, python: str | None = None) -> list[str]:
        return [python or sys.executable, "-m", AGENT_MODULE, *self.args()]


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except SignalException as e:
        # SIGTERM/SIGINT (scancel, a requeue, the time limit): torchrun has already forwarded it
        # to the ranks and waited for them; one line instead of the agent's stack trace.
        print(f"torchrun: stopped by {e.sigval.name}; the ranks were signalled and have exited",
              file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
