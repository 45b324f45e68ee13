"""Context parallelism: one long sequence split over ranks, the memory update exact.

See docs/context_parallel.md. Entry points:
  cp_memory_scan          the memory op on a sharded sequence (a2a | state_passing | ring)
  apply_context_parallel  turn a model's Block mixers into their context-parallel versions
  check_cp_config         config-time check of a strategy against a ModelConfig and cp x tp
  shard_bounds            how a sequence is split into per-rank shards (local_shard slices one)
  cp_allreduce_grads      sum the partial parameter gradients over the CP group
  CPComm                  the CP group's differentiable, byte-counted, ordered collectives
"""

from .apply import (CPLayerState, apply_context_parallel, check_cp_config, cp_allreduce_grads, local_shard,
                    remove_context_parallel)
from .comm import CPComm
from .scan import check_memory_strategy, cp_memory_scan
from .shard import STRATEGIES, CPConfigError, ShardInfo, shard_bounds

__all__ = ["CPComm", "CPConfigError", "CPLayerState", "STRATEGIES", "ShardInfo", "apply_context_parallel",
           "check_cp_config", "check_memory_strategy", "cp_allreduce_grads", "cp_memory_scan", "local_shard",
           "remove_context_parallel", "shard_bounds"]
