"""Host settings (train/hardware.py): the allocator setting removes the page faults of
re-allocating large activations, and the config can turn it off."""

import subprocess
import sys

import pytest

from titans_scale.config import RunConfig

CHILD = """
import resource, sys, torch
from titans_scale.train.hardware import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def step():                                   # 4 x 64 MiB, freed at the end, as one training step
    xs = [torch.ones(16 * 2**20) for _ in range(4)]
    return sum(float(x[-1]) for x in xs)
for _ in range(5):                            # the heap settles in a few steps (measured: 3)
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_retained_memory_is_reused_without_page_faults():
    default, retained = _faults("default"), _faults("retain")
    pages = 3 * 4 * 64 * 2**20 // 4096                 # what re-touching every block would cost
    assert default > 0.5 * pages, default             # by default each block is a fresh mmap
    assert retained < 0.05 * pages, retained


def test_retain_memory_is_a_train_setting():
    assert RunConfig().train.retain_memory is True
