"""GPU acceptance: one command, one JSON report, under 10 minutes on one GPU.

    python bench/gpu_acceptance.py [--out PATH]     # on a GPU machine
    python bench/gpu_acceptance.py --cpu            # every section that can, on the CPU, tiny sizes

Sections (each isolated: a failure is recorded with its traceback and the others still run):
  environment  versions, the device, its compute capability and bf16 peak, TE FP8 availability
  memory_op    the Triton path and `fused` against the float64 `naive` reference: outputs, final
               state and gradients of every input; depth 1/2, several head dims d and chunks C,
               fp32 and bf16 (the reference reads the same rounded inputs), lengths that end
               mid-chunk; cases past GPU_ACCEPTANCE_OP_BUDGET_S (240 s: each compiles its kernels)
               are listed as not run (--cpu: `fused` only, and one Triton case in the interpreter)
  training     tiny and small configs, bf16 autocast, 30 steps on the device (LocalEngine, the
               trainer's engine): the loss falls, and the first losses match an fp32 CPU run of
               the same weights and batches within TRAIN_RTOL (--cpu: micro models, 6 steps,
               bf16 autocast on the CPU against fp32)
  fp8_te       20 steps of the tiny model in FP8 through Transformer Engine (skipped, with the
               reason, where TE cannot run)
  runtime      the parallel runtime as one rank (NCCL on a GPU, gloo on the CPU) with megatron
               and with DeepSpeed ZeRO-1: 2 steps, a sharded checkpoint, step 3; a fresh runtime
               resumes it and gives step 3's loss again
  throughput   the memory layer (on a GPU: Triton and `fused`, side by side) and the whole small
               model (forward + backward + AdamW): tokens/s and MFU against the device's bf16 peak
               (train.hardware.peak_flops) at 4k-64k tokens (--lengths)
               (--cpu: 128 tokens, fp32, MFU against the measured fp32 matmul rate)

Writes bench/results/gpu_acceptance[_cpu].json (or --out) and prints each section's verdict.
The report's "pass" is true when every section passed or was skipped with a reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

T0 = time.perf_counter()     # the report says when each section started: imports and exit are not free

CPU_MODE = "--cpu" in sys.argv
if CPU_MODE:
    # The Triton kernels run in the interpreter on the CPU: it must be set before triton is first
    # imported (megatron, deepspeed and titans_scale's kernels all import it).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench_memory import layer_flops_per_token  # noqa: E402
from common import RESULTS, table, timed  # noqa: E402

# --cpu (CI): a shared CPU takes seconds a step; 6 steps of 4 cycled batches already show the fall
TRAIN_STEPS, FP8_STEPS = (6, 0) if CPU_MODE else (30, 20)
TRAIN_RTOL = 3e-2          # first 3 losses, bf16 on the device vs fp32 on the CPU, relative
FIRST = 3
# memory op vs float64 naive: max |error| / max |reference|, per tensor
OP_TOL = {torch.float32: 2e-4, torch.bfloat16: 4e-2}
OP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}     # --op-dtypes' names
# device time is lent in minutes: cases past this budget are listed as not run (the section then fails)
OP_BUDGET_S = float(os.environ.get("GPU_ACCEPTANCE_OP_BUDGET_S", "240"))


# ------------------------------------------------------------------------------ helpers


def _device() -> torch.device:
    from titans_scale.device import resolve_device
    return resolve_device("cpu" if CPU_MODE else "cuda")


def _sync() -> None:
    if torch.cuda.is_available() and not CPU_MODE:
        torch.cuda.synchronize()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _run_config(name: str, **train):
    """configs/<name>.toml, or (--cpu) a micro model of the same kind."""
    from titans_scale.config import load_run_config

    cfg = load_run_config(str(ROOT / "configs" / f"{name}.toml"))
    if CPU_MODE:
        m = cfg.model
        m.d_model, m.n_heads, m.chunk_size, m.window, m.segment_len = 32, 2, 8, 16, 16
        cfg.data.seq_len, cfg.data.batch_size = 32, 2
    cfg.data.batch_size = max(cfg.data.batch_size, 2)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _batches(cfg, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n fixed batches, cycled: memorising them makes the loss fall within a few dozen steps."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randint(0, min(cfg.model.vocab_size, 64), (cfg.data.batch_size, cfg.data.seq_len + 1), generator=g)
        out.append((x[:, :-1], x[:, 1:]))
    return out


def _train(cfg, steps: int) -> list[float]:
    from titans_scale.train.engine import LocalEngine

    engine = LocalEngine(cfg)
    data = _batches(cfg)
    lr = cfg.optim.lr
    return [engine.train_step(*data[i % len(data)], lr).loss for i in range(steps)]


def _falls(losses: list[float]) -> bool:
    k = max(1, len(losses) // 6)
    return all(map(math.isfinite, losses)) and sum(losses[-k:]) / k < sum(losses[:k]) / k


# ------------------------------------------------------------------------------ sections


def environment() -> dict:
    import importlib.metadata as md

    from titans_scale.precision.select import probe_hardware, te_unavailable
    from titans_scale.train.hardware import peak_flops

    versions = {}
    for pkg in ("torch", "triton", "megatron-core", "deepspeed", "transformer-engine", "titans-scale"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    hw = probe_hardware()
    dev = _device()
    peak, what = peak_flops(dev)
    out = {"versions": versions, "cuda": torch.version.cuda, "device": str(dev), "peak_flops": peak,
           "peak_is": what, "te_fp8": not te_unavailable(hw), "te_fp8_reason": te_unavailable(hw) or "available"}
    if dev.type == "cuda":
        out.update(name=torch.cuda.get_device_name(dev), capability=list(torch.cuda.get_device_capability(dev)),
                   memory_gb=torch.cuda.get_device_properties(dev).total_memory / 2**30)
    return {"pass": True, **out}


def memory_op() -> dict:
    from titans_scale.ops.memory import memory_scan
    from titans_scale.ops.triton_scan import INTERPRETED

    dev = _device()
    if CPU_MODE:     # the interpreter runs each tl.dot through numpy: one tiny case
        cases = [(depth, 16, 8, torch.float32, 20, "fused", norm) for depth in (1, 2) for norm in (True, False)]
        cases += [(2, 16, 8, torch.float32, 12, "triton", True)] if INTERPRETED else []
    else:
        # the normalised memory (model.mem_norm, the default) in every shape and dtype; the plain f = k + g(k)
        # at depth 2 in fp32
        shapes = ((16, 16), (32, 64), (64, 64), (128, 32))
        cases = [(depth, d, C, dt, 5 * C // 2, impl, True) for impl in ("triton", "fused") for depth in (1, 2)
                 for d, C in shapes for dt in (torch.float32, torch.bfloat16)]
        cases += [(2, d, C, torch.float32, 5 * C // 2, impl, False) for impl in ("triton", "fused") for d, C in shapes]
    keep = {OP_DTYPES[n] for n in OPTIONS["op_dtypes"]}
    cases = [c for c in cases if c[3] in keep]
    rows, t0 = [], time.perf_counter()
    for depth, d, C, dt, L, impl, norm in cases:
        if time.perf_counter() - t0 > OP_BUDGET_S:
            rows.append({"impl": impl, "depth": depth, "d": d, "C": C, "L": L, "dtype": str(dt), "norm": norm,
                         "pass": False, "error": f"not run: past the section's {OP_BUDGET_S:.0f} s budget"})
            continue
        try:
            t = time.perf_counter()
            rows.append(_compare_scan(memory_scan, dev, depth, d, C, dt, L, impl, norm))
            rows[-1]["seconds"] = round(time.perf_counter() - t, 2)
        except Exception as e:      # one shape the kernels refuse must not hide the others
            rows.append({"impl": impl, "depth": depth, "d": d, "C": C, "L": L, "dtype": str(dt), "norm": norm,
                         "pass": False, "error": f"{type(e).__name__}: {e}"})
    out = {"pass": bool(rows) and all(r["pass"] for r in rows), "cases": rows}
    if CPU_MODE and not INTERPRETED:
        out["triton_skipped"] = "TRITON_INTERPRET=1 was not in effect when triton was imported"
    return out


def _compare_scan(memory_scan, dev, depth, d, C, dt, L, impl, norm) -> dict:
    g = torch.Generator().manual_seed(depth * 1000 + d + C)
    B, H, E = 1, 2, 2
    q, k = (torch.nn.functional.normalize(torch.randn(B, H, L, d, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(B, H, L, d, generator=g)
    gates = [torch.rand(B, H, L, generator=g) * s for s in (0.6, 1.0, 0.4)]
    dims = [d] + [E * d] * (depth - 1) + [d]
    init = [torch.randn(B, H, dims[i], dims[i + 1], generator=g) * (0.5 / dims[i] ** 0.5) for i in range(depth)]
    probe = torch.randn(B, H, L, d, generator=g)
    ln = [1 + 0.1 * torch.randn(H, d, generator=g), 0.1 * torch.randn(H, d, generator=g)] if norm else []

    def run(impl_, dtype, device):
        acts = [x.detach().to(device, dtype, copy=True).requires_grad_(True) for x in (q, k, v, *gates)]
        wdt = torch.float64 if dtype == torch.float64 else torch.float32
        ws = [w.detach().to(device, wdt, copy=True).requires_grad_(True) for w in init + ln]
        ws, lns = ws[:depth], ws[depth:]
        y, state = memory_scan(*acts, ws, chunk_size=C, impl=impl_, **dict(zip(("ln_weight", "ln_bias"), lns)))
        loss = (y.double() * probe.to(device).double()).sum() + sum(w.double().sum() for w in state.weights)
        loss.backward()
        return y, state.weights, [a.grad for a in acts] + [w.grad for w in ws + lns]

    # The reference reads the inputs the kernel reads (rounded to dt): what is left is the kernel's own
    # arithmetic, not the rounding of its inputs.
    q, k, v, probe = (x.to(dt).double() for x in (q, k, v, probe))
    gates = [x.to(dt).double() for x in gates]
    want_y, want_w, want_g = run("naive", torch.float64, "cpu")
    got_y, got_w, got_g = run(impl, dt, dev)
    errs = {"output": _rel(got_y, want_y), "state": max(_rel(a, b) for a, b in zip(got_w, want_w)),
            "grads": max(_rel(a, b) for a, b in zip(got_g, want_g))}
    tol = OP_TOL[dt]
    return {"impl": impl, "depth": depth, "d": d, "C": C, "L": L, "dtype": str(dt).removeprefix("torch."), "norm": norm,
            **errs, "tol": tol, "pass": max(errs.values()) <= tol}


def training() -> dict:
    out, ok = {}, True
    for name in ("tiny", "small"):
        dev_cfg = _run_config(name, precision="bf16", device="cpu" if CPU_MODE else "cuda")
        ref_cfg = _run_config(name, precision="fp32", device="cpu")
        t = time.perf_counter()
        losses = _train(dev_cfg, TRAIN_STEPS)
        seconds = time.perf_counter() - t
        ref = _train(ref_cfg, FIRST)
        first_err = max(abs(a - b) / abs(b) for a, b in zip(losses[:FIRST], ref))
        passed = _falls(losses) and first_err <= TRAIN_RTOL
        ok &= passed
        out[name] = {"pass": passed, "losses": losses, "cpu_fp32_first": ref, "first_rel_err": first_err,
                     "tol": TRAIN_RTOL, "seconds": seconds}
    return {"pass": ok, **out}


def fp8_te() -> dict:
    from titans_scale.precision.select import te_unavailable

    why = te_unavailable()
    if why:
        return {"skipped": f"Transformer Engine FP8 cannot run here: {why}"}
    cfg = _run_config("tiny", precision="fp8", device="cuda")
    cfg.fp8.backend = "te"
    losses = _train(cfg, FP8_STEPS)
    return {"pass": _falls(losses), "losses": losses}


def _runtime_rank(engine: str, root: str) -> dict:
    from titans_scale.parallel.runtime import ParallelRuntime

    out = {}
    for name in ("saved", "resumed"):
        cfg = _run_config("tiny", device="cpu" if CPU_MODE else "cuda", run_dir=root)
        cfg.parallel.engine = engine
        data = _batches(cfg, 3)
        rt = ParallelRuntime(cfg)
        out["backend"], out["device"] = rt.info.backend, str(rt.device)
        if name == "saved":
            out["losses"] = [rt.train_step(x, y, cfg.optim.lr).loss for x, y in data[:2]]
            rt.save(2, {"step": 2})
        else:
            out["state"] = rt.load(rt.latest())
        out[name] = rt.train_step(*data[2], cfg.optim.lr).loss
    return out


def runtime() -> dict:
    from titans_scale.parallel.launch_utils import run_distributed

    env = {"DS_ACCELERATOR": "cpu" if CPU_MODE else "cuda"}
    out, ok = {}, True
    for engine in ("megatron", "deepspeed"):
        with tempfile.TemporaryDirectory() as root:
            (r,) = run_distributed(_runtime_rank, 1, engine, root, backend=None, timeout_s=400, env=env)
        r["pass"] = (r["state"].get("step") == 2 and abs(r["resumed"] - r["saved"]) <= 1e-5 * abs(r["saved"])
                     and r["backend"] == ("gloo" if CPU_MODE else "nccl"))
        ok &= r["pass"]
        out[engine] = r
    return {"pass": ok, **out}


def throughput() -> dict:
    import torch.nn.functional as F

    from titans_scale.flops import model_flops_per_token
    from titans_scale.model import TitansLM
    from titans_scale.model.memory import NeuralMemory
    from titans_scale.train.hardware import peak_flops
    from titans_scale.train.optim import build_optimizer

    dev = _device()
    peak, what = peak_flops(dev)
    dtype = None if CPU_MODE else torch.bfloat16
    lengths = OPTIONS["lengths"] or ((128,) if CPU_MODE else (4096, 16384, 65536))  # --cpu: the code path
    # the memory layer per scan path: on a GPU "auto" is the Triton kernels, and they must beat `fused`
    MEASURED = ("memory layer", "model") if CPU_MODE else ("memory layer (triton)", "memory layer (fused)", "model")
    cfg = _run_config("small")
    rows = []
    for L in lengths:
        for what_ in MEASURED:
            row = {"what": what_, "tokens": L}
            try:
                torch.manual_seed(0)
                if what_.startswith("memory layer"):
                    module = NeuralMemory(cfg.model).to(dev)
                    module.impl = what_.partition("(")[2].rstrip(")") or "auto"
                    x = torch.randn(1, L, cfg.model.d_model, device=dev, requires_grad=True)
                    fpt = layer_flops_per_token(cfg.model)[1]

                    def step():
                        out, _ = module(x)
                        out.float().sum().backward()
                else:
                    module = TitansLM(cfg.model).to(dev)
                    opt = build_optimizer(module, cfg.optim)
                    tok = torch.randint(0, cfg.model.vocab_size, (1, L + 1), device=dev)
                    fpt = model_flops_per_token(cfg.model, L)

                    def step():
                        logits, _ = module(tok[:, :-1])
                        F.cross_entropy(logits.float().flatten(0, 1), tok[0, 1:]).backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                sec = _timed(step, dev, dtype, repeats=1 if CPU_MODE else 3)
                row.update(tokens_per_s=L / sec, mfu=fpt * L / sec / peak, seconds=sec)
            except torch.cuda.OutOfMemoryError as e:
                row["error"] = f"out of memory: {str(e).splitlines()[0]}"
            finally:
                module = None
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)     # a run cut off mid-section still shows its rows in the log
    print(table(rows, [("what", "what", ""), ("tokens", "tokens", "{:,}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
                       ("mfu", "MFU", "{:.2%}"), ("error", "error", "")]))
    measured = [r for r in rows if "tokens_per_s" in r]
    return {"pass": bool(measured), "peak_flops": peak, "peak_is": what,
            "autocast": "bf16" if dtype else "fp32", "rows": rows}


def _timed(step, dev, dtype, repeats: int) -> float:
    def run():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            step()
    return timed(run, repeats=repeats, warmup=1, sync=_sync)


OPTIONS: dict = {"op_dtypes": {"fp32", "bf16"}, "lengths": None}     # main() sets them from the command line
SECTIONS = {"environment": environment, "memory_op": memory_op, "training": training, "fp8_te": fp8_te,
            "runtime": runtime, "throughput": throughput}


def run_section(fn) -> dict:
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:    # e.g. impl='auto' running without its kernels
        warnings.simplefilter("always")
        try:
            out = fn()
        except Exception as e:      # one section's failure must not lose the others' results
            out = {"pass": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    seen = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    if seen:
        out["warnings"] = seen[:10]
    out["started_s"], out["seconds"] = round(t - T0, 2), round(time.perf_counter() - t, 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="the CPU mode: tiny sizes, every section that can run")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    ap.add_argument("--out", help="the JSON report (default bench/results/gpu_acceptance[_cpu].json)")
    ap.add_argument("--op-dtypes", default="fp32,bf16", help="memory_op's dtypes (a short device lease: one)")
    ap.add_argument("--lengths", help="throughput's lengths in tokens, comma-separated (default 4096,16384,65536)")
    a = ap.parse_args()
    op_dtypes = set(a.op_dtypes.split(","))
    if op_dtypes - OP_DTYPES.keys():
        ap.error(f"--op-dtypes: unknown {', '.join(sorted(op_dtypes - OP_DTYPES.keys()))}; choose from fp32, bf16")
    OPTIONS.update(op_dtypes=op_dtypes, lengths=tuple(int(n) for n in a.lengths.split(",")) if a.lengths else None)
    report = {"mode": "cpu" if a.cpu else "gpu", "date": time.strftime("%Y-%m-%d %H:%M"), "sections": {}}
    out = Path(a.out) if a.out else RESULTS / f"gpu_acceptance{'_cpu' if a.cpu else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    names = a.sections.split(",")
    for name in names:
        if name not in SECTIONS:
            ap.error(f"--sections: unknown {name!r}; choose from {', '.join(SECTIONS)}")
    for name in names:
        r = report["sections"][name] = run_section(SECTIONS[name])
        out.write_text(json.dumps(report, indent=1, default=str))     # a run cut short keeps what it measured
        verdict = f"skipped ({r['skipped']})" if "skipped" in r else ("pass" if r.get("pass") else "FAIL")
        print(f"{name:12s} {verdict}  [{r['seconds']:.1f} s]" + (f"  {r['error']}" if "error" in r else ""),
              flush=True)
    report["pass"] = all(r.get("pass") or "skipped" in r for r in report["sections"].values())
    report["wall_s"] = round(time.perf_counter() - T0, 2)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"{'PASS' if report['pass'] else 'FAIL'}: {out}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    rc = main()
    # The report is written. On the first H200 run the process outlived its last line by minutes
    # (cause unknown: CUDA or a child process at interpreter exit) and the lease's time limit
    # killed it: leave at once instead of running exit handlers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
