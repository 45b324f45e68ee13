"""Does a memory variant learn to recall a needle that attention cannot see? (issue 19)

The issue's task: a 2-layer model (d_model 128, 2 heads, segment / window 128, the memory in
layer 2), a 2-digit pass key stored ~500 tokens before its question (needle at depth 0 of a
640-token noise haystack: beyond every segment and window), trained on the answer tokens only
with AdamW 1e-3, batch 4, gradient clip 1. Every --eval-every steps: exact-match recall on 64
fixed held-out samples (chance 1/90 = 1.1%), their answer loss, the largest memory weight norm.

--probe measures, without training, the init signal: the relative change of the logits at the
answer when only the needle's digits change (a signal of ~1e-4 is one no gradient finds; the
recall LMM of configs/recall has ~7e-2). Any model field can be overridden: --set model.max_lr=0.1.

    python bench/recall_needle.py --layers seg,mac --steps 400 [--set model.mem_norm=true] [--probe]

Prints a table, writes bench/results/recall_needle_<tag>.json. One thread per run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine, table, write  # noqa: E402

from titans_scale.config_io import load_config, sectioned  # noqa: E402
from titans_scale.data.synthetic import TOKEN_VALUES, recall_batch, token_needle_batch  # noqa: E402
from titans_scale.data.tokenizer import ByteTokenizer  # noqa: E402
from titans_scale.eval.probe import needle_signal  # noqa: E402
from titans_scale.eval.sweep import memory_weight_norm  # noqa: E402
from titans_scale.model.config import ModelConfig  # noqa: E402
from titans_scale.model.memory import NeuralMemory  # noqa: E402
from titans_scale.model.titans import TitansLM  # noqa: E402

EVAL_SEED = 1_000_003          # held-out samples: a seed no training batch uses


@sectioned
@dataclass
class _ModelOnly:              # load_config reads [sections]: the model's alone
    model: ModelConfig


def model_config(layers: list[str], overrides: list[str]) -> ModelConfig:
    """The issue's small model; `overrides` are model.FIELD=VALUE (TOML values)."""
    base = ["model.layers=[" + ",".join(f'"{m}"' for m in layers) + "]", "model.d_model=128",
            "model.n_heads=2", "model.window=128", "model.segment_len=128"]
    return load_config(_ModelOnly, None, base + list(overrides)).model


def chance(digits: int) -> float:
    return 1 / (9 * 10 ** (digits - 1))           # pass keys 10^(d-1) .. 10^d - 1, uniform


def batch(step: int, size: int, seq: int, seed: int, depth: float, digits: int, task: str = "passkey",
          distractors: int = 0):
    if task == "token":
        return token_needle_batch(size, seq, seed, step=step, depth=depth, distractors=distractors)
    return recall_batch(ByteTokenizer(), size, seq, seed, step=step, task="needle", needle="passkey",
                        digits=digits, depth=depth)


def recall(model, data, bs: int = 16) -> dict:
    """Exact-match accuracy (every answer token right, greedy, teacher-forced), answer loss and
    the largest memory weight norm over the held-out samples."""
    x, y, m = data
    right, losses, wnorm = [], [], 0.0
    # Is the memory still writing? The inner step theta (mean over tokens) and the norm's |ln_weight|
    # (its update is proportional to both); a memory whose |W| stays at W^0's has one of them near zero.
    mems = [mod for mod in model.modules() if isinstance(mod, NeuralMemory)]
    thetas = []
    hooks = [mem.gates.register_forward_hook(
        lambda _mod, _args, out, mem=mem: thetas.append(mem.gates_from(out)[0].mean().item())) for mem in mems]
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], bs):
                logits, state = model(x[i:i + bs])
                mm, yy = m[i:i + bs], y[i:i + bs]
                ok = (logits.argmax(-1) == yy) | ~mm
                right.append(ok.all(1))
                losses.append(F.cross_entropy(logits[mm], yy[mm], reduction="sum") / mm.sum())
                wnorm = max(wnorm, memory_weight_norm(state))
    finally:
        for h in hooks:
            h.remove()
    ln_w = [mem.ln_weight.abs().mean().item() for mem in mems if mem.ln_weight is not None]
    return {"recall": torch.cat(right).float().mean().item(), "answer_loss": torch.stack(losses).mean().item(),
            "mem_norm_max": wnorm, "theta_mean": sum(thetas) / max(len(thetas), 1),
            "ln_weight_mean": sum(ln_w) / len(ln_w) if ln_w else float("nan")}


