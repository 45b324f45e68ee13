"""Sharded checkpoints of a distributed run that load into another TP / PP / DP layout.

megatron engine: megatron-core dist_checkpointing (torch_dist format). Each rank contributes
ShardedTensors keyed by the single-device TitansLM parameter name, with its global offset
along the TP partition dim (a parameter's place in the pipeline never enters the key, so
pipeline splits may change); the distributed optimizer maps its Adam moments and fp32 main
weights onto the same keys (``DistributedOptimizer.sharded_state_dict``). On load, every rank
asks for its own new shards and dist_checkpointing reads the overlapping pieces: that is the
resharding. The vocabulary padding (layout.VOCAB_MULTIPLE) is the same under every power-of-2
TP size, so the embedding reshards too.

deepspeed engine: DeepSpeed's own ``save_checkpoint`` / ``load_checkpoint`` (ZeRO partitions
of the optimizer state per DP rank); it resumes in the same layout only, and a different
layout is refused with a one-line error (DeepSpeed's universal-checkpoint conversion is the
way to change it).

Both write into ``<run_dir>/checkpoints/.step_N.tmp``; after a barrier rank 0 commits it
(io/commit.py: a manifest of checksums, rename into place, then the ``latest`` pointer), exactly
like single-process checkpoints. The trainer state (step, data position) travels as the common
state of the checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from titans_scale.errors import CheckpointError
from titans_scale.io.commit import checkpoint_dir, latest_checkpoint, staged_checkpoint, step_folder
from titans_scale.io.manifest import verify_manifest
from titans_scale.parallel.gather import _unwrap
from titans_scale.parallel.layout import Layout
from titans_scale.precision.fp8_emulation import is_fp8_meta_key

__all__ = ["ShardedCheckpointer", "model_sharded_state_dict"]

LAYOUT_FILE = "layout.json"


class _ExpectedCommonStateDifference(logging.Filter):
    """The distributed optimizer's mem-efficient (gloo) save gathers its state on DP rank 0 only,
    so the other ranks' common state has ``param_state = None``; megatron's validation then logs
    a difference that is by design. Drop exactly that message (nothing mismatched)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("common state dict differs" in msg and "Mismatched keys: []" in msg
                    and "('optimizer', 'param_state')" in msg)


logging.getLogger("megatron.core.dist_checkpointing.validation").addFilter(_ExpectedCommonStateDifference())


def model_sharded_state_dict(chunks) -> dict:
    """{TitansLM name: ShardedTensor over this rank's shard} for every parameter of `chunks`.
    replica_id is (pipeline copy, TP replica, DP replica): (0, 0, 0) marks the one writer."""
    from megatron.core.dist_checkpointing import ShardedTensor

    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)   # CP ranks hold replicas too
    out: dict = {}
    for chunk in chunks:
        stage = _unwrap(chunk)
        for name, p in stage.named_parameters():
            full = stage.full_name(name)
            pipe_copy = 0
            if full is None:                       # last stage's copy of the tied embedding
                full, pipe_copy = "embed.weight", 1
            if getattr(p, "tensor_model_parallel", False):
                out[f"{full}@{pipe_copy}"] = ShardedTensor.from_rank_offsets(
                    full, p, (p.partition_dim, tp_rank, tp), replica_id=(pipe_copy, 0, dp_rank))
            else:
                out[f"{full}@{pipe_copy}"] = ShardedTensor.from_rank_offsets(
                    full, p, replica_id=(pipe_copy, tp_rank, dp_rank))
        for name, b in stage.named_buffers():
            # FP8 scales and amax histories: equal on every TP and DP rank (amaxes are reduced
            # over both), so saved once, like a replicated weight; a resumed run keeps calibrating
            if is_fp8_meta_key(name):
                out[f"{name}@0"] = ShardedTensor.from_rank_offsets(name, b, replica_id=(0, tp_rank, dp_rank))
    return out


def _params(model_sd: dict) -> dict:
    """The parameters' entries (what the optimizer state maps onto), without FP8 buffers."""
    return {k: sh for k, sh in model_sd.items() if not is_fp8_meta_key(sh.key)}


