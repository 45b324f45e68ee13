"""megatron-core's own parallel code paths on CPU: real multi-process gloo runs.

Each test spawns its ranks once (titans_scale.parallel.launch_utils.run_distributed) and checks
several things in them, because starting processes that import megatron is the slow part.
References are computed in this (parent) process with plain single-device PyTorch from the
same seeds, so a wrong collective, a wrong shard or a broken RNG route fails the comparison.
"""

from __future__ import annotations

import logging
import os
from functools import partial

import pytest
import torch

from titans_scale.parallel.launch_utils import DistributedRunError, run_distributed
from titans_scale.parallel.megatron_cpu import apply_megatron_cpu_compat, applied_changes
from titans_scale.parallel.state import ParallelConfigError, destroy_parallel, init_parallel

# The compat (and so these runs) is only active without CUDA; GPU runs are tested elsewhere.
cpu_mode_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="tests megatron's CPU development mode; CUDA is present here"
)

ATOL, RTOL = 1e-5, 1e-5
SEED = 1234
S, B, H, F = 8, 2, 6, 8  # sequence, micro-batch, hidden, MLP width (F divisible by TP=2)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- tensor parallel and RNG


def _mlp_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "x": torch.randn(S, B, H, generator=g),
        "w1": torch.randn(F, H, generator=g) / H**0.5,
        "b1": torch.randn(F, generator=g),
        "w2": torch.randn(H, F, generator=g) / F**0.5,
        "b2": torch.randn(H, generator=g),
        "dy": torch.randn(S, B, H, generator=g),  # upstream gradient of the MLP output
    }


