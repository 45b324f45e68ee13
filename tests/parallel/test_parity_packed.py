"""Packed rows (cu_seqlens) under tensor, sequence, pipeline and data parallelism against one
process: real 2-rank gloo runs of a tiny TitansLM holding every mixer, on batches whose rows
pack several documents (tests/helpers.PACKED_LENGTHS: shorter than a chunk, not multiples of the
chunk, segment or window; the target across each boundary does not count). Each layout must
reproduce the single-process losses (1e-5 relative per step) and step-1 gradients. Context
parallelism with packed rows is refused in one line (not supported yet)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import batches, check_every_rank, make_cfg, reference, spawn_layouts

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU/gloo parity runs; CUDA machines run the GPU suite")

LAYOUTS = {
    "tp2_sp": dict(tp=2, sp=True, packed=True),               # SP all-gathers the sequence for the mixer
    "pp2_1f1b": dict(pp=2, micro=2, packed=True),             # cu_seqlens travel with each micro-batch
    "dp2": dict(dp=2, packed=True),                           # ranks count different targets
}


def _cp_refuses_packed_rows() -> dict:
    from titans_scale.errors import ConfigError
    from titans_scale.parallel.runtime import ParallelRuntime

    rt = ParallelRuntime(make_cfg(cp=2, layers=("lmm",)))
    x, y, cu = batches(packed=True)[0]
    try:
        rt.train_step(x, y, 1e-3, cu)
    except ConfigError as e:
        return {"cp_error": str(e)}
    finally:
        rt.close()
    return {"cp_error": None}


@pytest.fixture(scope="module")
def ref_packed():
    return reference(packed=True)


@pytest.fixture(scope="module")
def runs():
    return spawn_layouts(2, LAYOUTS, _cp_refuses_packed_rows)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_layout_matches_single_process(runs, ref_packed, layout):
    check_every_rank(runs, layout, ref_packed)


def test_packing_changes_the_loss(ref_packed):
    """The reference is not the unpacked run (so the parity above tests the boundaries)."""
    unpacked, _ = reference()
    assert abs(unpacked[0] - ref_packed[0][0]) > 1e-3


def test_context_parallel_refuses_packed_rows(runs):
    for r in runs:
        msg = r["cp_error"]
        assert msg and "data.pack" in msg and "parallel.cp" in msg and "\n" not in msg, msg
