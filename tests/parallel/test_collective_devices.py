"""With an NCCL process group every tensor handed to a collective lives on the CUDA device
(titans_scale.device.collective_device): the runtime's preemption flag and loss mean, context
parallelism's transfers (tokens, shard lengths, the ring's shape headers), the TP gather, and
FP8's amax reduction. (The megatron engine's own collectives under nccl: test_runtime_fake_cuda.py.)

No GPU here: the collectives are intercepted (they record the device of what they are handed
and move nothing), the group's backend answers 'nccl', and tensors are FakeTensorMode's, which
can live on a fake cuda:0 on this CPU-only torch. That needs a fake CUDA device guard
(tests/helpers.py), so each check runs in a child process. The runtime's check also shows
its micro-batches placed on the device.
"""

import sys
from types import SimpleNamespace

import pytest

from tests.helpers import guard_source_dir, run_child


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return guard_source_dir(tmp_path_factory)


@pytest.mark.parametrize("check", ["runtime", "context_parallel", "tensor_parallel_gather", "fp8_amax"])
def test_collectives_get_cuda_tensors_under_nccl(build_dir, check):
    assert run_child(__file__, check, build_dir) == "all on cuda:0"


# ------------------------------------------------------------------- the child process


def _child(check: str, build_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from tests.helpers import CUDA, Values, load_guard
    from titans_scale.parallel import gather
    from titans_scale.parallel.context.comm import CPComm
    from titans_scale.parallel.context.ring import ring_apply
    from titans_scale.parallel.runtime import ParallelRuntime
    from titans_scale.precision import convert_linears_to_fp8, fp8_autocast

    load_guard(build_dir)
    handed: list[tuple[str, torch.device]] = []
    world = SimpleNamespace(rank=0, size=2)        # a 2-rank NCCL world seen from world.rank

    class Work:
        def wait(self):
            return True

    def record(name):
        def collective(*args, **kwargs):
            for a in [*args, *kwargs.values()]:
                for t in (a if isinstance(a, (list, tuple)) else [a]):
                    if torch.is_tensor(t):
                        handed.append((name, t.device))
            return Work()
        return collective

    for name in ("all_reduce", "all_gather", "all_gather_single", "reduce_scatter_single", "all_to_all_single",
                 "broadcast", "isend", "irecv"):
        setattr(dist, name, record(name))
    dist.is_initialized = lambda: True
    dist.get_backend = lambda group=None: "nccl"
    dist.get_rank = lambda group=None: world.rank
    dist.get_world_size = lambda group=None: world.size
    torch.cuda.current_device = lambda: 0
    torch.Tensor.pin_memory = lambda self, *a, **k: self       # pinned memory needs a CUDA runtime
    for name in ("get_model_parallel_group", "get_context_parallel_group", "get_data_parallel_group",
                 "get_tensor_model_parallel_group"):
        setattr(ps, name, lambda *a, **k: None)
    ps.get_tensor_model_parallel_rank = lambda: 0

    class Reads(Values):
        """`.item()` gives these numbers in turn."""

        def __init__(self, values):
            super().__init__()
            self.values = iter(values)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                return next(self.values)
            return super().__torch_dispatch__(func, types, args, kwargs)

    with FakeTensorMode(allow_non_fake_inputs=True), Values():
        if check == "runtime":
            rt = ParallelRuntime.__new__(ParallelRuntime)      # only its collective parts and batches
            rt.layout, rt.device = SimpleNamespace(cp=2, dp=2, microbatches=2), CUDA
            loss = torch.zeros((), device=CUDA)                  # the last stage's loss, on the GPU
            rt._global_mean([loss, loss])
            rt.any_rank(True)
            rt.layout.cp = 1                                     # the schedule's micro-batches, placed
            tokens = torch.zeros(4, 16, dtype=torch.long)
            assert {t.device for mb in rt._microbatches(tokens, tokens) for t in mb} == {CUDA}
            expected = {"all_reduce"}
        elif check == "context_parallel":
            comm = CPComm()
            assert comm.all_gather_ints(5) == [1, 1]
            x = torch.zeros(4, 8, device=CUDA)
            comm.begin(x)                                        # no anchor needs grad: a fresh token
            comm.all_gather(x)
            comm.shift(x, (4, 8))
            comm.end(x)
            for world.rank in (0, 1):                            # the ring's sender, then its receiver
                ring_apply(lambda xs, sts: (xs, sts), [x], [torch.zeros(4, 3, 3, device=CUDA)], CPComm(),
                           micro_batches=2)
            expected = {"all_gather_single", "isend", "irecv"}
        elif check == "fp8_amax":                                # FP8 scales agreed over TP x DP
            with unset_fake_temporarily():
                layers = torch.nn.Sequential(torch.nn.Linear(16, 16))
                convert_linears_to_fp8(layers)
            layers = layers.to(CUDA)
            # the layer-count probe reads (count, -count) back: fake tensors have no values
            with Reads([1, -1]), fp8_autocast(True, amax_reduction_group=object()):
                layers(torch.zeros(8, 16, device=CUDA))         # backward needs a real GPU
            expected = {"all_reduce"}
        else:
            shard = torch.zeros(4, 8)                            # gather_full copies to the host first
            assert gather._all_gather_tp(shard, dim=0).shape == (8, 8)
            expected = {"all_gather"}
    assert {n for n, _ in handed} == expected, handed
    devices = {d for _, d in handed}
    assert devices == {CUDA}, handed
    print("all on cuda:0")


if __name__ == "__main__":
    _child(*sys.argv[1:])
