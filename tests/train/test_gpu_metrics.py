"""MFU and memory on a GPU: the device's dense bf16 peak by name, the tensors' peak allocation
on the progress line and in the metrics; the CPU keeps its measured rate and RSS."""

import pytest
import torch

from titans_scale.train import hardware
from titans_scale.train.trainer import _update

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("name, tflops", [("NVIDIA H200", 989), ("NVIDIA H100 80GB HBM3", 989),
                                          ("NVIDIA H100 PCIe", 756), ("NVIDIA A100-SXM4-80GB", 312)])
def test_known_gpus_use_their_dense_bf16_peak(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    rate, source = hardware.peak_flops(CUDA)
    assert rate == tflops * 1e12 and source == f"{name} dense bf16 peak"


def test_an_unknown_gpu_is_measured_in_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    calls = []
    monkeypatch.setattr(hardware, "measured_matmul_flops", lambda dtype, device: calls.append((dtype, device)) or 5.0)
    assert hardware.peak_flops(CUDA) == (5.0, "Some GPU measured bf16 matmul")
    assert calls == [(torch.bfloat16, "cuda:0")]


def test_cpu_keeps_the_measured_fp32_rate_and_rss(monkeypatch):
    monkeypatch.setattr(hardware, "measured_matmul_flops", lambda: 7.0)
    assert hardware.peak_flops(torch.device("cpu")) == (7.0, "measured fp32 matmul")
    assert set(hardware.peak_memory_gb(torch.device("cpu"))) == {"peak_rss_gb"}


def test_gpu_memory_in_the_metrics_and_the_progress_line(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    mem = hardware.peak_memory_gb(CUDA)
    assert mem["gpu_max_allocated_gb"] == 3.0 and "peak_rss_gb" in mem
    m = {"loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0, "mfu": 0.5, **mem}
    with caplog.at_level("INFO", logger="titans_scale.train"):
        _update(None, 1, m)
    assert caplog.records[-1].getMessage().endswith("| gpu 3.00 GiB")
    with caplog.at_level("INFO", logger="titans_scale.train"):
        _update(None, 2, {k: v for k, v in m.items() if k != "gpu_max_allocated_gb"})   # a CPU run
    assert "gpu" not in caplog.records[-1].getMessage()
