"""Two torchrun "nodes" on one machine: two `titans-scale launch --nnodes 2` processes meet at a
c10d rendezvous on localhost and train the tiny model with DP=2 (one rank each, one thread)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from tests.helpers import ENV, ROOT, TINY, losses, micro_overrides, prepare_shards
from titans_scale.parallel.launch_utils import find_free_port
from titans_scale.train.metrics import read_metrics

DISTRIBUTED = importlib.util.find_spec("titans_scale.parallel.runtime") is not None
STEPS = 30


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return prepare_shards(tmp_path_factory.mktemp("launch_shards") / "embedded")


@pytest.mark.skipif(not DISTRIBUTED, reason="DP=2 needs the distributed training path "
                    "(titans_scale/parallel/runtime.py), not in this tree yet")
def test_two_nodes_with_c10d_rendezvous_train_dp2(tmp_path, shards):
    run = tmp_path / "run"
    endpoint = f"127.0.0.1:{find_free_port()}"
    cmd = [sys.executable, "-m", "titans_scale.cli", "launch", "--config", str(TINY), "--cpu", "--nnodes", "2",
           "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, *micro_overrides(shards, run, STEPS)]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                              cwd=tmp_path) for _ in range(2)]
    outs = []
    try:
        for p in nodes:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in nodes:
            p.kill()
    for p, out in zip(nodes, outs):
        assert p.returncode == 0, out[-4000:]
        assert out.startswith("# 2 node(s) x 1 CPU rank(s) = 2 ranks: TP=1 PP=1 CP=1 DP=2"), out[:300]
    both = "".join(outs)
    for r in (0, 1):                                    # the combined view: every line prefixed by its rank
        banners = re.findall(rf"^\[rank{r}\]:titans-scale worker: rank {r} of 2 .* 1 torch thread\(s\)$", both, re.M)
        assert len(banners) == 1, banners             # once, also when train.allocator re-executes the rank
    for r in (0, 1):                                    # per-rank logs, linked by global rank
        (log,) = run.glob(f"logs/launch-*/rank_{r}")
        assert f"rank {r} of 2" in (log / "stderr.log").read_text()
    start = read_metrics(run, "start")
    assert "DP=2" in start[0].get("layout", ""), start                       # the trainer's own view
    ls = losses(run)
    assert sorted(ls) == list(range(1, STEPS + 1)) and ls[STEPS] < ls[1] - 0.5, ls
    assert (run / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"


def test_plain_torchrun_runs_the_launch_entry_script(tmp_path, shards):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                        str(ROOT / "launch" / "train.py"), "--config", str(TINY), *micro_overrides(shards, run, 3)],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "titans-scale worker: rank 0 of 1" in r.stderr
    assert sorted(losses(run)) == [1, 2, 3]
