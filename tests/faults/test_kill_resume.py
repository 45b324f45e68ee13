"""kill -9 at random points of training, inside the checkpoint write and the pointer update, on
one process and on two gloo ranks: each resumed run reproduces the uninterrupted one's losses
bit for bit, each step's row once (issue 22). The kill points are io/commit.py's
(TITANS_TEST_KILL_AT); the random ones kill the whole process group from outside.
TITANS_FAULT_SEED=<n> replays a randomised test's choices (printed when it fails)."""

from __future__ import annotations

import os
import random

import pytest

from tests.faults import tally
from tests.faults.runs import (MICRO_STEPS, assert_same_run, kill_after, kill_at, train, write_run)
from titans_scale.io.commit import LATEST, checkpoint_dir, resume_checkpoint

# The kill points in the order a save passes them (io/commit.py); save_mid is the single-process
# writer's (between its DCP shards and trainer.pt).
POINTS = ("save_mid", "save_before_manifest", "save_before_latest", "save_in_latest", "save_before_prune")
CKPT_EVERY = 4


def _rng(request) -> random.Random:
    seed = int(os.environ.get("TITANS_FAULT_SEED", random.randrange(1 << 30)))
    request.node.user_properties.append(("seed", seed))
    print(f"TITANS_FAULT_SEED={seed}")
    return random.Random(seed)


def _resumed_step(run) -> int:
    found = resume_checkpoint(checkpoint_dir(run))
    return int(found.name.split("_")[1]) if found else 0


def _kill_somewhere(rng: random.Random, cfg, run, steps: int, points=POINTS, nproc: int = 1) -> str:
    """One kill at a random place the run will still reach: a named point of a checkpoint after
    the one it resumes from, or from outside a random moment after a random train row."""
    start = _resumed_step(run)
    later = [s for s in range(CKPT_EVERY, steps + 1, CKPT_EVERY) if s > start]
    if later and rng.random() < 0.5:
        point, step = rng.choice(points), rng.choice(later)
        kill_at(cfg, point, step, nproc)
        return f"{point}:{step}"
    rows, delay = rng.randint(start + 1, steps - 3), rng.uniform(0.0, 0.2)
    kill_after(cfg, run, rows, delay, nproc)
    return f"after row {rows} + {delay:.2f}s"


def test_kill_inside_the_pointer_update_resumes_exactly(tmp_path, shards, ref_run):
    ref, _ = ref_run
    cfg = write_run(tmp_path, shards, "run")
    with tally.case(tally.FAULTS, "kill in the `latest` update (1 process)"):
        kill_at(cfg, "save_in_latest", 8)
        ck = checkpoint_dir(tmp_path / "run")
        assert (ck / LATEST).read_text() == "step_00000004"        # the pointer never half-moved
        train(cfg)
        assert_same_run(tmp_path / "run", ref)


def test_kill_at_a_random_moment_resumes_exactly(tmp_path, shards, ref_run, request):
    ref, _ = ref_run
    rng = _rng(request)
    cfg = write_run(tmp_path, shards, "run")
    rows, delay = rng.randint(2, MICRO_STEPS - 3), rng.uniform(0.0, 0.2)
    with tally.case(tally.FAULTS, f"kill -9 after row {rows} + {delay:.2f}s (1 process)"):
        kill_after(cfg, tmp_path / "run", rows, delay)
        train(cfg)
        assert_same_run(tmp_path / "run", ref)


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_every_kill_point_resumes_exactly(tmp_path, shards, ref_run, point, request):
    ref, _ = ref_run
    step = _rng(request).choice(range(CKPT_EVERY, MICRO_STEPS + 1, CKPT_EVERY))
    cfg = write_run(tmp_path, shards, "run")
    with tally.case(tally.FAULTS, f"{point}:{step} (1 process)"):
        kill_at(cfg, point, step)
        train(cfg)
        assert_same_run(tmp_path / "run", ref)


@pytest.mark.slow
@pytest.mark.parametrize("latest", ["lost", "garbled"])
def test_lost_or_garbled_latest_pointer_resumes_exactly(tmp_path, shards, ref_run, latest):
    """`latest` is a hint: killed mid-checkpoint, then the pointer deleted or overwritten with
    bytes naming nothing, the run still resumes from its newest verified checkpoint."""
    ref, _ = ref_run
    cfg = write_run(tmp_path, shards, "run")
    pointer = checkpoint_dir(tmp_path / "run") / LATEST
    with tally.case(tally.FAULTS, f"save_mid:8, then `latest` {latest} (1 process)"):
        kill_at(cfg, "save_mid", 8)
        pointer.unlink() if latest == "lost" else pointer.write_bytes(b"\x00../../step_99999999\xff")
        train(cfg)
        assert_same_run(tmp_path / "run", ref)


@pytest.mark.slow
def test_repeated_random_kills_resume_exactly(tmp_path, shards, ref_run, request):
    """One run killed up to four times at random places (named points and outside kills mixed)."""
    ref, _ = ref_run
    rng = _rng(request)
    cfg, run = write_run(tmp_path, shards, "run"), tmp_path / "run"
    with tally.cases(tally.FAULTS) as injected:
        for _ in range(4):
            if _resumed_step(run) >= MICRO_STEPS - 3:
                break
            injected(_kill_somewhere(rng, cfg, run, MICRO_STEPS) + " (1 process)")
        train(cfg)
        assert_same_run(run, ref)


@pytest.mark.slow
def test_two_rank_kills_resume_exactly(tmp_path, shards, request):
    """Two gloo ranks (data parallel, megatron's distributed optimizer) killed at a named point
    (rank 0 alone, or both) and then from outside (torchrun and both ranks), then resumed."""
    rng = _rng(request)
    ref_cfg, cfg = write_run(tmp_path, shards, "ref2"), write_run(tmp_path, shards, "run2")
    train(ref_cfg, nproc=2)
    point, step = rng.choice(POINTS[1:]), rng.choice((CKPT_EVERY, 2 * CKPT_EVERY))
    with tally.cases(tally.FAULTS) as injected:
        kill_at(cfg, point, step, nproc=2)
        injected(f"{point}:{step} (2 ranks)")
        injected(_kill_somewhere(rng, cfg, tmp_path / "run2", MICRO_STEPS, points=POINTS[1:], nproc=2) + " (2 ranks)")
        train(cfg, nproc=2)
        assert_same_run(tmp_path / "run2", tmp_path / "ref2")