def _dense_mlp(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Single-process reference: y = W2 gelu(W1 x + b1) + b2, backward from dy."""
    p = {k: d[k].clone().requires_grad_(True) for k in ("x", "w1", "b1", "w2", "b2")}
    h = torch.nn.functional.gelu(p["x"] @ p["w1"].t() + p["b1"])
    y = h @ p["w2"].t() + p["b2"]
    y.backward(d["dy"])
    return {"y": y.detach(), **{f"d{k}": v.grad for k, v in p.items()}}


def _tp_mlp(sequence_parallel: bool) -> dict[str, torch.Tensor]:
    """Column(gather_output=False) -> gelu -> Row(input_is_parallel=True), gathered results."""
    import torch.distributed as dist
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        gather_from_sequence_parallel_region,
        scatter_to_sequence_parallel_region,
    )

    tp = parallel_state.get_tensor_model_parallel_world_size()
    r = parallel_state.get_tensor_model_parallel_rank()
    d = _mlp_data()
    cfg = ModelParallelConfig(
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel, use_cpu_initialization=True
    )
    zeros = torch.nn.init.zeros_  # weights are copied in below
    col = ColumnParallelLinear(H, F, config=cfg, init_method=zeros, bias=True, gather_output=False)
    row = RowParallelLinear(
        F, H, config=cfg, init_method=zeros, bias=True, input_is_parallel=True, skip_bias_add=False
    )
    shard = F // tp
    with torch.no_grad():  # this rank's shards of the reference weights
        col.weight.copy_(d["w1"][r * shard : (r + 1) * shard])
        col.bias.copy_(d["b1"][r * shard : (r + 1) * shard])
        row.weight.copy_(d["w2"][:, r * shard : (r + 1) * shard])
        row.bias.copy_(d["b2"])

    x = d["x"].clone().requires_grad_(True)
    inp = scatter_to_sequence_parallel_region(x) if sequence_parallel else x
    h, _ = col(inp)
    y, _ = row(torch.nn.functional.gelu(h))
    dy = d["dy"].chunk(tp, dim=0)[r] if sequence_parallel else d["dy"]
    y.backward(dy)
    if sequence_parallel:
        y = gather_from_sequence_parallel_region(y.detach(), tensor_parallel_output_grad=False)
        # Each rank saw only its sequence shard: the replicated bias' grad is partial, the
        # all-reduce megatron's finalize_model_grads does for sequence-parallel params.
        assert getattr(row.bias, "sequence_parallel", False)
        dist.all_reduce(row.bias.grad, group=parallel_state.get_tensor_model_parallel_group())

    def gather(t: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        return torch.cat(parts, dim=dim)

    return {
        "y": y.detach(),
        "dx": x.grad,
        "dw1": gather(col.weight.grad, 0),
        "db1": gather(col.bias.grad, 0),
        "dw2": gather(row.weight.grad, 1),
        "db2": row.bias.grad,
    }


def _gather_output() -> dict[str, torch.Tensor]:
    """ColumnParallelLinear(gather_output=True): every rank holds the full output."""
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear

    tp = parallel_state.get_tensor_model_parallel_world_size()
    r = parallel_state.get_tensor_model_parallel_rank()
    d = _mlp_data()
    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)
    col = ColumnParallelLinear(
        H, F, config=cfg, init_method=torch.nn.init.zeros_, bias=True, gather_output=True
    )
    shard = F // tp
    with torch.no_grad():
        col.weight.copy_(d["w1"][r * shard : (r + 1) * shard])
        col.bias.copy_(d["b1"][r * shard : (r + 1) * shard])
    x = d["x"].clone().requires_grad_(True)
    out, _ = col(x)
    out.pow(2).sum().backward()
    return {"out": out.detach(), "dx": x.grad, "dw_local": col.weight.grad, "rank": r}


def _rng_checks(seed: int) -> dict[str, object]:
    """The model-parallel RNG tracker on the CPU generator: fork, GPU-style init, recompute."""
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, checkpoint, get_cuda_rng_tracker

    r = parallel_state.get_tensor_model_parallel_rank()
    tracker = get_cuda_rng_tracker()
    # Collect what megatron's RNG module logs: its "CPU RNG state changed" warning is a false
    # alarm in CPU mode (the tracked stream is the CPU generator) and must be filtered.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("megatron.core.tensor_parallel.random").addHandler(handler)
    # init_parallel left the default generator at `seed`: draws outside any fork follow it,
    # draws inside follow the model-parallel stream seed + 2718 + tp_rank, and each stream
    # resumes where it stopped.
    outside_1 = torch.rand(3)
    with tracker.fork():
        inside_1 = torch.rand(3)
    outside_2 = torch.rand(3)
    with tracker.fork():
        inside_2 = torch.rand(3)

    # use_cpu_initialization=False: megatron's GPU init path (_initialize_affine_weight_gpu)
    # draws the weight inside tracker.fork(). Read the stream's state first to predict it.
    stream_state = tracker.get_states()["model-parallel-rng"].clone()
    cfg = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=False)
    init = partial(torch.nn.init.normal_, std=0.5)
    col = ColumnParallelLinear(H, F, config=cfg, init_method=init, bias=True)
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(stream_state)
        expected_w = torch.empty(F // 2, H).normal_(std=0.5)

    # Activation recompute replays the dropout mask drawn inside a fork (rng state save/restore);
    # distribute_saved_activations=True also splits the saved input over the TP ranks.
    x = torch.randn(4, H, requires_grad=True)

    def body(t):
        with tracker.fork():
            return torch.nn.functional.dropout(t * 3.0, p=0.5, training=True)

    rng_before = torch.get_rng_state(), tracker.get_states()
    y_ckpt = checkpoint(body, True, x)
    y_ckpt.sum().backward()
    grad_ckpt = x.grad.clone()
    x.grad = None
    torch.set_rng_state(rng_before[0])
    tracker.set_states({k: v.clone() for k, v in rng_before[1].items()})
    y_plain = body(x)
    y_plain.sum().backward()

    return {
        "rank": r,
        "outside": torch.stack([outside_1, outside_2]),
        "inside": torch.stack([inside_1, inside_2]),
        "weight_device": str(col.weight.device),
        "weight_matches_stream": bool(torch.equal(col.weight.detach(), expected_w)),
        "recompute_equal": bool(torch.equal(y_ckpt, y_plain) and torch.equal(grad_ckpt, x.grad)),
        "dropout_active": bool((y_plain == 0).any() and (y_plain != 0).any()),
        "log": [rec.getMessage() for rec in records],
    }


# ---------------------------------------------------------------- pipeline parallel


def _stage_params(vstage: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + vstage)
    return {"w": torch.randn(H, H, generator=g) / H**0.5, "b": torch.randn(H, generator=g) * 0.1}


def _microbatches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(S, B, H, generator=g), torch.randn(S, B, H, generator=g)) for _ in range(n)]


class _ToyStage(torch.nn.Module):
    """One pipeline (virtual) stage: x -> tanh(x W^T + b), in megatron's [s, b, h] layout."""

    def __init__(self, config, vstage: int, first: bool):
        from megatron.core.enums import ModelType

        super().__init__()
        self.config, self.model_type, self.first = config, ModelType.encoder_or_decoder, first
        p = _stage_params(vstage)
        self.w, self.b = torch.nn.Parameter(p["w"]), torch.nn.Parameter(p["b"])
        self.input_tensor = None

    def set_input_tensor(self, input_tensor):
        # Called by the schedule with the activation received from the previous stage.
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(self, x):
        h = x if self.first else self.input_tensor
        return torch.tanh(h @ self.w.t() + self.b)


def _forward_step(data_iterator, model):
    x, target = next(data_iterator)

    def loss_func(out):
        loss = (out - target).pow(2).mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

    return model(x), loss_func


def _run_pipeline(vpp: int | None, n_micro: int) -> dict[str, object]:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    pp = 2
    info = init_parallel(pp=pp, vpp=vpp, seed=SEED)
    chunks = vpp or 1
    cfg = TransformerConfig(
        num_layers=pp * chunks,
        hidden_size=H,
        num_attention_heads=1,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        # Interleaving: megatron-LM's own default. At PP=2 both directions go to the same peer,
        # and the batched send/recv then pairs the activation with the gradient buffer.
        overlap_p2p_comm=vpp is not None,
        batch_p2p_comm=vpp is None,
    )
    # Virtual stage of chunk c on pipeline rank r is c * pp + r (megatron's interleaving).
    vstages = [c * pp + info.pp_rank for c in range(chunks)]
    model = [_ToyStage(cfg, v, first=(v == 0)) for v in vstages]
    data = [iter(_microbatches(n_micro)) for _ in range(chunks)]
    fb = get_forward_backward_func()
    losses = fb(
        forward_step_func=_forward_step,
        data_iterator=data if vpp else data[0],
        model=model if vpp else model[0],
        num_microbatches=n_micro,
        seq_length=S,
        micro_batch_size=B,
        forward_only=False,
    )
    out = {
        "schedule": fb.__name__,
        "pp_rank": info.pp_rank,
        "last": parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        "losses": [r["loss"] for r in losses],
        "grads": {v: (m.w.grad.clone(), m.b.grad.clone()) for v, m in zip(vstages, model)},
    }
    return out


def _pipeline_reference(n_stages: int, n_micro: int):
    params = [{k: v.requires_grad_(True) for k, v in _stage_params(s).items()} for s in range(n_stages)]
    losses = []
    for x, target in _microbatches(n_micro):
        h = x
        for p in params:
            h = torch.tanh(h @ p["w"].t() + p["b"])
        loss = (h - target).pow(2).mean()
        (loss / n_micro).backward()  # the schedules average over micro-batches
        losses.append(loss.detach())
    return losses, {s: (p["w"].grad, p["b"].grad) for s, p in enumerate(params)}


# ---------------------------------------------------------------- one 2-rank run for (a)-(d), (f), (g)

N_MICRO = 4


def _two_rank_worker(seed: int, n_micro: int) -> dict[str, object]:
    info = init_parallel(tp=2, seed=seed)  # joins through torchrun's env:// variables
    out: dict[str, object] = {
        "changes": info.cpu_compat_changes,
        "again": apply_megatron_cpu_compat(),  # (g) idempotent: nothing left to change
        "all_changes": applied_changes(),
        "backend": info.backend,
    }
    out["rng"] = _rng_checks(seed)
    out["tp"] = _tp_mlp(sequence_parallel=False)
    out["sp"] = _tp_mlp(sequence_parallel=True)
    out["gather"] = _gather_output()
    # init_parallel rebuilds megatron's groups on the same process group for each layout.
    out["1f1b"] = _run_pipeline(None, n_micro)
    out["interleaved"] = _run_pipeline(2, n_micro)
    destroy_parallel()
    out["dist_after_destroy"] = torch.distributed.is_initialized()
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, object]]:
    if torch.cuda.is_available():
        pytest.skip("tests megatron's CPU development mode; CUDA is present here")
    # backend=None: init_parallel itself initialises torch.distributed (gloo) from the env.
    return run_distributed(_two_rank_worker, 2, SEED, N_MICRO, backend=None)