class ShardedCheckpointer:
    def __init__(self, run_dir: str | Path, engine, layout: Layout, keep: int = 2):
        self.dir = checkpoint_dir(run_dir)
        self.engine, self.layout, self.keep = engine, layout, keep

    # -- paths ------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        return latest_checkpoint(self.dir)

    # -- save -------------------------------------------------------------------------------
    def save(self, step: int, trainer_state: dict) -> Path:
        rank = dist.get_rank()
        final = self.dir / step_folder(step)
        # rank 0 creates and commits the folder; every rank writes its shards into it
        with staged_checkpoint(self.dir, step, self.keep, owner=rank == 0) as tmp:
            if rank == 0:
                (tmp / "model_optim").mkdir()      # dist_checkpointing wants it to exist
            dist.barrier()
            if self.engine.name == "megatron":
                self._save_megatron(tmp / "model_optim", trainer_state)
            else:
                self._save_deepspeed(tmp / "model_optim", trainer_state)
            dist.barrier()
            if rank == 0:
                (tmp / LAYOUT_FILE).write_text(json.dumps(self._layout_record(), indent=1))
        dist.barrier()
        return final

    def _layout_record(self) -> dict:
        lay = self.layout
        return {"engine": lay.engine, "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "dp": lay.dp,
                "zero_stage": lay.zero_stage if lay.engine == "deepspeed" else None,
                "format": "megatron-dist-checkpointing" if lay.engine == "megatron" else "deepspeed"}

    def _save_megatron(self, folder: Path, trainer_state: dict) -> None:
        from megatron.core import dist_checkpointing

        model_sd = model_sharded_state_dict(self.engine.chunks)
        state = {"model": model_sd, "optimizer": self.engine.optimizer_state_for_checkpoint(_params(model_sd)),
                 "trainer": trainer_state}
        dist_checkpointing.save(state, str(folder))

    def _save_deepspeed(self, folder: Path, trainer_state: dict) -> None:
        self.engine.engine.save_checkpoint(str(folder), tag="state", client_state={"trainer": trainer_state},
                                           save_latest=False)

    # -- load -------------------------------------------------------------------------------
    def load(self, folder: Path) -> dict:
        """Load model + optimizer into this layout; returns the trainer state."""
        if dist.get_rank() == 0:
            verify_manifest(folder)
        dist.barrier()
        saved = json.loads((folder / LAYOUT_FILE).read_text()) if (folder / LAYOUT_FILE).is_file() else None
        if saved is None:
            raise CheckpointError(f"checkpoint '{folder}' has no {LAYOUT_FILE}: it is not a distributed "
                                  "checkpoint; resume it with one process (no torchrun)")
        if saved["format"] == "megatron-dist-checkpointing" and self.engine.name == "megatron":
            return self._load_megatron(folder / "model_optim")
        if saved["format"] == "deepspeed" and self.engine.name == "deepspeed":
            now = self._layout_record()
            if saved != now:
                raise CheckpointError(
                    f"checkpoint '{folder}' was written by DeepSpeed with layout {saved}; this run is {now}. "
                    "DeepSpeed checkpoints resume in the same layout only (use parallel.engine='megatron' "
                    "for resharding checkpoints)")
            return self._load_deepspeed(folder / "model_optim")
        raise CheckpointError(f"checkpoint '{folder}' was written by the {saved['engine']} engine; this run "
                              f"uses parallel.engine='{self.engine.name}': resume with the same engine")

    def _load_megatron(self, folder: Path) -> dict:
        from megatron.core import dist_checkpointing

        model_sd = model_sharded_state_dict(self.engine.chunks)
        saved = dist_checkpointing.load_tensors_metadata(str(folder))
        missing_fp8 = [k for k, sh in model_sd.items() if is_fp8_meta_key(sh.key) and sh.key not in saved]
        for k in missing_fp8:            # written by a run without FP8: its layers start fresh scales
            del model_sd[k]
        state = {"model": model_sd,
                 "optimizer": self.engine.optimizer_state_for_checkpoint(_params(model_sd), loading=True),
                 "trainer": None}
        try:
            loaded = dist_checkpointing.load(state, str(folder))
        except Exception as e:  # dist_checkpointing raises deep errors for missing keys / shapes
            raise CheckpointError(f"checkpoint '{folder.parent}' does not fit this model: "
                                  f"{str(e).splitlines()[0][:300]}") from None
        with torch.no_grad():
            for key, sh in model_sd.items():
                sh.data.copy_(loaded["model"][key])
        self.engine.load_optimizer_state(loaded["optimizer"])
        return loaded["trainer"]

    def _load_deepspeed(self, folder: Path) -> dict:
        _, client = self.engine.engine.load_checkpoint(str(folder), tag="state")
        if client is None:
            raise CheckpointError(f"DeepSpeed could not load '{folder}'")
        return client["trainer"]
