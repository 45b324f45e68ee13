"""Packed rows (cu_seqlens): each document of a packed row gives exactly what it gives alone,
from W^0 with zero momentum and its own chunk grid, in values and gradients (float64, 1e-9),
for every memory implementation; the per-document layout (ops/varlen.py) round-trips."""

import pytest
import torch

from titans_scale.ops.memory import MemoryArgumentError, memory_scan
from titans_scale.ops.state import MemoryState
from titans_scale.ops.varlen import DocumentLayout, PackedBatchError
from tests.helpers import cu_seqlens_of, make_inputs, rel_err, scan_each_document

C = 8
# Two rows of 37 tokens; no length a multiple of C, one (5) and another (7) shorter than a chunk.
DOC_LENGTHS = [[5, 13, 19], [30, 7]]
L = 37


def run_packed(args, impl, **kw):
    *seq, init = args
    return memory_scan(*seq, init, chunk_size=C, impl=impl, cu_seqlens=cu_seqlens_of(DOC_LENGTHS), **kw)


def run_alone(args, impl, **kw):
    """Each document through its own call (the definition), laid out packed again."""
    return scan_each_document(args, DOC_LENGTHS, impl, C, **kw)


def grads_of(y, args, probe):
    *seq, init = args
    return torch.autograd.grad((y * probe).sum(), [*seq, *init])


@pytest.mark.parametrize("impl", ["naive", "chunked", "fused"])
@pytest.mark.parametrize("depth", [1, 2])
def test_packed_row_equals_each_document_alone(impl, depth):
    args = make_inputs(B=2, H=2, L=L, d=8, depth=depth, seed=3, requires_grad=True)
    probe = torch.randn(2, 2, L, 8, dtype=torch.float64)
    y, state = run_packed(args, impl)
    assert state is None
    want = run_alone(args, "naive")
    assert rel_err(y, want) < 1e-9
    for name, got, ref in zip("q k v theta eta alpha W0 W1".split(), grads_of(y, args, probe),
                              grads_of(want, args, probe)):
        assert rel_err(got, ref) < 1e-9, name
    unpacked, _ = memory_scan(*args, chunk_size=C, impl=impl)      # one stream per row differs
    assert rel_err(unpacked, want) > 1e-3


def test_packed_normalised_memory_and_recompute():
    args = make_inputs(B=2, H=2, L=L, d=8, depth=2, seed=4, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    norm = {"ln_weight": 1 + 0.3 * torch.randn(2, 8, generator=g, dtype=torch.float64),
            "ln_bias": 0.2 * torch.randn(2, 8, generator=g, dtype=torch.float64)}
    want = run_alone(args, "naive", **norm)
    y, _ = run_packed(args, "chunked", recompute_group=2, **norm)
    assert rel_err(y, want) < 1e-9


def test_one_bucket_layout_equals_buckets():
    """Padding every document to the longest one (buckets='one') or by length buckets: the
    same tokens come back, and pow2 buckets pad less when one document is long."""
    x = torch.randn(2, L, 3, dtype=torch.float64)
    for buckets in ("pow2", "one"):
        docs = DocumentLayout(cu_seqlens_of(DOC_LENGTHS), 2, L, buckets=buckets)
        parts = docs.split(x, 1)
        assert torch.equal(docs.merge(parts, 1), x)
        for bucket, part in zip(docs.buckets, parts):                   # document rows start at 0
            assert torch.equal(part[:, 0], x.flatten(0, 1)[bucket.index[:, 0]])
    long = [[100] + [4] * 7, [128]]
    padded = {b: DocumentLayout(cu_seqlens_of(long), 2, 128, b).padded_tokens for b in ("pow2", "one")}
    assert padded["pow2"] < padded["one"] == 9 * 128


def test_packed_refusals():
    args = make_inputs(B=2, H=2, L=L, d=8, depth=1, seed=5)
    *seq, init = args
    with pytest.raises(MemoryArgumentError, match="not a carried MemoryState"):
        memory_scan(*seq, MemoryState.fresh(init, C), chunk_size=C, cu_seqlens=cu_seqlens_of(DOC_LENGTHS))
    with pytest.raises(PackedBatchError, match="every row start"):
        memory_scan(*seq, init, chunk_size=C, cu_seqlens=torch.tensor([0, 40, 74], dtype=torch.int32))
    with pytest.raises(PackedBatchError, match="from 0 to B\\*L"):
        memory_scan(*seq, init, chunk_size=C, cu_seqlens=torch.tensor([0, 37, 70], dtype=torch.int32))
