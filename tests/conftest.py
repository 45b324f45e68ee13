import os
import sys

# Tests are deterministic and run on the CPU; keep BLAS from oversubscribing the 2 cores
# when several test processes or spawned ranks run at once.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Tools installed into the environment (ninja for the JIT-built fake CUDA guard, torchrun) are
# found as in an activated venv, though `make test` runs .venv/bin/python without activating it.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

# Without CUDA the Triton kernels run in the interpreter. TRITON_INTERPRET must be set
# before anything imports triton (deepspeed, megatron, titans-pytorch and
# torch.utils.flop_counter all do at import), so it is set here, before any test module loads.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