def regate(model, theta_bias, eta_bias, w0_last, ln_init=None, out_zero=False) -> None:
    """Screening knobs on top of the model's init: theta's and eta's gate bias, the scale of
    the last layer of a deep memory's W^0, the normalised memory's ln_weight (None keeps the model's);
    out_zero starts the memory's output projection W_O at zero (the memory's read adds nothing at first)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, NeuralMemory):
                b = mod.gates.bias.view(-1, 3)
                if theta_bias is not None:
                    b[:, 0] = theta_bias
                if eta_bias is not None:
                    b[:, 1] = eta_bias
                if w0_last is not None and len(mod.init_weights) > 1:
                    mod.init_weights[-1].mul_(w0_last)
                if ln_init is not None and mod.ln_weight is not None:
                    mod.ln_weight.fill_(ln_init)
                if out_zero:
                    mod.out.weight.zero_()


class Reference(torch.nn.Module):
    """lucidrains' titans-pytorch MAC at the issue's sizes (its README's memory tokens, its own
    defaults otherwise), behind this script's (logits, state) interface."""

    def __init__(self):
        super().__init__()
        from titans_pytorch import MemoryAsContextTransformer

        self.net = MemoryAsContextTransformer(num_tokens=259, dim=128, depth=2, segment_len=128, heads=2,
                                              dim_head=64, neural_memory_layers=(2,), num_persist_mem_tokens=4,
                                              num_longterm_mem_tokens=16)

    def forward(self, x):
        return self.net(x), None


def recall_at(model, helds: dict) -> dict:
    """recall() at each held-out depth; "recall" is the lowest of them, the other figures the first's."""
    rs = {d: recall(model, h) for d, h in helds.items()}
    first = next(iter(rs.values()))
    return {**first, "recall": min(r["recall"] for r in rs.values()),
            "by_depth": {d: r["recall"] for d, r in rs.items()}}


