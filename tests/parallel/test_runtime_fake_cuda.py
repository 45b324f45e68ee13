"""The parallel runtime's step (one rank, megatron engine) with the model chunks, megatron's DDP
buffers, the distributed optimizer's state and the batches placed by the production code on a
fake `cuda:0` (torch's FakeTensorMode on this CPU-only build): any op that mixes devices
raises FakeTensorDeviceMismatchError.

What runs on fake CUDA tensors: ParallelRuntime's constructor after its process groups (the
chunks moved to the run's device, Precision, MegatronEngine: DDP's contiguous grad buffers,
the distributed optimizer's fp32 main weights), the step's batch placement, megatron's
forward schedule (embedding, every mixer, loss), finalize_model_grads, the distributed
optimizer's step (clipping, Adam, the parameter copy back), the loss mean, and evaluation.
What does not, and how:
- The process groups are a real gloo world of one, built before the fake device exists
  (init_parallel's CUDA branch needs a CUDA runtime); megatron's CPU compat is NOT applied,
  so its allocations go to `torch.cuda.current_device()`, the fake cuda:0.
- Collectives are intercepted (they record the device of what they are handed and move
  nothing) and the backend answers 'nccl': gloo cannot move fake tensors.
- Backward cannot run (the autograd engine asks for a real accelerator): torch.autograd.backward
  gives every parameter a zero gradient on its own device and runs DDP's own per-parameter
  hook, which adds it into the parameter's main_grad bucket (as autograd would call it).
- Values do not exist: `.item()` and `bool()` read 1; the memory op runs `fused`.
"""

import sys
from types import SimpleNamespace

import pytest

from tests.helpers import guard_source_dir, run_child


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return guard_source_dir(tmp_path_factory)


def test_runtime_step_runs_on_fake_cuda(build_dir, tmp_path):
    assert run_child(__file__, "placed", build_dir, tmp_path) == "ok"


def test_a_batch_left_on_the_host_is_a_device_mismatch(build_dir, tmp_path):
    assert run_child(__file__, "batch_not_placed", build_dir, tmp_path) == "FakeTensorDeviceMismatchError"


def test_chunks_left_on_the_host_are_refused(build_dir, tmp_path):
    # megatron's distributed optimizer itself refuses parameters that are not CUDA tensors
    assert run_child(__file__, "chunks_not_placed", build_dir, tmp_path) == "TypeError"


# ------------------------------------------------------------------- the child process


def _child(scenario: str, build_dir: str, tmp: str) -> None:
    import contextlib

    import megatron.core.distributed.param_and_grad_buffer as buffer_mod
    import megatron.core.optimizer.clip_grads as clip_mod
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch._subclasses.fake_tensor import (FakeTensorDeviceMismatchError, FakeTensorMode,
                                               unset_fake_temporarily)

    import titans_scale.parallel.runtime as runtime_mod
    from tests.helpers import CUDA, SEQ, Values, load_guard, make_cfg
    from titans_scale.parallel.layout import plan_layout
    from titans_scale.parallel.state import ParallelInfo

    load_guard(build_dir)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
    ps.initialize_model_parallel()
    info = ParallelInfo(world_size=1, rank=0, tp=1, pp=1, cp=1, dp=1, vpp=None, tp_rank=0, pp_rank=0, cp_rank=0,
                        dp_rank=0, backend="nccl", cpu_mode=False)

    handed: list[torch.device] = []

    class Work:
        def wait(self):
            return True

    def collective(*args, **kwargs):
        handed.extend(t.device for t in [*args, *kwargs.values()] if torch.is_tensor(t))
        return Work()

    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast"):
        setattr(dist, name, collective)
    # megatron's grad buffers bound their collectives at import and batch them in a coalescing manager
    buffer_mod.dist_all_gather_func = buffer_mod.dist_reduce_scatter_func = collective
    buffer_mod._coalescing_manager = lambda *a, **k: contextlib.nullcontext(Work())
    dist.all_gather_object = lambda out, obj, group=None: out.__setitem__(0, obj)    # a world of one
    dist.get_backend = lambda group=None: "nccl"
    torch.cuda.current_device = lambda: 0
    # ... but the grad buffers are made with device=current_device(), and an int names the
    # default accelerator, which this build lacks: their module sees cuda:0 by name.
    buffer_mod.torch = SimpleNamespace(**{**vars(torch), "cuda": SimpleNamespace(**{
        **vars(torch.cuda), "current_device": lambda: CUDA})})
    torch.cuda.synchronize = lambda *a, **k: None
    # megatron's stand-in for apex's fused l2 norm (TE and apex are absent) builds its result
    # with torch.tensor(list of norms), which reads values below the fake mode: the same norm
    # as one device op (with TE or apex installed, a CUDA kernel does this).
    clip_mod.l2_norm_impl = lambda chunk, flag, lists, per_tensor: (
        torch.stack([torch.linalg.vector_norm(t) for ts in lists for t in ts]).norm().reshape(1), None)
    torch.Tensor.pin_memory = lambda self, *a, **k: self        # pinned memory needs a CUDA runtime

    build_chunks = runtime_mod.build_chunks

    def host_built(*args):
        with unset_fake_temporarily():       # built on the host, as in a real run
            chunks = build_chunks(*args)
        for m in (m for c in chunks for m in c.modules()):
            if hasattr(m, "scan_fn"):
                m.impl = "fused"             # the Triton path needs real memory
        if scenario == "chunks_not_placed":
            for c in chunks:
                c.to = lambda *a, c=c, **k: c
        return chunks

    runtime_mod.build_chunks = host_built
    runtime_mod.init_parallel = lambda **kw: info
    runtime_mod.resolve_device = lambda setting: CUDA
    if scenario == "batch_not_placed":
        runtime_mod.place_batch = lambda device, *tensors: tensors

    cfg = make_cfg(layers=("swa", "mag", "mac"))
    cfg.train.run_dir = f"{tmp}/run"
    x = torch.randint(0, 259, (cfg.data.batch_size, SEQ))

    with FakeTensorMode(allow_non_fake_inputs=True), Values():
        try:
            rt = runtime_mod.ParallelRuntime(cfg, plan_layout(cfg, 1))
        except TypeError as e:
            assert "torch.cuda.FloatTensor" in str(e), e
            print(type(e).__name__)
            return
        ddp = rt.engine.chunks

        def backward(tensors, grad_tensors=None, **kwargs):
            assert tensors.device == CUDA and tensors.requires_grad
            for chunk in ddp:
                for p in chunk.module.parameters():
                    p.grad = torch.zeros_like(p)
                    chunk._make_backward_post_hook(p)()      # DDP's hook: grad -> main_grad bucket
        torch.autograd.backward = backward

        try:
            result = rt.train_step(x, x, 1e-3)
            rt.eval_loss([(x, x)])
        except FakeTensorDeviceMismatchError as e:
            print(type(e).__name__)
            return
        assert result.applied, result
        params = {p.device for c in ddp for p in c.parameters()}
        buffers = {b.grad_data.device for c in ddp for b in c.buffers}
        opt = rt.engine.optimizer
        mains = {p.device for g in opt.optimizer.param_groups for p in g["params"]}
        moments = {v.device for s in opt.optimizer.state.values() for k, v in s.items() if k != "step"}
        assert params == buffers == mains == moments == set(handed) == {CUDA}, (params, buffers, mains, moments,
                                                                                set(handed))
        print("ok")


if __name__ == "__main__":
    _child(*sys.argv[1:])
