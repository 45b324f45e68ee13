"""LocalEngine with packed rows (inputs, targets, cu_seqlens): its step and held-out losses
equal the single-device reference on the same packed batch (tests/helpers.reference), and
differ from the same tokens read as one stream per row."""

import torch

from titans_scale.train.engine import LocalEngine
from tests.helpers import batches, make_cfg, reference

LAYERS = ("swa", "mag", "mac")


def test_local_engine_steps_and_evaluates_packed_rows(tmp_path):
    cfg = make_cfg(layers=LAYERS)
    cfg.train.run_dir = str(tmp_path)
    engine = LocalEngine(cfg)
    packed = batches(packed=True)
    before = engine.eval_loss(packed[:1])
    assert abs(engine.eval_loss([packed[0][:2]]) - before) > 1e-3      # the boundaries count
    steps = [engine.train_step(x, y, 1e-2, cu).loss for x, y, cu in packed]
    want, _ = reference(LAYERS, packed=True)
    assert abs(before - want[0]) <= 1e-6 * want[0]
    assert abs(steps[0] - want[0]) <= 1e-6 * want[0]
    assert all(torch.isfinite(torch.tensor(steps)))
