"""What the tests share, one section per concern: memory-op inputs, run configs, running the CLI
and torchrun, reading a run folder, the parallel parity runs, conversion fixtures, fake Slurm.

Test modules import from here only (never from another test module); the torchrun worker
scripts (tests/convert/parallel_worker.py) are programs and may import from here too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from titans_scale.config import RunConfig
from titans_scale.config_io import dump_toml
from titans_scale.model import ModelConfig, TitansLM
from titans_scale.train.checkpoint import CheckpointManager
from titans_scale.ops.memory import memory_scan
from titans_scale.ops.varlen import row_slice
from titans_scale.train.evaluate import forward_batch, lm_loss
from titans_scale.train.metrics import read_metrics
from titans_scale.train.optim import build_optimizer, build_scheduler, lr_lambda

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
TORCHRUN = Path(sys.executable).with_name("torchrun")
# One BLAS thread per process (several ranks share 2 cores), no progress bars in captured output.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TITANS_NO_PROGRESS": "1"}


# -- memory-op inputs (the op and kernel tests) ---------------------------------------------------

def make_inputs(B=2, H=2, L=37, d=8, depth=2, expansion=2, dtype=torch.float64, seed=None,
                requires_grad=False):
    """Fresh random q, k, v, gates and initial memory weights for memory_scan."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q = F.normalize(r(B, H, L, d), dim=-1)
    k = F.normalize(r(B, H, L, d), dim=-1)
    v = r(B, H, L, d)
    # non-trivial gates: spread over (0, 1), not constant
    theta = torch.rand(B, H, L, generator=g, dtype=dtype) * 0.6
    eta = torch.rand(B, H, L, generator=g, dtype=dtype)
    alpha = torch.rand(B, H, L, generator=g, dtype=dtype) * 0.4
    dims = [d] if depth == 1 else [d] + [expansion * d] * (depth - 1)
    dims = dims + [d]
    init = [r(B, H, dims[i], dims[i + 1]) * (0.5 / dims[i] ** 0.5) for i in range(depth)]
    tensors = [q, k, v, theta, eta, alpha, *init]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return q, k, v, theta, eta, alpha, init


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# -- packed rows (ops/varlen.py) ------------------------------------------------------------------

def cu_seqlens_of(lengths: list[list[int]]) -> torch.Tensor:
    """int32 document starts into the flattened batch, from per-row document lengths."""
    return torch.tensor([0] + [n for row in lengths for n in row]).cumsum(0).to(torch.int32)


