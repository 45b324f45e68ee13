"""The run's device decision (titans_scale/device.py): CPU where nothing asks for CUDA, and one
clear line, never a silent CPU run, where CUDA is asked for but unusable."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from titans_scale.device import DeviceError, resolve_device
from titans_scale.device import DEVICE_ENV
from titans_scale.launcher.env import rank_env
from titans_scale.parallel.state import init_parallel


@pytest.fixture
def no_gpu(monkeypatch):
    """This process as on a CPU node: no CUDA device, nothing listed, no launcher request."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cpu_unless_cuda_is_asked_for(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("setting, env, named", [
    ("cuda", {}, "train.device='cuda'"),
    ("auto", {DEVICE_ENV: "cuda"}, "--gpus-per-node"),
    ("auto", {"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
])
def test_cuda_asked_for_without_cuda_is_one_line_naming_the_setting(no_gpu, monkeypatch, setting, env, named):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DeviceError) as e:
        resolve_device(setting)
    msg = str(e.value)
    assert named in msg and "train.device='cpu'" in msg and "\n" not in msg


def test_cuda_that_fails_to_initialise_is_an_error(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def broken():
        raise RuntimeError("CUDA driver initialization failed\nmore detail")
    monkeypatch.setattr(torch.cuda, "init", broken)
    with pytest.raises(DeviceError, match=r"train.device='cuda'.*failed to initialise \(RuntimeError: CUDA driver "
                                          r"initialization failed\)"):
        resolve_device("cuda")


def test_cpu_setting_against_a_gpu_launch_is_refused(no_gpu, monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with pytest.raises(DeviceError, match="--gpus-per-node"):
        resolve_device("cpu")


def test_gpu_launches_ask_for_cuda_cpu_launches_do_not():
    assert rank_env(gpu=True)[DEVICE_ENV] == "cuda"
    assert DEVICE_ENV not in rank_env(gpu=False)


def test_init_parallel_refuses_before_joining_a_process_group(no_gpu, monkeypatch):
    """GPUs requested but CUDA unusable: no fallback to gloo and the CPU shim."""
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with pytest.raises(DeviceError, match="--gpus-per-node"):
        init_parallel(rank=0, world_size=1, init_method="tcp://127.0.0.1:1")
    assert not dist.is_initialized()


def test_train_cli_with_cuda_unavailable_prints_one_line(tmp_path):
    env = {**os.environ, "TITANS_NO_PROGRESS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "titans_scale.cli", "train", "--config", "configs/tiny.toml",
                        "train.device=cuda", f"train.run_dir={tmp_path}/run"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "train.device='cuda' asks for CUDA" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def test_gpu_launches_limit_cuda_connections_for_megatron():
    assert rank_env(gpu=True)["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in rank_env(gpu=False)


@pytest.mark.parametrize("device, device_id", [(torch.device("cpu"), None), (torch.device("cuda", 1),
                                                                             torch.device("cuda", 1))])
def test_process_group_gets_the_configured_timeout_and_the_gpu(monkeypatch, device, device_id):
    from titans_scale.parallel import state
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setattr(state, "_we_started_dist", False)
    state._init_process_group("nccl", 0, 1, "tcp://127.0.0.1:1", device, timeout_s=42)
    assert seen["timeout"].total_seconds() == 42 and seen["device_id"] == device_id
