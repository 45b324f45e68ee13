"""Emulated FP8 under tensor parallelism equals emulated FP8 on one process: real 2-rank gloo runs.

The tiny TitansLM of the parity tests (every mixer, untied output head in FP8 too) trains
STEPS steps with train.precision=fp8 (emulated, delayed scaling) on one process and under
TP=2, TP=2 + sequence parallelism, DP=2 and PP=2 (1F1B, 2 micro-batches), same seed and
batches. Every rank must reproduce the single-process losses and, for every FP8 layer it
holds, its amax history and scales: each rank records the amaxes of its shards and
fp8_autocast all-reduces them with MAX over megatron's amax reduction group (TP x DP x CP, as
Megatron-LM has Transformer Engine do), so each rank's scales are the whole tensor's. The same
TP=2 run with that reduction switched off must differ (the test can fail). Layouts FP8 does
not support are refused before any process group starts.

Why a tolerance and not bitwise: the FP8 operands are the same, but the fp32 GEMMs sum in
another order on a shard (the row-parallel layers' partial sums meet in an all-reduce), as
in the fp32 parity tests; those ~1e-7 relative differences reach the next amaxes and losses.
The gradient column gets a wider one (GRAD_RTOL): gradients are rounded to E5M2 (2 mantissa
bits), so a 1-ulp fp32 difference upstream (the runtime's per-token vocab-parallel loss vs
F.cross_entropy's mean) can flip one rounding and move a deeper layer's gradient amax by
~1e-3, even on one process. DP itself adds no such error: against the one-rank runtime it
holds RTOL in every column.
The non-FP8 ops run in fp32 here (the fp8 plan's bf16 autocast is switched off) so that
the comparison is tight; the bf16 rounding of activations would otherwise dominate.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers import batches, make_cfg
from titans_scale.parallel.launch_utils import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU check of emulated FP8; FP8 on CUDA: bench/gpu_acceptance.py (TE)")

RTOL = 1e-5           # losses, forward amax histories and scales, relative
GRAD_RTOL = 1e-2      # the gradient (E5M2) column; see the module docstring
HISTORY = 4           # a short amax window: the steps fill it

# layout -> its make_cfg kwargs; the reference uses the layout's micro-batch count.
LAYOUTS = {"tp2": dict(tp=2), "tp2_sp": dict(tp=2, sp=True), "dp2": dict(dp=2),
           "pp2_1f1b": dict(pp=2, micro=2)}


def fp8_cfg(**layout):
    cfg = make_cfg(**layout)
    cfg.model.tie_embeddings = False          # so the output head is an FP8 layer too
    cfg.train.precision = "fp8"
    cfg.fp8.backend, cfg.fp8.amax_history_len, cfg.fp8.include_head = "emulated", HISTORY, True
    return cfg.validate()


def fp32_elsewhere(precision) -> None:
    """FP8 GEMMs, everything else fp32 (see the module docstring)."""
    precision.plan = dataclasses.replace(precision.plan, autocast_dtype=None)


def fp8_meta(named_modules) -> dict[str, torch.Tensor]:
    """amax history and scales of every FP8 layer, by the single-device TitansLM name."""
    from titans_scale.precision.fp8_emulation import Fp8MetaMixin

    out = {}
    for name, m in named_modules:
        if isinstance(m, Fp8MetaMixin):
            out[f"{name}.fp8_amax_history"] = m.fp8_amax_history.detach().clone()
            out[f"{name}.fp8_scale"] = m.fp8_scale.detach().clone()
    return out


def reference(micro: int = 1) -> dict:
    """One process. micro=1: the single-device trainer's step, forward inside the FP8 region
    and backward after it (its amaxes are folded in at the next region's exit, and flushed at
    the end). micro>1: gradient accumulation inside one region, as a pipeline schedule runs
    its micro-batches (splitting a batch changes fp32 sums, which FP8 rounding amplifies)."""
    from titans_scale.model import TitansLM
    from titans_scale.precision.apply import Precision
    from titans_scale.precision.fp8_emulation import reduce_and_update_fp8_meta
    from titans_scale.train.optim import build_optimizer, build_scheduler
    from titans_scale.train.evaluate import lm_loss

    cfg = fp8_cfg()
    torch.manual_seed(cfg.train.seed)
    model = TitansLM(cfg.model)
    precision = Precision(model, cfg)
    fp32_elsewhere(precision)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps)
    losses = []
    for x, y in batches():
        if micro == 1:
            with precision.autocast():
                logits, _ = model(x)
            loss = lm_loss(logits, y)
            loss.backward()
            losses.append(loss.item())
        else:
            total = 0.0
            with precision.autocast():
                for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                    loss = lm_loss(model(xm)[0], ym) / micro
                    loss.backward()
                    total += loss.item()
            losses.append(total)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad()
        sched.step()
    reduce_and_update_fp8_meta()       # the last backward's amaxes (the runtime folds them per step)
    return {"losses": losses, "meta": fp8_meta(model.named_modules()), "converted": precision.converted}


def _train(layout: dict, reduce_amax: bool = True) -> dict:
    from titans_scale.parallel.runtime import ParallelRuntime
    from titans_scale.train.optim import lr_lambda

    cfg = fp8_cfg(**layout)
    rt = ParallelRuntime(cfg)
    fp32_elsewhere(rt.precision)
    if not reduce_amax:
        rt.precision.amax_group = None       # each rank scales by the amaxes of its own shards
    lr_at = lr_lambda(cfg.optim, cfg.train.steps)
    losses = [rt.train_step(x, y, cfg.optim.lr * lr_at(i)).loss for i, (x, y) in enumerate(batches())]
    meta = {}
    for chunk in rt.chunks:
        meta.update(fp8_meta(chunk.named_modules()))
    return {"losses": losses, "meta": meta, "converted": rt.precision.converted}


def _worker() -> dict:
    results = {name: _train(layout) for name, layout in LAYOUTS.items()}
    results["tp2_no_reduction"] = _train(dict(tp=2), reduce_amax=False)
    return results


def _one_rank_worker() -> dict:
    return _train({})


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_worker, 2, backend=None, timeout_s=600)


@pytest.fixture(scope="module")
def one_rank():
    """The parallel runtime on one process (same loss path as every layout)."""
    return run_distributed(_one_rank_worker, 1, backend=None, timeout_s=600)[0]


@pytest.fixture(scope="module")
def refs():
    return {micro: reference(micro) for micro in sorted({kw.get("micro", 1) for kw in LAYOUTS.values()})}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _column_errs(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(forward columns, gradient column) relative errors of an amax history [H, 3] or
    scales [3]; each column against its own magnitude (gradient amaxes are ~1e-3 of the
    input's, so one max over the tensor would hide them)."""
    fwd = max(_rel_err(got[..., c], want[..., c]) for c in (0, 1))
    return fwd, _rel_err(got[..., 2], want[..., 2])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp8_layout_matches_one_process(runs, refs, layout):
    ref = refs[LAYOUTS[layout].get("micro", 1)]
    held = set()                     # a pipeline rank holds only its stage's layers
    for rank, rank_result in enumerate(runs):
        r = rank_result[layout]
        for step, (got, want) in enumerate(zip(r["losses"], ref["losses"]), start=1):
            assert abs(got - want) <= RTOL * abs(want), f"{layout} rank {rank}: step {step} loss {got} != {want}"
        assert set(r["converted"]) <= set(ref["converted"]) and set(r["meta"]) <= set(ref["meta"])
        held |= set(r["converted"])
        for key, got in r["meta"].items():
            want = ref["meta"][key]
            assert got.shape == want.shape, f"{key}: {tuple(got.shape)} != {tuple(want.shape)}"
            assert (want != 0).any() and not torch.equal(want, torch.ones_like(want)), f"{key} never updated"
            fwd, grad = _column_errs(got, want)
            assert fwd <= RTOL, f"{layout} rank {rank}: {key} forward columns off by {fwd:.2e}"
            assert grad <= GRAD_RTOL, f"{layout} rank {rank}: {key} gradient column off by {grad:.2e}"
    assert held == set(ref["converted"]), "the same layers must run in FP8"


