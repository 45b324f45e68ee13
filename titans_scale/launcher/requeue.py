"""After a preemption checkpoint: put the Slurm job back in the queue.

The trainer turns SIGUSR1/SIGTERM into "finish the step, write a checkpoint, return with
preempted set" (titans_scale.train.trainer.PreemptionGuard). When that happens inside a job
that our sbatch script started (it exports TITANS_SLURM_REQUEUE=1 and asks for --requeue),
rank 0 runs `scontrol requeue $SLURM_JOB_ID`: Slurm ends this run of the job and queues it
again under the same id; the requeued job runs the same script, and `titans-scale train`
resumes from the newest complete checkpoint (auto-resume is the default). Other ranks, and runs
outside such a job, just exit: a preempted run resumes whenever it is started again.

Slurm then kills what is left of this run (the message "CANCELLED ... DUE TO JOB REQUEUE" in the
job log is that, not an error), and holds the requeued job for about two minutes (its
EligibleTime) before it can start again.
"""

from __future__ import annotations

import os
import subprocess
import sys

REQUEUE_ENV = "TITANS_SLURM_REQUEUE"


def requeue_after_preemption(env=os.environ) -> int:
    """The exit code of `titans-scale train` after a preemption checkpoint (0 = handled)."""
    job = env.get("SLURM_JOB_ID")
    if env.get(REQUEUE_ENV) != "1" or not job:
        print("titans-scale train: preempted; checkpoint written, start the run again to resume",
              file=sys.stderr)
        return 0
    if env.get("RANK", "0") != "0":
        return 0                                   # rank 0 speaks for the job
    cmd = ["scontrol", "requeue", job]
    print(f"titans-scale train: preempted; checkpoint written; requeueing Slurm job {job}",
          file=sys.stderr, flush=True)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=dict(env))
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"titans-scale train: error: `{' '.join(cmd)}` failed ({e}); resubmit the job to resume",
              file=sys.stderr)
        return 1
    if r.returncode != 0:
        print(f"titans-scale train: error: `{' '.join(cmd)}` exited {r.returncode}: "
              f"{(r.stderr or r.stdout).strip()[:300]}; resubmit the job to resume", file=sys.stderr)
        return 1
    return 0
