"""The run's device, decided once (`train.device`), and the device of a process group's
collectives. Both engines place the model, its optimizer state and the batches on
`resolve_device`'s answer; every tensor handed to a collective is made on `collective_device`'s.

    auto  CUDA when GPUs are visible, else the CPU
    cpu   the CPU, even on a GPU machine
    cuda  CUDA, or an error

Under torchrun each rank takes `cuda:LOCAL_RANK`. CUDA asked for (train.device = cuda, the
launcher's --gpus-per-node, or visible GPUs under auto) but unusable is one DeviceError naming
the setting: a GPU job must never train on the CPU without saying so.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from titans_scale.errors import ConfigError

# "cuda" when the launch gives every rank a GPU (--gpus-per-node; set by launcher/env.py)
DEVICE_ENV = "TITANS_DEVICE"

__all__ = ["DeviceError", "collective_device", "place_batch", "resolve_device"]


class DeviceError(ConfigError):
    """The requested device cannot be used (CUDA asked for but unavailable)."""


def _visible_gpus() -> str:
    """Why this process is expected to see GPUs ('' when it is not)."""
    if torch.cuda.device_count() > 0:
        return f"{torch.cuda.device_count()} CUDA device(s) visible"
    listed = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if listed and listed != "-1":
        return f"CUDA_VISIBLE_DEVICES={listed}"
    return ""


def _cuda_failure() -> str:
    """Why CUDA cannot be used here ('' when it can)."""
    if not torch.cuda.is_available():
        built = torch.version.cuda or torch.version.hip     # ROCm builds answer through torch.cuda too
        return f"torch.cuda.is_available() is False ({'no driver or no device' if built else 'a CPU-only torch'})"
    try:
        torch.cuda.init()
    except Exception as e:      # a broken driver / device: any of several error types
        return f"CUDA failed to initialise ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return ""


def resolve_device(setting: str = "auto") -> torch.device:
    """The device of this process for `train.device = setting` (see the module docstring)."""
    launcher = os.environ.get(DEVICE_ENV, "")
    if setting == "cpu":
        if launcher == "cuda":
            raise DeviceError("train.device='cpu' but the job was launched with --gpus-per-node; "
                              "drop one of them")
        return torch.device("cpu")
    if setting == "cuda":
        asked = "train.device='cuda'"
    elif launcher == "cuda":
        asked = "--gpus-per-node (the launcher)"
    elif visible := _visible_gpus():
        asked = f"train.device='auto' with {visible}"
    else:
        return torch.device("cpu")
    failure = _cuda_failure()
    if failure:
        raise DeviceError(f"{asked} asks for CUDA, but {failure}; set train.device='cpu' to train on the CPU")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise DeviceError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} CUDA device(s); "
                          "start one rank per GPU (--gpus-per-node)")
    return torch.device("cuda", local)


def place_batch(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Host batches onto `device`: through pinned memory with asynchronous copies on CUDA (the
    copy overlaps the host's work until the step reads it), unchanged on the CPU."""
    if device.type == "cpu":
        return tensors
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)


def collective_device(group=None) -> torch.device:
    """Where the tensors of a collective over `group` must live: NCCL only moves CUDA tensors
    (this rank's current device), gloo host ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