def test_compat_lists_changes_once_and_init_parallel_round_trips(two_ranks):
    for res in two_ranks:
        assert res["backend"] == "gloo" and not res["dist_after_destroy"]
        # (g) the first call (inside init_parallel) listed every change; a second changed nothing.
        assert res["changes"] and res["again"] == [] and res["all_changes"] == res["changes"]
        assert any("pipeline_parallel.schedules.torch" in c for c in res["changes"])
        assert any("random._set_cuda_rng_state" in c for c in res["changes"])


@pytest.mark.parametrize("mode", ["tp", "sp"])
def test_column_row_parallel_mlp_matches_dense(two_ranks, mode):
    """(a) TP=2 Column(gather_output=False)+Row(input_is_parallel) == dense, fwd and bwd;
    (b) the same with sequence_parallel=True (GlobalMemoryBuffer, all-gather/reduce-scatter)."""
    ref = _dense_mlp(_mlp_data())
    for res in two_ranks:
        for key in ("y", "dx", "dw1", "db1", "dw2", "db2"):
            assert _close(res[mode][key], ref[key]), f"{mode}: {key} differs from the dense MLP"


def test_column_parallel_gather_output(two_ranks):
    """(c) gather_output=True: the full output on every rank; the weight grad is the shard's."""
    d = _mlp_data()
    x = d["x"].clone().requires_grad_(True)
    w1 = d["w1"].clone().requires_grad_(True)
    out = x @ w1.t() + d["b1"]
    out.pow(2).sum().backward()
    shard = F // 2
    for res in two_ranks:
        g = res["gather"]
        assert _close(g["out"], out.detach()) and _close(g["dx"], x.grad)
        assert _close(g["dw_local"], w1.grad[g["rank"] * shard : (g["rank"] + 1) * shard])


