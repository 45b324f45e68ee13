"""Data parallelism with megatron-core: its DDP (gradient buffers, bucketed reduce-scatter) and
its distributed optimizer (Adam states and fp32 main weights sharded over data-parallel ranks,
parameters all-gathered after each step), plus finalize_model_grads (DP reduction and the
tied-embedding all-reduce between the first and last pipeline stage).

The engine owns the optimizer step; the forward/backward of a step is megatron's schedule
(pipeline.run_schedule), which calls ``finalize_model_grads`` at its end.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

from titans_scale.config import RunConfig
from titans_scale.model.params import no_weight_decay
from titans_scale.parallel.layout import Layout

__all__ = ["MegatronEngine"]


def _torch_adam(opt) -> bool:
    """Whether megatron's inner optimizer is torch's Adam(W), whose per-parameter 'step' the
    patches below are about. With Transformer Engine (or Apex) importable megatron uses their
    FusedAdam, which keeps 'step' in its param groups: those patches must not touch it."""
    return opt.optimizer is not None and type(opt.optimizer).__module__.startswith("torch.optim")


def _keep_step_on_load(opt) -> None:
    """megatron-core 0.16.1 with torch's AdamW (no Transformer Engine / Apex, so always on the CPU):
    loading a fully_reshardable checkpoint copies every key of the optimizer's per-parameter
    state from the checkpoint, but torch's per-parameter 'step' is restored separately (from the
    param groups) and is not among the checkpoint's tensors -> KeyError('step'). Hand the
    already-restored step back to that copy, so it is a no-op for 'step'. (This instance only.)"""
    original = opt._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        if "step" not in tensors:
            group, order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group]["params"][order]
            step = opt.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step.clone()}
        return original(model_param, tensors)

    opt._set_main_param_and_optimizer_states = set_states


class MegatronEngine:
    name = "megatron"

    def __init__(self, chunks: list, cfg: RunConfig, layout: Layout):
        o = cfg.optim
        self.weight_decay = o.weight_decay
        self._on_cpu = next(chunks[0].parameters()).device.type == "cpu"   # the run's device (train.device)
        ddp_config = DistributedDataParallelConfig(
            use_distributed_optimizer=True,
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,      # one reduce-scatter per bucket after the schedule
            overlap_param_gather=False,
            average_in_collective=False,    # grads are pre-scaled by 1/dp, then summed
        )
        # Bucketing only for the first chunk, as megatron-LM does for interleaved chunks.
        self.chunks = [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c,
                                               disable_bucketing=i > 0)
                       for i, c in enumerate(chunks)]
        # The schedule calls this after the last backward: DP reduce-scatter, embedding all-reduce.
        chunks[0].config.finalize_model_grads_func = finalize_model_grads
        opt_config = OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.lr * o.min_lr_ratio, weight_decay=o.weight_decay,
            adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.grad_clip,
            use_distributed_optimizer=True, params_dtype=torch.float32,
        )
        no_decay = ParamWithNamePredicate("titans_no_decay", lambda p, n: no_weight_decay(n, p))
        overrides = {ParamKey(with_name_predicate=no_decay): {"wd_mult": 0.0}}
        self.optimizer = get_megatron_optimizer(opt_config, self.chunks, config_overrides=overrides)
        for opt in filter(_torch_adam, self._distributed_optimizers()):
            _keep_step_on_load(opt)

    def zero_grad(self) -> None:
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self, lr: float) -> tuple[bool, float]:
        """One optimizer step at learning rate `lr` (clipping, sharded Adam, param all-gather).
        Returns (applied, global grad norm before clipping)."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            g["weight_decay"] = self.weight_decay * g.get("wd_mult", 1.0)
        ok, grad_norm, _ = self.optimizer.step()
        return bool(ok), float(grad_norm) if grad_norm is not None else float("nan")

    def full_grad(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The reduced gradient of `param` (after gather_grad_shards on every rank)."""
        return param.main_grad

    def gather_grad_shards(self) -> None:
        """With the distributed optimizer each DP rank reduces only its shard of every gradient
        bucket; all-gather the shards so `main_grad` holds the full reduced gradient everywhere
        (inspection and tests; the optimizer itself reads only its shard)."""
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)   # DDP's buffers: DP x CP
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if size == 1:
            return
        for c in self.chunks:
            for buffer in c.buffers:
                for bucket in buffer.buckets:
                    shard = bucket.grad_data.numel() // size
                    local = bucket.grad_data[rank * shard:(rank + 1) * shard].clone()
                    dist.all_gather_into_tensor(bucket.grad_data, local, group=group)

    # -- checkpoints (see parallel/checkpoint.py) -------------------------------------------
    def optimizer_state_for_checkpoint(self, model_sharded_state_dict: dict, loading: bool = False) -> dict:
        """The distributed optimizer's state in model space: per parameter, Adam moments and fp32
        weights shaped like the parameter and keyed by its name ("fully_reshardable": gathered
        over DP on save, sliced on load), so TP, PP and DP sizes may all change on resume.
        On the CPU (train.device) the gather runs over megatron's gloo DP group (its mem-efficient mode),
        the only one of its two paths that does not move the shards to a GPU."""
        if loading:
            self._allocate_state()
        metadata = {"distrib_optim_sharding_type": "fully_reshardable",
                    "distrib_optim_fully_reshardable_mem_efficient": self._on_cpu}
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=loading, metadata=metadata)

    def _distributed_optimizers(self) -> list:
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def _allocate_state(self) -> None:
        """A fresh optimizer has no Adam state, but the distributed optimizer's state_dict (which
        building the loading request calls) needs one: allocate zeros and step 0, as megatron's
        init_state_fn does, plus torch's per-parameter step (TE's FusedAdam keeps none)."""
        for opt in self._distributed_optimizers():
            inner = opt.optimizer
            if inner is None or len(inner.state):
                continue
            opt.init_state_fn(inner, opt.config)
            if not _torch_adam(opt):
                continue
            for group in inner.param_groups:
                for p in group["params"]:
                    inner.state[p].setdefault("step", torch.tensor(0.0))

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
        # megatron restores torch AdamW's per-parameter 'step' as ONE tensor shared by every
        # parameter; torch's foreach Adam increments each list entry in place, so a shared step
        # would advance once per parameter per step. Give each parameter its own copy.
        for opt in filter(_torch_adam, self._distributed_optimizers()):
            for st in opt.optimizer.state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].clone()