def run(a) -> dict:
    torch.manual_seed(a.seed)
    cfg = model_config(a.layers.split(","), a.set)
    if a.reference:
        model = Reference()
    else:
        model = TitansLM(cfg)
        regate(model, a.theta_bias, a.eta_bias, a.w0_last, a.ln_init, a.out_zero)
    eval_depths = [float(d) for d in a.eval_depths.split(",")] if a.eval_depths else [a.depth]
    helds = {d: batch(0, a.eval_samples, a.seq, EVAL_SEED, d, a.digits, a.task, a.distractors) for d in eval_depths}
    lo_hi = [float(d) for d in a.train_depths.split(",")] if a.train_depths else None
    depth_rng = torch.Generator().manual_seed(a.seed)
    out = {"layers": "titans-pytorch MAC" if a.reference else cfg.layers, "overrides": a.set,
           "theta_bias": a.theta_bias, "eta_bias": a.eta_bias,
           "w0_last": a.w0_last, "ln_init": a.ln_init, "out_zero": a.out_zero,
           "seed": a.seed, "seq": a.seq, "depth": a.depth,
           "eval_depths": eval_depths, "train_depths": lo_hi,
           "fixed_first": a.fixed_first,
           "mem_depth": cfg.mem_depth, "max_lr": cfg.max_lr, "mem_norm": cfg.mem_norm,
           "task": a.task, "distractors": a.distractors,
           "chance": 1 / TOKEN_VALUES if a.task == "token" else chance(a.digits), "digits": a.digits,
           "machine": machine(), "curve": []}
    out["probe_signal"] = float("nan") if a.task == "token" else needle_signal(
        model, a.seq, range(EVAL_SEED + 7, EVAL_SEED + 11), digits=a.digits, depth=a.depth)
    first = recall_at(model, helds)
    out["init_mem_norm"] = first["mem_norm_max"]
    if a.probe:
        return out
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    nonfinite, t0, step_time = 0, time.perf_counter(), []
    out["curve"].append({"step": 0, **first, "wall_s": 0.0})
    for step in range(1, a.steps + 1):
        u = torch.rand(1, generator=depth_rng).item()      # its own generator: fixed-depth runs are as before
        fixed = lo_hi is None or step <= a.fixed_first
        depth = a.depth if fixed else lo_hi[0] + (lo_hi[1] - lo_hi[0]) * u
        x, y, m = batch(step, a.batch, a.seq, a.seed, depth, a.digits, a.task, a.distractors)
        ts = time.perf_counter()
        logits, _ = model(x)
        loss = F.cross_entropy(logits[m], y[m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (math.isfinite(loss.item()) and math.isfinite(gnorm.item())):
            nonfinite += 1
        else:
            opt.step()
        step_time.append(time.perf_counter() - ts)
        if step % a.eval_every == 0 or step == a.steps:
            r = recall_at(model, helds)
            row = {"step": step, **r, "train_loss": loss.item(), "nonfinite": nonfinite,
                   "wall_s": time.perf_counter() - t0, "step_s": sum(step_time[-a.eval_every:]) /
                   len(step_time[-a.eval_every:]), "load": machine()["load_avg_1m"]}
            out["curve"].append(row)
            each = "" if len(helds) == 1 else " (" + " ".join(f"{d}: {v:.2f}" for d, v in r["by_depth"].items()) + ")"
            print(f"step {step:4d} recall {r['recall']:.3f}{each} ans_loss {r['answer_loss']:.3f} "
                  f"|W| {r['mem_norm_max']:.1f} theta {r['theta_mean']:.1e} |ln_w| {r['ln_weight_mean']:.2f} "
                  f"step {row['step_s']:.2f}s nonfinite {nonfinite}", flush=True)
            if a.stop_at and r["recall"] >= a.stop_at:
                break
    out["nonfinite_steps"] = nonfinite
    out["best_recall"] = max(c["recall"] for c in out["curve"])
    out["final"] = out["curve"][-1]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="seg,mac")
    ap.add_argument("--set", action="append", default=[], help="model.FIELD=VALUE (repeatable)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--seq", type=int, default=640)
    ap.add_argument("--depth", type=float, default=0.0, help="needle depth in the haystack (0 = ~500 back)")
    ap.add_argument("--train-depths", help="LO,HI: each training batch's needle depth uniform in [LO, HI]")
    ap.add_argument("--fixed-first", type=int, default=0,
                    help="with --train-depths: the first N steps train at --depth (a curriculum)")
    ap.add_argument("--eval-depths", help="held-out depths, comma-separated (default --depth); recall is the lowest")
    ap.add_argument("--task", choices=["passkey", "token"], default="passkey",
                    help="passkey: the text needle; token: [MARK, value] in random bytes, chance 1/8")
    ap.add_argument("--distractors", type=int, default=0,
                    help="token task: this many more value bytes in the haystack, no MARK before them "
                         "(without them remembering which value appeared is enough)")
    ap.add_argument("--digits", type=int, default=2, help="pass-key digits (1: 9 values, chance 11%%)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stop-at", type=float, default=0.0, help="stop once held-out recall reaches this")
    ap.add_argument("--probe", action="store_true", help="init signal only, no training")
    ap.add_argument("--theta-bias", type=float, default=None, help="screen: theta's gate bias at init")
    ap.add_argument("--eta-bias", type=float, default=None, help="screen: eta's gate bias at init")
    ap.add_argument("--w0-last", type=float, default=None, help="screen: scale of a deep memory's last W^0")
    ap.add_argument("--ln-init", type=float, default=None, help="screen: the normalised memory's ln_weight at init")
    ap.add_argument("--out-zero", action="store_true", help="screen: the memory's output projection starts at 0")
    ap.add_argument("--reference", action="store_true", help="train titans-pytorch's MAC instead (calibration)")
    ap.add_argument("--tag", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = run(a)
    tag = a.tag or "_".join([a.layers.replace(",", "-")] + [s.split(".")[-1] for s in a.set])
    print(f"{tag}: probe signal {out['probe_signal']:.2e}, memory |W| at init {out['init_mem_norm']:.1f}")
    if out["curve"]:
        print(table(out["curve"], [("step", "step", ""), ("recall", "recall", "{:.3f}"),
                                   ("answer_loss", "answer loss", "{:.3f}"), ("mem_norm_max", "|W| max", "{:.1f}"),
                                   ("step_s", "s/step", "{:.2f}"), ("nonfinite", "non-finite", ""),
                                   ("load", "load", "{:.1f}")]))
    print(write(f"recall_needle_{tag}", out))


if __name__ == "__main__":
    main()