def test_rng_tracker_on_cpu(two_ranks):
    """(f) megatron's tracker streams, on the CPU generator: fork, GPU-style init, recompute."""
    for res in two_ranks:
        rng, tp_rank = res["rng"], res["rng"]["rank"]
        default = torch.Generator().manual_seed(SEED)
        mp_stream = torch.Generator().manual_seed(SEED + 2718 + tp_rank)
        assert torch.equal(rng["outside"], torch.rand(2, 3, generator=default))
        assert torch.equal(rng["inside"], torch.rand(2, 3, generator=mp_stream))
        assert rng["weight_device"] == "cpu" and rng["weight_matches_stream"]
        assert rng["dropout_active"] and rng["recompute_equal"]
        assert rng["log"] == []
    assert not torch.equal(two_ranks[0]["rng"]["inside"], two_ranks[1]["rng"]["inside"])
    assert torch.equal(two_ranks[0]["rng"]["outside"], two_ranks[1]["rng"]["outside"])


@pytest.mark.parametrize(
    "name, schedule, n_stages",
    [
        ("1f1b", "forward_backward_pipelining_without_interleaving", 2),
        ("interleaved", "forward_backward_pipelining_with_interleaving", 4),
    ],
)
def test_pipeline_schedule_matches_one_process(two_ranks, name, schedule, n_stages):
    """(d) megatron's get_forward_backward_func() at PP=2 (and VPP=2): losses and grads."""
    ref_losses, ref_grads = _pipeline_reference(n_stages, N_MICRO)
    seen = set()
    for res in two_ranks:
        got = res[name]
        assert got["schedule"] == schedule
        if got["last"]:
            assert len(got["losses"]) == N_MICRO
            assert all(_close(a, b) for a, b in zip(got["losses"], ref_losses)), "losses differ"
        else:
            assert got["losses"] == []
        for v, (gw, gb) in got["grads"].items():
            assert _close(gw, ref_grads[v][0]) and _close(gb, ref_grads[v][1]), f"stage {v} grads"
            seen.add(v)
    assert seen == set(range(n_stages))


