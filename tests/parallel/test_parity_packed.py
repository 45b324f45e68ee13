"""Packed rows (cu_seqlens) under tensor, sequence, pipeline and data parallelism against one
process: real 2-rank gloo runs of a tiny TitansLM holding every mixer, on batches whose rows
pack several documents (tests/helpers.PACKED_LENGTHS: shorter than a chunk, not multiples of the
chunk, segment or window; the target across each boundary does not count). Each layout must
reproduce the single-process losses (1e-5 relative per step) and step-1 gradients. Under context
parallelism (CP=2, strategy auto: MAC on the ring, the other memory mixers a2a) the runtime's
shards (on the chunk grid) cut documents: each Block runs those inside a shard there and re-lays
those that span the shards across the group."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import check_every_rank, reference, spawn_layouts

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU/gloo parity runs; CUDA machines run the GPU suite")

LAYOUTS = {
    "tp2_sp": dict(tp=2, sp=True, packed=True),               # SP all-gathers the sequence for the mixer
    "pp2_1f1b": dict(pp=2, micro=2, packed=True),             # cu_seqlens travel with each micro-batch
    "dp2": dict(dp=2, packed=True),                           # ranks count different targets
    "cp2_auto": dict(cp=2, cp_strategy="auto", packed=True),  # documents span the two shards
}


@pytest.fixture(scope="module")
def ref_packed():
    return reference(packed=True)


@pytest.fixture(scope="module")
def runs():
    return spawn_layouts(2, LAYOUTS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_layout_matches_single_process(runs, ref_packed, layout):
    check_every_rank(runs, layout, ref_packed)


def test_packing_changes_the_loss(ref_packed):
    """The reference is not the unpacked run (so the parity above tests the boundaries)."""
    unpacked, _ = reference()
    assert abs(unpacked[0] - ref_packed[0][0]) > 1e-3

