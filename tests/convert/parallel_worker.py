"""torchrun worker for tests/convert/test_convert_parallel.py (not a test module itself).

    torchrun --standalone --nproc_per_node=4 tests/convert/parallel_worker.py CONFIG LOGITS_OUT

Trains the run config's steps with the real trainer on the parallel runtime (megatron TP x PP,
ShardedCheckpointer writing the megatron dist_checkpointing layout), then runs the trained
parallel model forward on a fixed batch and writes its logits, gathered over the vocabulary-
parallel TP ranks of the last pipeline stage and cut to the real vocabulary, to LOGITS_OUT
(rank 0 writes; [rows, seq, vocab], fp32) together with the batch.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def fixed_tokens(vocab: int, rows: int, seq: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(321)
    return torch.randint(0, vocab, (rows, seq + 1), generator=g)


def main(config: str, out: str) -> None:
    from titans_scale.config import load_run_config
    from titans_scale.parallel.gather import _unwrap
    from titans_scale.parallel.layout import plan_layout, world_size_from_env
    from titans_scale.parallel.state import destroy_parallel
    from titans_scale.train.trainer import Trainer

    cfg = load_run_config(config)
    trainer = Trainer(cfg, resume=False, layout=plan_layout(cfg, world_size_from_env()))
    trainer.run()
    rt = trainer.engine
    # Capture the last stage's logits [L, B, V_padded / tp] (after the padding mask).
    captured: list[torch.Tensor] = []
    stages = [_unwrap(c) for c in rt.engine.chunks]
    for st in stages:
        if st.post_process:
            original = st._mask_padding

            def capture(logits, _orig=original):
                out_ = _orig(logits)
                captured.append(out_.detach().clone())
                return out_
            st._mask_padding = capture
    tokens = fixed_tokens(cfg.model.vocab_size, cfg.data.batch_size * rt.layout.dp, cfg.data.seq_len)
    x, y = rt.dp_slice(tokens[:, :-1]), rt.dp_slice(tokens[:, 1:])
    rt.eval_loss([(x, y)])
    full = None
    if captured:                                    # last pipeline stage: gather over TP
        local = torch.cat(captured, dim=1)          # micro-batches along B
        group = ps.get_tensor_model_parallel_group()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        full = torch.cat(parts, dim=-1)[..., : cfg.model.vocab_size].transpose(0, 1).contiguous()
    # Rank 0 is on the first stage: hand it the logits of the last stage's TP rank 0 (DP rank 0).
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, full if (full is not None and ps.get_tensor_model_parallel_rank() == 0
                                          and rt.dp_rank == 0) else None)
    if dist.get_rank() == 0:
        got = [o for o in objs if o is not None]
        assert len(got) == 1, f"expected one rank's logits, got {len(got)}"
        torch.save({"tokens": tokens[:, :-1].clone(), "logits": got[0]}, out)
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