# ---------------------------------------------------------------- dist_checkpointing (e)


def _ckpt_tensor() -> torch.Tensor:
    return torch.arange(4 * 8, dtype=torch.float32).reshape(4, 8) / 7.0


def _ckpt_worker(sync_dir: str, async_dir: str) -> dict[str, object]:
    """Save under TP=2 x DP=2 (sync and async), reload under TP=1 (DP=4) and TP=4 (DP=1)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    full = _ckpt_tensor()

    def sharded(info, data):
        # Split the last dim over TP (row-parallel-like); DP ranks hold replicas.
        return ShardedTensor.from_rank_offsets(
            "w", data, (1, info.tp_rank, info.tp), replica_id=info.dp_rank
        )

    info = init_parallel(tp=2, seed=SEED)
    local = full.chunk(info.tp, dim=1)[info.tp_rank].clone()
    dist_checkpointing.save({"w": sharded(info, local), "step": 17}, sync_dir)  # default: torch_dist
    state = {"w": sharded(info, local), "step": 18}
    request = dist_checkpointing.save(state, async_dir, async_sharded_save=True)
    calls = AsyncCallsQueue()
    calls.schedule_async_request(request)
    calls.maybe_finalize_async_calls(blocking=True)
    calls.close()
    destroy_parallel()

    out: dict[str, object] = {}
    for name, ckpt_dir in (("sync", sync_dir), ("async", async_dir)):
        out[f"{name}_step"] = dist_checkpointing.load_common_state_dict(ckpt_dir)["step"]
        for tp in (1, 4):
            info = init_parallel(tp=tp, seed=SEED)
            target = torch.zeros(full.shape[0], full.shape[1] // tp)
            loaded = dist_checkpointing.load({"w": sharded(info, target)}, ckpt_dir)
            out[f"{name}_tp{tp}"] = (info.tp_rank, loaded["w"])
            destroy_parallel()
    return out


@cpu_mode_only
def test_dist_checkpointing_reshard_on_load(tmp_path):
    dirs = [tmp_path / "sync", tmp_path / "async"]
    for d in dirs:
        d.mkdir()  # megatron saves into an existing, empty directory
    results = run_distributed(_ckpt_worker, 4, *map(str, dirs))
    full = _ckpt_tensor()
    for name, step in (("sync", 17), ("async", 18)):
        for res in results:
            assert res[f"{name}_step"] == step
            assert torch.equal(res[f"{name}_tp1"][1], full)
            tp_rank, shard = res[f"{name}_tp4"]
            assert torch.equal(shard, full.chunk(4, dim=1)[tp_rank])
        assert sorted(res[f"{name}_tp4"][0] for res in results) == [0, 1, 2, 3]


# ---------------------------------------------------------------- helpers, in this process


def test_compat_is_a_noop_when_cuda_is_available(monkeypatch):
    import megatron.core.tensor_parallel.mappings as mappings

    before, torch_before = applied_changes(), mappings.torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert apply_megatron_cpu_compat() == []
    assert applied_changes() == before and mappings.torch is torch_before


def test_init_parallel_rejects_bad_layouts(monkeypatch):
    with pytest.raises(ParallelConfigError, match="tp must be"):
        init_parallel(tp=0)
    with pytest.raises(ParallelConfigError, match="vpp=2 needs pp >= 2"):
        init_parallel(pp=1, vpp=2)
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ParallelConfigError, match="torchrun"):
        init_parallel()


def _fail_on_rank_1():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise KeyError("boom from rank 1")
    dist.barrier()  # rank 0 waits here until rank 1 is gone: must not hang the parent
    return os.environ["OMP_NUM_THREADS"]


def test_run_distributed_surfaces_child_tracebacks():
    with pytest.raises(DistributedRunError) as err:
        run_distributed(_fail_on_rank_1, 2, timeout_s=60)
    text = str(err.value)
    assert "--- rank 1 ---" in text and "KeyError: 'boom from rank 1'" in text
    assert "_fail_on_rank_1" in text  # the child's traceback, not just its message
