"""Shared pieces of the parallel parity tests: one tiny TitansLM with every mixer, fixed batches,
the single-process reference, and the per-rank worker that trains one layout.

A layout's run trains STEPS steps on the same global batches as the reference (each DP rank
takes its block of rows) and returns its per-step losses (every rank knows the global mean)
and, on each rank, the full gradients of step 1 gathered back to TitansLM names and shapes.
"""

from __future__ import annotations

import torch

from titans_scale.config import RunConfig
from titans_scale.model import ModelConfig

STEPS = 3
GLOBAL_BATCH = 4
SEQ = 32
ALL_MIXERS = ("mac", "mag", "mal", "lmm", "swa", "seg", "attn")
RTOL = 1e-5                 # losses: relative, per step; gradients: relative to the tensor's max


def make_cfg(tp: int = 1, pp: int = 1, dp: int = 1, *, sp: bool = False, vpp: int = 1, micro: int = 1,
             engine: str = "megatron", zero: int = 1, cp: int = 1, cp_strategy: str = "a2a",
             layers: tuple[str, ...] = ALL_MIXERS) -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig(d_model=32, n_heads=2, mem_heads=2, mem_expansion=2, chunk_size=8, window=8,
                            segment_len=16, n_persistent=2, vocab_size=259, layers=list(layers))
    cfg.data.seq_len, cfg.data.batch_size = SEQ, GLOBAL_BATCH // dp
    # A large rate and a tight clip: the steps move the weights and clipping is active.
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip = 1e-2, 1, 0.5
    p = cfg.parallel
    p.tp, p.pp, p.vpp, p.sequence_parallel, p.microbatches = tp, pp, vpp, sp, micro
    p.engine, p.zero_stage = engine, zero
    p.cp, p.cp_strategy = cp, cp_strategy
    return cfg.validate()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(STEPS):
        x = torch.randint(0, 259, (GLOBAL_BATCH, SEQ + 1), generator=g)
        out.append((x[:, :-1], x[:, 1:]))
    return out


def reference(layers: tuple[str, ...] = ALL_MIXERS) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, the single-device trainer's pieces: losses per step, grads of step 1."""
    from titans_scale.model import TitansLM
    from titans_scale.train.optim import build_optimizer, build_scheduler
    from titans_scale.train.evaluate import lm_loss

    cfg = make_cfg(layers=layers)
    torch.manual_seed(cfg.train.seed)
    model = TitansLM(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps)
    losses, grads = [], {}
    for i, (x, y) in enumerate(batches()):
        logits, _ = model(x)
        loss = lm_loss(logits, y)
        loss.backward()
        if i == 0:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.item())
    return losses, grads


def _step_one_with_grads(rt, x, y, lr: float) -> tuple[float, dict]:
    """Step 1 with the reduced gradients read back before the optimizer uses them."""
    from titans_scale.parallel.gather import gather_full

    if rt.layout.engine == "megatron":
        loss = rt.forward_backward(x, y)
        rt.engine.gather_grad_shards()
        grads = gather_full(rt.engine.chunks, lambda n, p: p.main_grad)
        rt.engine.step(lr)
        return loss, grads
    # DeepSpeed reduces inside engine.step(); read ZeRO's full gradients right before the update.
    from deepspeed.utils import safe_get_full_grad

    ds, grads = rt.engine.engine, {}
    original = ds._take_model_step

    def take_model_step(*args, **kwargs):
        grads.update(gather_full(rt.engine.chunks, lambda n, p: safe_get_full_grad(p)))
        return original(*args, **kwargs)

    ds._take_model_step = take_model_step
    try:
        loss = rt.train_step(x, y, lr).loss
    finally:
        ds._take_model_step = original
    return loss, grads


def train_layout(**layout) -> dict:
    """Inside a spawned rank: STEPS steps of `layout` (kwargs of make_cfg, dp included)."""
    from titans_scale.parallel.runtime import ParallelRuntime
    from titans_scale.train.optim import lr_lambda

    cfg = make_cfg(**layout)
    rt = ParallelRuntime(cfg)
    lr_at = lr_lambda(cfg.optim, cfg.train.steps)
    losses, grads = [], {}
    for i, (x, y) in enumerate(batches()):
        xs, ys, lr = rt.dp_slice(x), rt.dp_slice(y), cfg.optim.lr * lr_at(i)
        if i == 0:
            loss, grads = _step_one_with_grads(rt, xs, ys, lr)
        else:
            loss = rt.train_step(xs, ys, lr).loss
        losses.append(loss)
    return {"losses": losses, "grads": grads, "describe": rt.layout.describe()}


def check_parity(result: dict, ref_losses: list[float], ref_grads: dict[str, torch.Tensor]) -> None:
    name = result["describe"]
    for step, (got, want) in enumerate(zip(result["losses"], ref_losses), start=1):
        assert abs(got - want) <= RTOL * abs(want), f"{name}: step {step} loss {got} != {want}"
    assert set(result["grads"]) == set(ref_grads), f"{name}: gathered {sorted(set(result['grads']) ^ set(ref_grads))}"
    for key, want in ref_grads.items():
        got = result["grads"][key]
        assert got.shape == want.shape, f"{name}: grad {key} has shape {tuple(got.shape)}"
        err = (got - want).abs().max().item()
        assert err <= RTOL * want.abs().max().item() + 1e-12, \
            f"{name}: step-1 grad of {key} off by {err:.3e} (max |grad| {want.abs().max().item():.3e})"
