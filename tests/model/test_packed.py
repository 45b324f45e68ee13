"""Packed rows through the whole model (TitansLM.forward(cu_seqlens=...)): for every mixer and
a model of all of them, a packed batch of several documents (lengths not multiples of the chunk,
segment or window, one shorter than a chunk) gives each document's logits and gradients alone."""

import pytest
import torch

from titans_scale.model import MIXERS, ModelConfig, TitansLM
from titans_scale.ops.varlen import PackedBatchError
from tests.helpers import cu_seqlens_of, documents_of, rel_err

LENGTHS = [[3, 13, 21], [30, 7]]        # chunk 4, segment 8, window 6
L = 37


def model_of(layers, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_heads=2, layers=list(layers), chunk_size=4, window=6, segment_len=8,
                      n_persistent=2, mem_expansion=2)
    return TitansLM(cfg).to(dtype)


def packed_and_alone(model, dtype):
    """(logits, grads) of the packed batch and of each document through its own call."""
    tok = torch.randint(0, 259, (len(LENGTHS), L), generator=torch.Generator().manual_seed(1))
    probe = torch.randn(len(LENGTHS), L, 259, dtype=dtype, generator=torch.Generator().manual_seed(2))
    params = list(model.parameters())

    logits, state = model(tok, cu_seqlens=cu_seqlens_of(LENGTHS))
    assert state is None
    packed = logits, torch.autograd.grad((logits * probe).sum(), params, allow_unused=True)

    rows = [[] for _ in LENGTHS]
    for r, a, b in documents_of(LENGTHS):
        rows[r].append(model(tok[r:r + 1, a:b])[0])
    logits = torch.cat([torch.cat(row, 1) for row in rows])
    alone = logits, torch.autograd.grad((logits * probe).sum(), params, allow_unused=True)
    return packed, alone, model(tok)[0]


def check(model, dtype, tol):
    (got, got_g), (want, want_g), unpacked = packed_and_alone(model, dtype)
    assert rel_err(got, want) < tol
    for (name, _), a, b in zip(model.named_parameters(), got_g, want_g):
        assert (a is None) == (b is None), name
        if a is not None:
            assert rel_err(a, b) < tol, name
    assert rel_err(unpacked, want) > 1e-4          # without the boundaries the documents mix


@pytest.mark.parametrize("mixer", MIXERS)
def test_packed_mixer_equals_each_document_alone(mixer):
    check(model_of([mixer]), torch.float64, 1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_packed_model_of_every_mixer_equals_each_document_alone(dtype, tol):
    check(model_of(MIXERS, dtype), dtype, tol)


def test_packed_rows_refuse_a_state():
    model = model_of(["lmm"])
    tok = torch.randint(0, 259, (2, L))
    _, state = model(tok)
    with pytest.raises(PackedBatchError, match="state=None"):
        model(tok, state, cu_seqlens=cu_seqlens_of(LENGTHS))
