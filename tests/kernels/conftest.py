"""Kernel tests run in the Triton interpreter on machines without CUDA: tests/conftest.py
sets TRITON_INTERPRET=1 before any test module (or anything they import) loads triton."""