def documents_of(lengths: list[list[int]]) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document, offsets within its row."""
    out = []
    for r, row in enumerate(lengths):
        ends = torch.tensor(row).cumsum(0).tolist()
        out += [(r, e - n, e) for n, e in zip(row, ends)]
    return out


def scan_each_document(args, lengths: list[list[int]], impl: str, chunk_size: int, **kw) -> torch.Tensor:
    """memory_scan of each document of packed rows through its own call, laid out packed again."""
    *seq, init = args
    rows = [[] for _ in lengths]
    for r, a, b in documents_of(lengths):
        y, _ = memory_scan(*(t[r:r + 1, :, a:b] for t in seq), [w[r:r + 1] for w in init], chunk_size=chunk_size,
                           impl=impl, **kw)
        rows[r].append(y)
    return torch.cat([torch.cat(ys, 2) for ys in rows])


# -- run configs ----------------------------------------------------------------------------------

# The micro run: trains in seconds on 2 cores. Every end-to-end test starts from it and changes
# only what it tests (micro_config's `sections`).
MICRO = {
    "model": {"d_model": 32, "n_heads": 2, "layers": ["swa", "mag"], "mem_expansion": 2, "chunk_size": 8,
              "window": 16, "segment_len": 16, "n_persistent": 2},
    "data": {"max_bytes": 300000, "seq_len": 64, "batch_size": 4},
    "optim": {"lr": 3e-3, "warmup_steps": 5},
    "train": {"steps": 12, "log_every": 1, "eval_every": 6, "eval_batches": 2, "ckpt_every": 4,
              "progress": False, "tensorboard": False},
}
# A run that trains a few steps and does nothing else (no eval until the end).
SHORT_TRAIN = {"eval_every": 100, "eval_batches": 1}


def micro_config(shards: Path, run: Path, **sections: dict) -> dict:
    """MICRO with its shard and run folders, each of `sections` ({field: value}) merged into its
    section; a value None drops the field (its default, or the base TOML's under overrides)."""
    cfg = {name: dict(fields) for name, fields in MICRO.items()}
    cfg["data"]["shard_dir"], cfg["train"]["run_dir"] = str(shards), str(run)
    for name, fields in sections.items():
        section = cfg.setdefault(name, {})
        section.update(fields)
        for key in [k for k, v in fields.items() if v is None]:
            del section[key]
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    """`cfg` ({section: {field: value}}) as a TOML file (JSON literals are TOML literals here)."""
    lines = []
    for name, fields in cfg.items():
        lines += [f"[{name}]", *(f"{k} = {json.dumps(v)}" for k, v in fields.items()), ""]
    path.write_text("\n".join(lines))
    return path


def as_overrides(cfg: dict) -> list[str]:
    """`cfg` as CLI overrides (section.field=value) to apply over another config file."""
    def text(v):
        return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
    return [f"{name}.{k}={text(v)}" for name, fields in cfg.items() for k, v in fields.items()]


def write_micro(tmp: Path, shards: Path, name: str = "run") -> Path:
    """<tmp>/<name>.toml: the micro run, training into <tmp>/<name>."""
    return write_config(tmp / f"{name}.toml", micro_config(shards, tmp / name))


def micro_overrides(shards: Path, run_dir: Path, steps: int) -> list[str]:
    """configs/tiny.toml shrunk to the micro run (keeping tiny's learning rate) by overrides."""
    return as_overrides(micro_config(shards, run_dir, optim={"lr": None},
                                     train={"steps": steps, "eval_every": steps, "ckpt_every": 50}))


# -- running the CLI and torchrun -----------------------------------------------------------------

def run_command(cmd, *, env=None, cwd=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    """Run `cmd` (with ENV unless `env`); `check`: a non-zero exit fails with the output's tail."""
    cmd = [str(c) for c in cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, cwd=cwd, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    """`titans-scale ARGS` in a fresh process (kwargs: run's)."""
    return run_command([sys.executable, "-m", "titans_scale.cli", *args], **kwargs)


def torchrun(nproc: int, *args, timeout=900) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=NPROC ARGS` (a script, or -m module ...)."""
    return run_command([TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *args], cwd=ROOT, timeout=timeout)


def torchrun_train(config: Path, *overrides: str, nproc: int = 4, timeout=900) -> None:
    torchrun(nproc, "-m", "titans_scale.cli", "train", "--config", config, *overrides, timeout=timeout)


def bpe_tokenizer(path: Path, text: str, vocab_size: int = 300,
                  special_tokens: tuple[str, ...] = ("<|endoftext|>", "<pad>")) -> Path:
    """A small byte-level BPE tokenizer.json trained here on `text` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text * 20], trainer)
    tok.save(str(path))
    return path


def prepare_shards(out: Path) -> Path:
    cli("prepare", "--source", "embedded", "--out", out, "--max-bytes", "300000")
    return out


def parser_running(fn):
    """A stand-in for cli.build_parser with one command, `boom`, that runs fn (main's error
    handling around it, nothing else)."""
    def build():
        p = argparse.ArgumentParser(prog="titans-scale")
        p.add_subparsers(dest="command", required=True).add_parser("boom").set_defaults(fn=fn)
        return p
    return build


def raising(exc: BaseException):
    """A command function that raises `exc`."""
    def fn(args):
        raise exc
    return fn


# -- reading and preparing run folders ------------------------------------------------------------

def losses(run_dir: Path, kind: str = "train") -> dict[int, float]:
    """{step: loss} of a run's metrics.jsonl records of `kind`."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, kind)}


def start_from(src: Path, step: int, dst: Path) -> None:
    """A run folder `dst` whose latest checkpoint is `src`'s step `step` (a copy)."""
    (dst / "checkpoints").mkdir(parents=True)
    name = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    (dst / "checkpoints" / "latest").write_text(name)


# -- parallel parity: a tiny TitansLM with every mixer, one process vs a layout --------------------
# A layout's run trains PARITY_STEPS steps on the same global batches as the reference (each DP
# rank takes its block of rows) and returns its per-step losses (every rank knows the global
# mean) and, on each rank, the full gradients of step 1 gathered back to TitansLM names and shapes.

PARITY_STEPS = 3
GLOBAL_BATCH = 4
SEQ = 32
ALL_MIXERS = ("mac", "mag", "mal", "lmm", "swa", "seg", "attn")
RTOL = 1e-5                 # losses: relative, per step; gradients: relative to the tensor's max


def make_cfg(tp: int = 1, pp: int = 1, dp: int = 1, *, sp: bool = False, vpp: int = 1, micro: int = 1,
             engine: str = "megatron", zero: int = 1, cp: int = 1, cp_strategy: str = "a2a",
             layers: tuple[str, ...] = ALL_MIXERS, mem_norm: bool = False, model: dict | None = None) -> RunConfig:
    """model: further ModelConfig fields (e.g. the recall recipes' options)."""
    cfg = RunConfig()
    cfg.model = ModelConfig(d_model=32, n_heads=2, mem_heads=2, mem_expansion=2, chunk_size=8, window=8,
                            segment_len=16, n_persistent=2, vocab_size=259, layers=list(layers), mem_norm=mem_norm,
                            **(model or {}))
    cfg.data.seq_len, cfg.data.batch_size = SEQ, GLOBAL_BATCH // dp
    # A large rate and a tight clip: the steps move the weights and clipping is active.
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip = 1e-2, 1, 0.5
    p = cfg.parallel
    p.tp, p.pp, p.vpp, p.sequence_parallel, p.microbatches = tp, pp, vpp, sp, micro
    p.engine, p.zero_stage = engine, zero
    p.cp, p.cp_strategy = cp, cp_strategy
    return cfg.validate()


# Packed rows of the parity batches: documents shorter than a chunk (8), none a multiple of the
# chunk, segment (16) or window (8); the last target of every document (the next one's first
# token) does not count.
PACKED_LENGTHS = [[5, 27], [3, 11, 18], [32], [20, 6, 6]]


def batches(packed: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """(inputs, targets) per step, or packed rows (inputs, targets, cu_seqlens)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(PARITY_STEPS):
        x = torch.randint(0, 259, (GLOBAL_BATCH, SEQ + 1), generator=g)
        out.append((x[:, :-1], x[:, 1:]))
    if not packed:
        return out
    cu = cu_seqlens_of(PACKED_LENGTHS)
    last = cu[1:].long() - 1                    # each document's last token, in the flat batch
    return [(x, y.flatten().index_fill(0, last, -100).view_as(y), cu) for x, y in out]


def dp_rows(rt, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """This DP rank's rows of a global (possibly packed) batch."""
    x, y, *packed = batch
    rows = x.shape[0] // rt.layout.dp
    return (rt.dp_slice(x), rt.dp_slice(y),
            *(row_slice(cu, x.shape[1], rt.dp_rank * rows, (rt.dp_rank + 1) * rows) for cu in packed))


def reference(layers: tuple[str, ...] = ALL_MIXERS, packed: bool = False,
              mem_norm: bool = False, model: dict | None = None) -> tuple[list[float], dict]:
    """One process, the single-device trainer's pieces: losses per step, grads of step 1."""
    cfg = make_cfg(layers=layers, mem_norm=mem_norm, model=model)
    torch.manual_seed(cfg.train.seed)
    model = TitansLM(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps)
    losses, grads = [], {}
    for i, batch in enumerate(batches(packed)):
        logits, y = forward_batch(model, batch)
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


def _step_one_with_grads(rt, x, y, lr: float, *packed) -> tuple[float, dict]:
    """Step 1 with the reduced gradients read back before the optimizer uses them."""
    from titans_scale.parallel.gather import gather_full

    if rt.layout.engine == "megatron":
        loss = rt.forward_backward(x, y, *packed)
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
        loss = rt.train_step(x, y, lr, *packed).loss
    finally:
        ds._take_model_step = original
    return loss, grads


def train_layout(packed: bool = False, **layout) -> dict:
    """Inside a spawned rank: PARITY_STEPS steps of `layout` (kwargs of make_cfg, dp included),
    on packed rows if `packed`."""
    from titans_scale.parallel.runtime import ParallelRuntime

    cfg = make_cfg(**layout)
    rt = ParallelRuntime(cfg)
    lr_at = lr_lambda(cfg.optim, cfg.train.steps)
    losses, grads = [], {}
    for i, batch in enumerate(batches(packed)):
        xs, ys, *cu = dp_rows(rt, batch)
        lr = cfg.optim.lr * lr_at(i)
        if i == 0:
            loss, grads = _step_one_with_grads(rt, xs, ys, lr, *cu)
        else:
            loss = rt.train_step(xs, ys, lr, *cu).loss
        losses.append(loss)
    return {"losses": losses, "grads": grads, "describe": rt.layout.describe()}


def train_layouts(layouts: dict[str, dict], then=None, *args) -> dict:
    """Inside a spawned rank: train_layout of each named layout, then the entries of then(*args)."""
    out = {name: train_layout(**layout) for name, layout in layouts.items()}
    return {**out, **then(*args)} if then is not None else out


def spawn_layouts(nproc: int, layouts: dict[str, dict], then=None, *args) -> list[dict]:
    """One spawn of `nproc` gloo ranks running train_layouts; one result dict per rank."""
    from titans_scale.parallel.launch_utils import run_distributed

    return run_distributed(train_layouts, nproc, layouts, then, *args, backend=None, timeout_s=900)


def check_parity(result: dict, ref_losses: list[float], ref_grads: dict[str, torch.Tensor],
                 rtol: float = RTOL) -> None:
    name = result["describe"]
    for step, (got, want) in enumerate(zip(result["losses"], ref_losses), start=1):
        assert abs(got - want) <= rtol * abs(want), f"{name}: step {step} loss {got} != {want}"
    assert set(result["grads"]) == set(ref_grads), \
        f"{name}: gathered {sorted(set(result['grads']) ^ set(ref_grads))}"
    for key, want in ref_grads.items():
        got = result["grads"][key]
        assert got.shape == want.shape, f"{name}: grad {key} has shape {tuple(got.shape)}"
        err = (got - want).abs().max().item()
        assert err <= rtol * want.abs().max().item() + 1e-12, \
            f"{name}: step-1 grad of {key} off by {err:.3e} (max |grad| {want.abs().max().item():.3e})"


def check_every_rank(runs: list[dict], layout: str, ref, rtol: float = RTOL) -> None:
    """check_parity of `layout` on every rank's results."""
    for rank_result in runs:
        check_parity(rank_result[layout], *ref, rtol=rtol)


# -- the GPU suite (tests/gpu/, `pytest -m gpu`): the CUDA forms of the parallel tests -------------

# tests/conftest.py points DeepSpeed at its CPU accelerator; spawned GPU ranks want CUDA's.
GPU_ENV = {"DS_ACCELERATOR": "cuda"}
# GPU layouts against the one-process CPU reference: fp32 everywhere (TF32 off, torch's default for
# matmuls), but CUDA's reductions and the memory op's Triton path sum in another order than the
# CPU, so the CPU suite's 1e-5 is loosened.
GPU_RTOL = 1e-4


def needs_gpus(n: int) -> list:
    """Marks of a GPU-suite test: `gpu`, and skipped with the reason below n CUDA devices."""
    have = torch.cuda.device_count()
    return [pytest.mark.gpu,
            pytest.mark.skipif(have < n, reason=f"GPU suite: needs {n} CUDA device(s), this machine has {have}")]


def spawn_gpu_layouts(nproc: int, layouts: dict[str, dict], then=None, *args) -> list[dict]:
    """spawn_layouts on `nproc` GPUs: NCCL ranks (train.device 'auto' picks cuda:LOCAL_RANK)."""
    from titans_scale.parallel.launch_utils import run_distributed

    return run_distributed(train_layouts, nproc, layouts, then, *args, backend=None, timeout_s=900, env=GPU_ENV)


# -- conversion: a tiny model with every memory mixer and its training checkpoint -----------------

def tiny_model_config(**kw) -> ModelConfig:
    base = dict(d_model=32, n_heads=2, layers=["mac", "mag", "lmm"], mem_expansion=2,
                chunk_size=4, window=8, segment_len=8, n_persistent=2, tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


def make_run(root: Path, step: int = 2, seed: int = 0, **model_kw):
    """A run folder <root>/run with config.toml and one checkpoint after `step` optimizer steps."""
    torch.manual_seed(seed)
    cfg = RunConfig(model=tiny_model_config(**model_kw))
    cfg.train.run_dir = str(root / "run")
    model = TitansLM(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, 100)
    for _ in range(step):
        logits, _ = model(torch.randint(0, cfg.model.vocab_size, (2, 12)))
        logits.float().logsumexp(-1).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text(dump_toml(cfg))
    CheckpointManager(run).save(step, model, opt, {"step": step, "scheduler": sched.state_dict(),
                                                   "rng_cpu": torch.get_rng_state()})
    return run, cfg, model.eval(), opt


PARALLEL_WORKER = ROOT / "tests" / "convert" / "parallel_worker.py"


def parallel_micro_run(root: Path, shards: Path, tie_embeddings: bool) -> tuple[Path, dict]:
    """The parallel trainer's checkpoint: a megatron TP=2 x PP=2 micro run (every mixer kind with
    a state) trained 2 steps by 4 gloo ranks under torchrun (tests/convert/parallel_worker.py).
    Returns (run folder, {tokens, logits} of the trained parallel model on a fixed batch)."""
    cfg = write_config(root / "run.toml", micro_config(
        shards, root / "run", model={"layers": ["swa", "mag", "mac", "lmm"], "tie_embeddings": tie_embeddings},
        data={"max_bytes": 100000, "seq_len": 32}, optim={"warmup_steps": 1},
        train={**SHORT_TRAIN, "steps": 2, "ckpt_every": 2}, parallel={"tp": 2, "pp": 2, "microbatches": 2}))
    torchrun(4, PARALLEL_WORKER, cfg, root / "logits.pt", timeout=600)
    return root / "run", torch.load(root / "logits.pt", weights_only=True)


def fixed_batch(cfg: ModelConfig, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (2, 21), generator=g)


def logits_of(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)[0]


def file_sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def tree_sha(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with its content hash: equal before and after means untouched."""
    return {str(p.relative_to(root)): file_sha(p) if p.is_file() else "dir" for p in sorted(Path(root).rglob("*"))}


def leftovers(parent: Path) -> list[str]:
    """Temporary folders a failed conversion must not leave behind."""
    return sorted(p.name for p in Path(parent).iterdir() if ".convert-" in p.name)


# -- fake Slurm commands (the launcher's rendering tests) ------------------------------------------

FAKE_SRUN = """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_SRUN_ARGS"
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1" = show ] && [ "$2" = hostnames ]; then printf 'gpu001\\ngpu002\\ngpu003\\ngpu004\\n'; exit 0; fi
printf '%s\\0' "$@" > "$FAKE_SCONTROL_ARGS"
exit "${FAKE_SCONTROL_RC:-0}"
"""


def fake_slurm_bin(folder: Path) -> Path:
    """A folder holding fake `srun` and `scontrol` that write their argv (NUL-separated) to the
    files named by $FAKE_SRUN_ARGS / $FAKE_SCONTROL_ARGS."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        p = folder / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def read_argv(path: Path) -> list[str]:
    return Path(path).read_bytes().decode().split("\0")[:-1]


# ---- a fake cuda:0 on this CPU-only torch (device-placement tests) -------------------------
# A fake cuda:0 on this CPU-only torch, for tests that check device placement.
#
# FakeTensorMode's tensors can carry a fake CUDA device, and any op mixing devices raises
# FakeTensorDeviceMismatchError. But every op that goes through a device guard (slicing, any op
# recording autograd history) needs CUDA's DeviceGuardImpl, which a CPU build lacks ("PyTorch is
# not linked with support for cuda devices"; under autograd a C++ abort). `load_guard` compiles
# and loads c10's own FakeGuardImpl for CUDA (three lines of C++). It changes the process for
# good, so the tests run their scenarios in a child process (`run_child`).

CUDA = torch.device("cuda", 0)

GUARD_CPP = """
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
"""


def guard_source_dir(tmp_path_factory) -> Path:
    """A folder with the guard's source (the child builds it there once and reuses the build)."""
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("the fake CUDA device guard is compiled at test time: needs c++ and ninja")
    d = tmp_path_factory.mktemp("fake_cuda_guard")
    (d / "fake_cuda_guard.cpp").write_text(GUARD_CPP)
    return d


def load_guard(build_dir: str) -> None:
    import torch.utils.cpp_extension as cpp
    cpp.load(name="fake_cuda_guard", sources=[f"{build_dir}/fake_cuda_guard.cpp"], build_directory=build_dir,
             is_python_module=False)


def run_child(script: str, *args) -> str:
    """Run `python script args...`; returns its last line of output (asserting it exited 0)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout.strip().splitlines()[-1]


class Values(TorchDispatchMode):
    """Fake tensors have no values: data-dependent reads (`.item()`, `bool()`) give 1."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0 if args[0].dtype.is_floating_point else 1
        return func(*args, **(kwargs or {}))
