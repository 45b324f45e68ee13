"""train.allocator (titans_scale/train/allocator.py): CPU training re-runs itself once on tcmalloc
where it is installed, says so, and refuses a missing or unknown allocator with one line."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, write_micro
from titans_scale.config import load_run_config
from titans_scale.errors import ConfigError
from titans_scale.train.allocator import find_tcmalloc, preload_env
from titans_scale.train.metrics import read_metrics

ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TITANS_TCMALLOC", "TITANS_ALLOCATOR_REEXEC")}
ENV.update(OMP_NUM_THREADS="1", TITANS_NO_PROGRESS="1", PYTHONPATH=os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
LIB = find_tcmalloc()
needs_tcmalloc = pytest.mark.skipif(
    LIB is None or not sys.platform.startswith("linux"),
    reason="no tcmalloc library on this machine (apt-get install libtcmalloc-minimal4; CI installs it)")
SHORT = ["train.steps=2", "train.eval_every=2", "train.ckpt_every=2", "train.log_every=1",
         'model.layers=["swa", "attn"]']                              # the allocator, not the memory op


def test_preload_env_prepends_once():
    env = {"LD_PRELOAD": "/x/a.so:/lib/t.so", "HOME": "/h"}
    got = preload_env(env, "/lib/t.so")
    assert got["LD_PRELOAD"] == "/lib/t.so:/x/a.so" and got["HOME"] == "/h"
    assert preload_env(got, "/lib/t.so")["LD_PRELOAD"] == "/lib/t.so:/x/a.so"
    assert preload_env({}, "/lib/t.so")["LD_PRELOAD"] == "/lib/t.so"
    assert env["LD_PRELOAD"] == "/x/a.so:/lib/t.so"                  # a copy: the input is unchanged


def _loaded_in_child(env) -> str:
    code = "from titans_scale.train.allocator import loaded_allocator; print(loaded_allocator())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return r.stdout.strip()


@needs_tcmalloc
def test_loaded_allocator_sees_the_preloaded_library():
    assert _loaded_in_child(ENV) == "glibc"
    assert _loaded_in_child({**ENV, "LD_PRELOAD": LIB}) == "tcmalloc"


PROBE = """
import json, os, sys
print(json.dumps({"pid": os.getpid(), "phase": os.environ.get("TITANS_ALLOCATOR_REEXEC", "first")}), flush=True)
from titans_scale.train.allocator import ensure_allocator, loaded_allocator
ensure_allocator(sys.argv[1], sys.argv[1:])
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "allocator": loaded_allocator(),
                  "ld_preload": os.environ.get("LD_PRELOAD"), "guard": os.environ.get("TITANS_ALLOCATOR_REEXEC")}))
"""


@needs_tcmalloc
def test_reexec_keeps_pid_and_arguments_and_cleans_ld_preload(tmp_path):
    (tmp_path / "alloc_probe.py").write_text(PROBE)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV["PYTHONPATH"]])}
    r = subprocess.run([sys.executable, "-m", "alloc_probe", "auto", "x=1"], capture_output=True, text=True,
                       env=env, check=True, timeout=300)
    first, again, last = map(json.loads, r.stdout.strip().splitlines())
    assert first["phase"] == "first" and again["phase"] == LIB          # ran twice: the second under tcmalloc
    assert first["pid"] == again["pid"] == last["pid"]                  # exec: the same process
    assert last["argv"] == ["auto", "x=1"] and last["allocator"] == "tcmalloc"
    assert last["ld_preload"] is None and last["guard"] is None         # children do not inherit it
    r = subprocess.run([sys.executable, "-m", "alloc_probe", "glibc"], capture_output=True, text=True,
                       env=env, check=True, timeout=300)
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert len(lines) == 2 and lines[-1]["allocator"] == "glibc"       # no re-exec


def _train(tmp_path, shards, name, *overrides, env=None):
    cfg = write_micro(tmp_path, shards, name=name)
    return subprocess.run([sys.executable, "-m", "titans_scale.cli", "train", "--config", str(cfg), *SHORT,
                           *overrides], capture_output=True, text=True, env=env or ENV, timeout=600,
                          cwd=ROOT), tmp_path / name


@needs_tcmalloc
def test_cli_train_runs_on_tcmalloc_by_default_and_on_glibc_when_asked(tmp_path):
    shards = tmp_path / "shards"
    r, run = _train(tmp_path, shards, "auto")                           # the default: train.allocator = auto
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_metrics(run, "start")[0]["allocator"] == "tcmalloc"
    assert "allocator tcmalloc" in r.stderr
    r, run = _train(tmp_path, shards, "glibc", "train.allocator=glibc")
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_metrics(run, "start")[0]["allocator"] == "glibc+retain"  # mallopt applied on glibc only
    assert "allocator glibc+retain" in r.stderr


def test_required_tcmalloc_missing_is_one_line(tmp_path):
    env = {**ENV, "TITANS_TCMALLOC": str(tmp_path / "no" / "libtcmalloc_minimal.so.4")}
    r, _ = _train(tmp_path, tmp_path / "shards", "req", 'train.allocator="tcmalloc"', env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "train.allocator" in lines[0] and "libtcmalloc-minimal4" in lines[0] and "TITANS_TCMALLOC" in lines[0]


def test_unknown_allocator_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.allocator.*auto, tcmalloc or glibc"):
        load_run_config(None, ['train.allocator="jemalloc"'])
    r, _ = _train(tmp_path, tmp_path / "shards", "bad", 'train.allocator="jemalloc"')
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "train.allocator" in r.stderr and "jemalloc" in r.stderr
