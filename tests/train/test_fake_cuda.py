"""The single-process step with the model and batches placed by the production code on a fake
`cuda:0` (torch's FakeTensorMode on this CPU-only build): any op that mixes devices raises
FakeTensorDeviceMismatchError, so a missing placement fails here instead of on the cluster.

What runs on fake CUDA tensors (the guard that makes most of it possible: tests/helpers.py):
the whole forward (embedding, causal conv, memory scan, attention, loss) recording autograd
history, gradient clipping, AdamW, the scheduler, and evaluation. What does not, and how:
- Backward cannot run: the autograd engine asks for a real accelerator ("Cannot access
  accelerator device when none is available"). `Tensor.backward` is replaced by one that gives
  every parameter a gradient on its own device (what autograd does); the rest of the step
  (gradient clipping, AdamW, the scheduler) runs for real on the fake device.
- Values do not exist: `.item()` and `bool()` (the finiteness checks) read 1.
- The memory op's Triton path (picked for CUDA tensors) needs real memory: the memory layers
  run `fused` here, the path CPU runs take.
- Pinned host memory needs a CUDA runtime: `pin_memory` returns the tensor unchanged.
"""

import sys

import pytest

from tests.helpers import guard_source_dir, run_child


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return guard_source_dir(tmp_path_factory)


def test_step_runs_on_fake_cuda(build_dir, tmp_path):
    assert run_child(__file__, "placed", build_dir, tmp_path / "run") == "ok"


def test_a_batch_left_on_the_host_is_a_device_mismatch(build_dir, tmp_path):
    assert run_child(__file__, "batch_not_placed", build_dir, tmp_path / "run") == "FakeTensorDeviceMismatchError"


# ------------------------------------------------------------------- the child process


def _child(scenario: str, build_dir: str, run_dir: str) -> None:
    import torch
    from torch._subclasses.fake_tensor import (FakeTensorDeviceMismatchError, FakeTensorMode,
                                               unset_fake_temporarily)

    import titans_scale.train.engine as engine_mod
    from tests.helpers import CUDA as cuda
    from tests.helpers import Values, load_guard
    from titans_scale.config import RunConfig

    load_guard(build_dir)

    build = engine_mod.TitansLM

    def host_built(model_cfg):
        # TitansLM builds on the host as in a real run; modules made of fake tensors cannot
        # be moved (`.to` swaps their parameters, which fake tensors refuse).
        with unset_fake_temporarily():
            model = build(model_cfg)
        for m in model.modules():
            if hasattr(m, "scan_fn"):
                m.impl = "fused"
        return model

    engine_mod.TitansLM = host_built
    engine_mod.resolve_device = lambda setting: cuda
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    if scenario == "batch_not_placed":
        engine_mod.place_batch = lambda device, *tensors: tensors

    cfg = RunConfig()
    m = cfg.model
    m.d_model, m.n_heads, m.layers, m.chunk_size, m.window, m.segment_len = 32, 2, ["swa", "mag", "mac"], 8, 16, 16
    cfg.train.run_dir = run_dir
    inputs, targets = torch.randint(0, 256, (2, 64)), torch.randint(0, 256, (2, 64))

    with FakeTensorMode(allow_non_fake_inputs=True), Values():
        engine = engine_mod.LocalEngine(cfg)
        params = list(engine.model.parameters())

        def backward(loss, *args, **kwargs):
            assert loss.device == cuda and loss.requires_grad
            for p in params:
                p.grad = torch.zeros_like(p)
        torch.Tensor.backward = backward

        try:
            engine.train_step(inputs, targets, 1e-3)
            engine.eval_loss([(inputs, targets)])
        except FakeTensorDeviceMismatchError as e:
            print(type(e).__name__)
            return
        devices = {p.device for p in params} | {b.device for b in engine.model.buffers()}
        moments = {v.device for s in engine.optimizer.state.values() for k, v in s.items() if k != "step"}
        assert devices == moments == {cuda}, (devices, moments)
        print("ok")


if __name__ == "__main__":
    _child(*sys.argv[1:])
