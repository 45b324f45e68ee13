"""A fake cuda:0 on this CPU-only torch, for tests that check device placement.

FakeTensorMode's tensors can carry a fake CUDA device, and any op mixing devices raises
FakeTensorDeviceMismatchError. But every op that goes through a device guard (slicing, any op
recording autograd history) needs CUDA's DeviceGuardImpl, which a CPU build lacks ("PyTorch is
not linked with support for cuda devices"; under autograd a C++ abort). `load_guard` compiles
and loads c10's own FakeGuardImpl for CUDA (three lines of C++). It changes the process for
good, so the tests run their scenarios in a child process (`run_child`).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

CUDA = torch.device("cuda", 0)
ROOT = Path(__file__).resolve().parent.parent          # the child imports tests.fake_cuda from here

GUARD_CPP = """
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
"""


def guard_source_dir(tmp_path_factory) -> Path:
    """A folder with the guard's source (the child builds it there once and reuses the build)."""
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("the fake CUDA device guard is compiled at test time: needs c++ and ninja")
    d = tmp_path_factory.mktemp("fake_cuda_guard")
    (d / "fake_cuda_guard.cpp").write_text(GUARD_CPP)
    return d


def load_guard(build_dir: str) -> None:
    import torch.utils.cpp_extension as cpp
    cpp.load(name="fake_cuda_guard", sources=[f"{build_dir}/fake_cuda_guard.cpp"], build_directory=build_dir,
             is_python_module=False)


def run_child(script: str, *args) -> str:
    """Run `python script args...`; returns its last line of output (asserting it exited 0)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout.strip().splitlines()[-1]


class Values(TorchDispatchMode):
    """Fake tensors have no values: data-dependent reads (`.item()`, `bool()`) give 1."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0 if args[0].dtype.is_floating_point else 1
        return func(*args, **(kwargs or {}))
