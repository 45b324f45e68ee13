"""The per-rank entry torchrun starts: `python -m titans_scale.launcher.worker train --config X ...`.

It runs exactly `titans-scale train` (the module titans_scale.cli, run as the program with runpy:
the CLI sits above the launcher, so the launcher never imports it) in this process, after two things
only a rank can do: say which rank it is (first line of its log), and link its log folder under
its global rank. torchrun writes each rank's output to
<log_dir>/<run_id>_<random>/attempt_<n>/<local_rank>/{stdout,stderr}.log, named by local rank in
a folder per node; the link <log_dir>/rank_<global rank> makes "the log of rank 5" one path.
Uncaught exceptions are recorded (torchrun's error.json), so torchrun names the failing rank.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys
from pathlib import Path


def link_rank_logs(env=os.environ) -> Path | None:
    """<log_dir>/rank_<N> -> this rank's torchrun log folder; None when not under torchrun's log dir."""
    err, rank = env.get("TORCHELASTIC_ERROR_FILE"), env.get("RANK")
    if not err or rank is None:
        return None
    folder = Path(err).parent                      # .../<run_id>_<random>/attempt_<n>/<local_rank>
    if len(folder.parents) < 3 or not folder.parent.name.startswith("attempt_"):
        return None                                # not the layout we know: no link, no harm
    root = folder.parents[2]
    width = len(str(max(0, int(env.get("WORLD_SIZE", "1")) - 1)))
    link = root / f"rank_{int(rank):0{width}d}"
    tmp = root / f".{link.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(folder, root), tmp)
    os.replace(tmp, link)                          # a newer attempt takes the name over
    return link


def main(argv: list[str] | None = None) -> None:
    """The banner and the log link, then the program `titans-scale <argv>` (default: this
    process's own arguments, sys.argv[1:]), which ends in sys.exit."""
    import torch                                   # reads OMP_NUM_THREADS, as the trainer's torch will

    from titans_scale.train.allocator import ENV_REEXEC

    env = os.environ
    if ENV_REEXEC not in env:                      # after train.allocator's re-exec both are already done
        print(f"titans-scale worker: rank {env.get('RANK', '0')} of {env.get('WORLD_SIZE', '1')} "
              f"(local rank {env.get('LOCAL_RANK', '0')}, node {env.get('GROUP_RANK', '0')}) on "
              f"{socket.gethostname()}, {torch.get_num_threads()} torch thread(s)", file=sys.stderr, flush=True)
        try:
            link_rank_logs(env)
        except OSError as e:                       # logs are a convenience: never fail a run for them
            print(f"titans-scale worker: could not link the rank log ({e})", file=sys.stderr)
    if argv is not None:
        sys.argv[1:] = argv                        # the program's command line (train.allocator may re-run it)
    runpy.run_module("titans_scale.cli", run_name="__main__")


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
