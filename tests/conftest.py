import os

# Tests are deterministic and run on the CPU; keep BLAS from oversubscribing the 2 cores
# when several test processes or spawned ranks run at once.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
