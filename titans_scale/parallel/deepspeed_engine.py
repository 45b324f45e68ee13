"""Data parallelism with DeepSpeed ZeRO (stages 1, 2, 3) around megatron's TP/PP model chunks.

DeepSpeed gets megatron-core's process groups through ``MegatronMPU`` (its "mpu" interface), so
ZeRO partitions over the data-parallel group only and computes the gradient norm for clipping
over the model-parallel ranks, counting a TP-replicated parameter once (megatron's
``tensor_model_parallel`` tags) and the last stage's tied-embedding copy once
(``ds_pipe_replicated``).

The step is still megatron's schedule (pipeline.run_schedule): the engine's forward registers
DeepSpeed's backward hooks on its outputs, so the schedule's plain autograd backward runs
ZeRO's gradient handling (torch-style backward); ``managed_gradient_accumulation: false`` lets
the schedule own the micro-batches and makes each ``engine.step()`` the accumulation boundary.

On the CPU: ``DS_ACCELERATOR=cpu``; the client optimizer is torch's AdamW (no JIT-built fused
Adam); DeepSpeed JIT-builds its ``deepspeed_shm_comm`` op once at initialize (~35 s), cached in
TORCH_EXTENSIONS_DIR (default here: ``build/torch_extensions`` under the repository).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from titans_scale.config import RunConfig
from titans_scale.model.params import param_groups
from titans_scale.parallel.layout import Layout

__all__ = ["DeepSpeedEngine", "MegatronMPU", "default_extensions_dir"]


def default_extensions_dir() -> Path:
    """Where DeepSpeed's JIT-built ops are cached unless TORCH_EXTENSIONS_DIR says otherwise."""
    return Path(__file__).resolve().parents[2] / "build" / "torch_extensions"


# DeepSpeed's mpu function -> megatron.core.parallel_state's function of the same meaning.
_SAME_IN_MEGATRON = {name: name for name in (
    "get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size", "get_tensor_model_parallel_group",
    "get_tensor_model_parallel_src_rank", "get_pipeline_model_parallel_rank",
    "get_pipeline_model_parallel_world_size", "get_pipeline_model_parallel_group", "get_data_parallel_rank",
    "get_data_parallel_world_size", "get_data_parallel_group", "get_model_parallel_group")}
_SAME_IN_MEGATRON["get_pipe_parallel_group"] = "get_pipeline_model_parallel_group"


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface over megatron.core.parallel_state.

    "Model parallel" is DeepSpeed's name for every non-data-parallel rank (TP x PP): its rank
    names checkpoint files, its group sums gradient norms. The tensor-parallel rank (which
    replicated params count once) comes from get_tensor_model_parallel_rank. DeepSpeed probes
    the functions it may call with hasattr: only the ones above and below exist.
    """

    def __getattr__(self, name: str):
        if name in _SAME_IN_MEGATRON:
            return getattr(ps, _SAME_IN_MEGATRON[name])
        raise AttributeError(name)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return dist.get_rank(ps.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(ps.get_model_parallel_group())

    @staticmethod
    def get_data_parallel_group_ranks() -> list[int]:
        return dist.get_process_group_ranks(ps.get_data_parallel_group())


class _ScheduleView:
    """What megatron's schedule sees of a DeepSpeed-wrapped chunk: calls go through the engine
    (its hooks), attributes (config, set_input_tensor, model_type) come from the TitansStage.
    Needed because the engine's own ``config`` attribute is DeepSpeed's, not megatron's."""

    def __init__(self, engine):
        self.engine, self.module = engine, engine.module
        self.config, self.model_type = engine.module.config, engine.module.model_type

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def set_input_tensor(self, tensor) -> None:
        self.module.set_input_tensor(tensor)


def ds_config(cfg: RunConfig, layout: Layout) -> dict:
    """DeepSpeed's config for this run (optimizer hyper-parameters live in the client AdamW)."""
    zero = {"stage": layout.zero_stage, "overlap_comm": False, "contiguous_gradients": False,
            "reduce_scatter": True}
    return {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,     # megatron's schedule owns the micro-batches
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,      # torch's AdamW as the client optimizer
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, chunks: list, cfg: RunConfig, layout: Layout):
        if len(chunks) != 1:
            raise ValueError("DeepSpeedEngine wraps one model chunk per rank (parallel.vpp=1)")
        # DeepSpeed's accelerator is the run's device (the runtime placed the chunk on it)
        os.environ.setdefault("DS_ACCELERATOR", next(chunks[0].parameters()).device.type)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default_extensions_dir()))
        import deepspeed

        stage = chunks[0]
        o = cfg.optim
        optimizer = torch.optim.AdamW(param_groups(stage, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                      eps=o.eps, foreach=True)
        if layout.zero_stage == 3 and stage.post_process and stage.pre_process and stage.tied:
            # The head reads the embedding's weight outside the embedding module: ZeRO-3 must gather it.
            deepspeed.zero.register_external_parameter(stage.head, stage.embed.weight)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=stage, optimizer=optimizer, config=ds_config(cfg, layout), mpu=MegatronMPU(),
            dist_init_required=False)
        self.stage = stage
        self.chunks = [_ScheduleView(self.engine)]
        self.embedding_group = ps.get_embedding_group(check_initialized=False)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def _allreduce_tied_embedding(self) -> None:
        """First and last pipeline stage hold copies of a tied embedding: sum their gradients
        (what megatron's finalize_model_grads does for its own engine)."""
        s = self.stage
        if not s.tied or s.pre_process == s.post_process or self.embedding_group is None:
            return
        if dist.get_world_size(self.embedding_group) < 2:
            return
        w = s.shared_embedding_or_output_weight()
        if w.grad is not None:
            dist.all_reduce(w.grad, group=self.embedding_group)

    def step(self, lr: float) -> tuple[bool, float]:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self._allreduce_tied_embedding()
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return True, float(norm) if norm is not None else float("nan")
