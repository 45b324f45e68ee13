"""Pipeline parallelism: which layers each (virtual) stage holds, and the step's schedule.

``partition_layers`` splits the blocks into ``pp * vpp`` contiguous virtual stages, balancing
their training FLOPs (titans_scale.flops) with the embedding counted on the first stage and
the output head on the last, so the head's vocabulary matmul does not make the last stage the
straggler. Virtual stage ``v`` lives on pipeline rank ``v % pp`` as its model chunk
``v // pp`` (megatron's interleaving).

``run_schedule`` runs one step's micro-batches through megatron-core's schedules
(``get_forward_backward_func``: no pipelining, 1F1B, or interleaved 1F1B) and returns the
micro-batch losses on the last stage (empty elsewhere).
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache, partial

import torch

from titans_scale.flops import step_flops
from titans_scale.model.config import ModelConfig

__all__ = ["chunk_layer_ids", "layer_costs", "partition_layers", "run_schedule"]


@lru_cache(maxsize=None)
def _mixer_cost(cfg_key: tuple, mixer: str, seq_len: int) -> float:
    cfg = ModelConfig(**dict(cfg_key))
    one = dataclasses.replace(cfg, layers=[mixer])
    c = step_flops(one, 1, seq_len)
    c.parts.pop("head", None)
    return c.forward


def layer_costs(cfg: ModelConfig, seq_len: int) -> tuple[list[float], float, float]:
    """(forward FLOPs per block, embedding cost, head cost) for one sequence."""
    key = tuple((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "layers")
    blocks = [_mixer_cost(key, m, seq_len) for m in cfg.layers]
    head = 2.0 * cfg.d_model * cfg.vocab_size * seq_len
    embed = 0.0                 # a lookup: no FLOPs worth weighing
    return blocks, embed, head


def partition_layers(costs: list[float], stages: int, first_extra: float = 0.0,
                     last_extra: float = 0.0) -> list[list[int]]:
    """Contiguous split of layers 0..n-1 into `stages` non-empty groups minimising the costliest
    group (first_extra / last_extra are added to the first / last group). Exact (dynamic
    programming over split points); ties prefer earlier splits."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} layers into {stages} non-empty pipeline stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def group(s: int, a: int, b: int) -> float:   # cost of layers [a, b) as stage s
        return (prefix[b] - prefix[a] + (first_extra if s == 0 else 0.0)
                + (last_extra if s == stages - 1 else 0.0))

    inf = float("inf")
    # best[s][b]: the smallest max-cost of splitting layers [0, b) into stages 0..s
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for b in range(1, n + 1):
        best[0][b] = group(0, 0, b)
    for s in range(1, stages):
        for b in range(s + 1, n + 1):
            for a in range(s, b):
                v = max(best[s - 1][a], group(s, a, b))
                if v < best[s][b]:
                    best[s][b], cut[s][b] = v, a
    bounds, b = [], n
    for s in range(stages - 1, 0, -1):
        a = cut[s][b]
        bounds.append((a, b))
        b = a
    bounds.append((0, b))
    return [list(range(a, b)) for a, b in reversed(bounds)]


def chunk_layer_ids(cfg: ModelConfig, seq_len: int, pp: int, vpp: int, pp_rank: int) -> list[list[int]]:
    """The block indices of each model chunk this pipeline rank holds (chunk c = stage c*pp+rank)."""
    blocks, embed, head = layer_costs(cfg, seq_len)
    groups = partition_layers(blocks, pp * vpp, embed, head)
    return [groups[c * pp + pp_rank] for c in range(vpp)]


def _forward_step(data_iterator, model, denominator: float):
    tokens, targets, *packed = next(data_iterator)         # packed rows: + cu_seqlens
    out = model(tokens, targets, *packed)

    def loss_func(per_token: torch.Tensor):
        # The counted targets (not -100) summed, over the step's count per micro-batch of one
        # DP rank (`denominator`): the schedule's division by the micro-batch count and DDP's
        # mean over DP ranks then give the mean over every counted target, as lm_loss. Under
        # context parallelism per_token holds this rank's shard [L_r, B] and the CP ranks' sums
        # add up (megatron's schedule multiplies by the CP size and DDP divides by DP x CP).
        loss = per_token.masked_fill(targets.t() == -100, 0.0).sum() / denominator
        # The schedule divides `loss` by the micro-batch count in place: log a copy.
        return loss, {"loss": loss.detach().clone()}

    return out, loss_func


def run_schedule(chunks: list, microbatches: list[tuple[torch.Tensor, ...]], seq_len: int,
                 micro_batch_size: int, denominator: float, forward_only: bool = False) -> list[torch.Tensor]:
    """Forward (and backward) every micro-batch through this rank's model chunks with
    megatron's schedule for the current layout. Returns the micro-batch mean losses on the last
    pipeline stage, [] on the others. Gradients accumulate (the loss is averaged over
    micro-batches); the config's finalize_model_grads_func runs at the end, when set.
    microbatches: (tokens, targets) or packed rows (tokens, targets, cu_seqlens).
    seq_len: the whole sequence length (micro-batches may hold one context-parallel shard).
    denominator: the counted targets per micro-batch of one DP rank (ParallelRuntime)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    # Each chunk reads the same micro-batches: chunk 0 of stage 0 needs the tokens, the last
    # chunk of the last stage the targets; the others read and ignore them.
    iters = [iter(microbatches) for _ in chunks]
    fb = get_forward_backward_func()
    step = partial(_forward_step, denominator=denominator)
    losses = fb(forward_step_func=step, data_iterator=iters if len(chunks) > 1 else iters[0],
                model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(microbatches),
                seq_length=seq_len, micro_batch_size=micro_batch_size, forward_only=forward_only)
    return [m["loss"] for m in losses]
