"""Kernel tests run in the Triton interpreter on machines without CUDA.

TRITON_INTERPRET must be set before triton is first imported (triton's own @jit helpers,
e.g. tl.sum, are defined at import), and other test modules import triton indirectly
(torch.utils.flop_counter does). Pytest loads this file before collecting this folder,
which sorts first under tests/, and for any explicit path under it at start-up.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
