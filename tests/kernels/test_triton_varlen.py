"""impl="triton" with packed rows (cu_seqlens): each document equals itself alone (the float64
per-token reference), values and gradients, fp32 to 1e-5. Tiny shapes: the interpreter is slow."""

import pytest
import torch

from titans_scale.ops import triton_scan as km  # noqa: F401  (conftest.py set TRITON_INTERPRET first)
from titans_scale.ops.memory import memory_scan
from tests.helpers import cu_seqlens_of, make_inputs, rel_err, scan_each_document

C, L = 8, 37
DOC_LENGTHS = [[5, 13, 19], [30, 7]]        # none a multiple of C, two shorter than C

DEVICE = "cpu" if km.INTERPRETED else "cuda"


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    if km.INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(km, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("depth", [1, 2])
def test_triton_packed_row_equals_each_document_alone(depth):
    ref = make_inputs(B=len(DOC_LENGTHS), H=1, L=L, d=16, depth=depth, seed=7, requires_grad=True)
    *seq, init = ref
    args = ([t.detach().to(DEVICE, torch.float32).requires_grad_(True) for t in seq]
            + [[w.detach().to(DEVICE, torch.float32).requires_grad_(True) for w in init]])
    probe = torch.randn(len(DOC_LENGTHS), 1, L, 16, dtype=torch.float64)
    y, _ = memory_scan(*args[:6], args[6], chunk_size=C, impl="triton",
                       cu_seqlens=cu_seqlens_of(DOC_LENGTHS).to(DEVICE))
    want = scan_each_document(ref, DOC_LENGTHS, "naive", C)
    assert rel_err(y.double().cpu(), want) < 1e-5
    got = torch.autograd.grad((y * probe.to(y)).sum(), [*args[:6], *args[6]])
    exp = torch.autograd.grad((want * probe).sum(), [*seq, *init])
    for name, a, b in zip("q k v theta eta alpha W0 W1".split(), got, exp):
        assert rel_err(a.double().cpu(), b.double().cpu()) < 1e-5, name