def test_dp_matches_the_one_rank_runtime_in_every_column(runs, one_rank):
    """Against the one-process runtime (same loss path) DP=2 holds RTOL in the gradient column
    too: its only extra rounding is the gradient all-reduce's summation order."""
    for rank_result in runs:
        r = rank_result["dp2"]
        assert r["meta"].keys() == one_rank["meta"].keys()
        for got, want in zip(r["losses"], one_rank["losses"]):
            assert abs(got - want) <= RTOL * abs(want)
        for key, want in one_rank["meta"].items():
            errs = _column_errs(r["meta"][key], want)
            assert max(errs) <= RTOL, f"dp2: {key} off by {errs} from the one-rank runtime"


def test_tp_ranks_agree_on_scales(runs):
    for layout in ("tp2", "tp2_sp", "dp2"):
        for key, value in runs[0][layout]["meta"].items():
            assert torch.equal(value, runs[1][layout]["meta"][key]), f"{layout}: ranks differ in {key}"


def test_without_amax_reduction_results_differ(runs, refs):
    """The check above can fail: local amaxes give each rank other scales and other losses."""
    ref = refs[1]
    for rank_result in runs:
        r = rank_result["tp2_no_reduction"]
        worst = max(_rel_err(r["meta"][k], want) for k, want in ref["meta"].items() if k.endswith("fp8_scale"))
        assert worst > 1e-2, f"scales without amax reduction match the single process ({worst:.2e})"
        loss_err = max(abs(g - w) / abs(w) for g, w in zip(r["losses"][1:], ref["losses"][1:]))
        assert loss_err > RTOL, f"losses without amax reduction match the single process ({loss_err:.2e})"


@pytest.mark.parametrize("change, words", [
    (dict(engine="deepspeed"), "precision='fp8' with parallel.engine"),
    (dict(cp=2, cp_strategy="ring"), "precision='fp8' with parallel.cp"),
    (dict(backend="te"), "fp8.backend='te'"),
])
def test_unsupported_fp8_layouts_are_refused(change, words):
    from titans_scale.errors import ConfigError
    from titans_scale.parallel.layout import plan_layout

    cfg = fp8_cfg(tp=2)
    if "backend" in change:
        cfg.fp8.backend = change["backend"]
    else:
        for k, v in change.items():
            setattr(cfg.parallel, k, v)
    world = 2 * cfg.parallel.cp
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        plan_layout(cfg, world)
