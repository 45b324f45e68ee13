"""Spawn N local processes for a distributed function (tests, CPU development).

``run_distributed(fn, world_size, *args)`` starts ``world_size`` fresh Python processes
(multiprocessing "spawn"), sets the environment torchrun would set (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port), limits each to one
CPU thread, initialises the default process group (gloo unless told otherwise), calls
``fn(*args)`` and returns every rank's return value, ordered by rank. A rank that raises makes
the call raise ``DistributedRunError`` carrying that rank's traceback; the other ranks are then
stopped, so a failed collective never hangs the caller.

``fn`` must be importable by the children (a module-level function) and its arguments and
return value picklable. Inside ``fn``, the rank is ``torch.distributed.get_rank()``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["DistributedRunError", "find_free_port", "run_distributed"]


class DistributedRunError(RuntimeError):
    """A rank of run_distributed failed, timed out or died; the message holds its traceback."""


def find_free_port() -> int:
    """A TCP port on localhost that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(
    rank: int,
    world_size: int,
    port: int,
    backend: str | None,
    env: dict[str, str],
    fn: Callable[..., Any],
    args: tuple,
    results: mp.Queue,
) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # N processes share few cores: one thread each avoids oversubscription.
    torch.set_num_threads(1)
    try:
        if backend is not None:
            dist.init_process_group(
                backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
            )
        out = fn(*args)
        # Plain pickle copies tensors into the bytes; torch's queue pickler would share them
        # through this process's memory, which vanishes when it exits.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str | None = "gloo",
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local ranks and return their results by rank.

    backend: the default process group each rank joins before ``fn`` runs; None leaves
    initialisation to ``fn`` (e.g. ``init_parallel()``, which reads the torchrun-style env).
    env: extra environment variables for the children (OMP_NUM_THREADS=1 is always set).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    child_env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(rank, world_size, port, backend, child_env, fn, args, results),
            name=f"run_distributed-rank{rank}",
            daemon=False,  # ranks may start processes of their own (dist_checkpointing does)
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()

    outputs: dict[int, Any] = {}
    errors: list[tuple[int, str]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) + len(errors) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                # A rank killed outright (segfault, OOM) never reports: notice it exiting.
                for r, p in enumerate(procs):
                    if p.exitcode not in (None, 0) and r not in outputs:
                        errors.append((r, f"process exited with code {p.exitcode} (see its stderr)"))
                if not errors and time.monotonic() > deadline:
                    waiting = [r for r in range(world_size) if r not in outputs]
                    errors.append((-1, f"timed out after {timeout_s:.0f}s waiting for ranks {waiting}"))
                if errors:
                    break
                continue
            if ok:
                outputs[rank] = pickle.loads(payload)
            else:
                errors.append((rank, payload))
                # Give the other ranks a moment to report their own errors, then stop them.
                _drain(results, outputs, errors, world_size, grace_s=3.0)
                break
    finally:
        for p in procs:
            p.join(timeout=10.0 if not errors else 0.5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()

    if errors:
        lines = [f"run_distributed({getattr(fn, '__qualname__', fn)}, world_size={world_size}) failed:"]
        for rank, text in errors:
            lines.append(f"--- rank {rank} ---" if rank >= 0 else "---")
            lines.append(text.rstrip())
        raise DistributedRunError("\n".join(lines))
    return [outputs[r] for r in range(world_size)]


def _drain(results, outputs: dict, errors: list, world_size: int, grace_s: float) -> None:
    """Collect messages that arrive within grace_s (other ranks' errors after a failure)."""
    end = time.monotonic() + grace_s
    while len(outputs) + len(errors) < world_size and time.monotonic() < end:
        try:
            rank, ok, payload = results.get(timeout=0.1)
        except queue.Empty:
            continue
        if ok:
            outputs[rank] = pickle.loads(payload)
        else:
            errors.append((rank, payload))
