"""Build this rank's model chunks for a layout: the parallelize step of a distributed run.

    chunks = build_chunks(cfg, layout)        # after init_parallel(...)

Every rank builds the same single-device TitansLM from the run's seed, then keeps only its
pipeline chunks, each turned tensor-parallel (tensor_parallel.py) — so any layout starts from
exactly the weights one process would train. (Building the whole model first costs one full
copy per rank in host memory; models too large for that would need meta-device construction.)
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from titans_scale.config import RunConfig
from titans_scale.model import TitansLM
from titans_scale.parallel.layout import Layout, padded_vocab_size
from titans_scale.parallel.pipeline import chunk_layer_ids
from titans_scale.parallel.stage import TitansStage
from titans_scale.parallel.tensor_parallel import linear_impl
from titans_scale.precision.apply import recipe_from
from titans_scale.precision.select import HardwareProbe, probe_hardware, resolve_precision, te_unavailable
from titans_scale.precision.te_backend import megatron_fp8_config_kwargs

__all__ = ["build_chunks", "megatron_config"]


def megatron_config(cfg: RunConfig, layout: Layout, probe: HardwareProbe | None = None) -> TransformerConfig:
    """The config megatron's layers and schedules read: sizes, pipeline dtype and p2p mode, and
    the layer family (transformer_impl: TE's under fp8.backend resolving to TE, with its recipe).
    probe: the machine (tests pass a fake one; None probes it when FP8 is asked for)."""
    m = cfg.model
    heads = m.n_heads if m.n_heads % layout.tp == 0 else layout.tp   # read only for checks
    fp8: dict = {}
    impl = "local"
    if cfg.train.precision == "fp8":
        hw = probe if probe is not None else probe_hardware()
        plan = resolve_precision(cfg.train.precision, cfg.fp8.backend, probe=hw)
        impl = linear_impl(plan.fp8_backend, te_unavailable(hw))
        if impl == "transformer_engine":
            fp8 = megatron_fp8_config_kwargs(recipe_from(cfg))
    return TransformerConfig(
        transformer_impl=impl,
        **fp8,
        num_layers=len(m.layers),
        hidden_size=m.d_model,
        num_attention_heads=heads,
        ffn_hidden_size=m.resolved_mlp_hidden,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,          # the residual stream stays fp32 (bf16 is autocast)
        use_cpu_initialization=True,
        perform_initialization=False,          # weights are copied from the built TitansLM
        # Interleaving: megatron-LM's default p2p mode. With batched send/recv, PP=2 pairs an
        # activation with a gradient buffer on gloo (see megatron_cpu's docstring).
        overlap_p2p_comm=layout.vpp > 1,
        batch_p2p_comm=layout.vpp == 1,
        deallocate_pipeline_outputs=False,
    )


def build_chunks(cfg: RunConfig, layout: Layout, model: TitansLM | None = None) -> list[TitansStage]:
    """This rank's model chunks (one, or vpp with interleaving), from `model` or a fresh
    TitansLM seeded with cfg.train.seed. The given model is consumed (its blocks are reused)."""
    if model is None:
        torch.manual_seed(cfg.train.seed)
        model = TitansLM(cfg.model)
    config = megatron_config(cfg, layout)
    layer_config = dataclasses.replace(config, sequence_parallel=False)   # mixers see whole sequences
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    groups = chunk_layer_ids(cfg.model, cfg.data.seq_len, layout.pp, layout.vpp, pp_rank)
    vocab = padded_vocab_size(cfg.model.vocab_size, layout.tp)
    chunks = []
    for c, ids in enumerate(groups):
        first = pp_rank == 0 and c == 0
        last = pp_rank == layout.pp - 1 and c == layout.vpp - 1
        chunks.append(TitansStage(model, ids, first=first, last=last, config=config,
                                  layer_config=layer_config, vocab_padded=vocab))
    return chunks
