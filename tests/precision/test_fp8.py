"""FP8: the recipe maths against a float64 re-implementation, the emulated Fp8Linear, the
amax reduction over gloo, backend selection, and (on CUDA with Transformer Engine) TE."""

from __future__ import annotations

import ast
import copy
import dataclasses
import logging
import math
import os
import typing
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from titans_scale.errors import ConfigError
from titans_scale.precision import (
    Fp8Linear,
    Fp8Recipe,
    HardwareProbe,
    convert_linears_to_fp8,
    dequantize,
    fp8_autocast,
    quantize,
    resolve_precision,
    strip_fp8_meta,
)
from titans_scale.precision import te_backend
from titans_scale.precision.fp8_emulation import GRAD_OUTPUT, INPUT, WEIGHT
from titans_scale.precision.recipe import (
    E4M3_MAX,
    E5M2_MAX,
    FP32_MAX,
    current_scale,
    delayed_scaling_update,
    scale_from_amax,
)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.fixture(autouse=True)
def _one_thread():
    # These tensors are tiny; on the shared 2-core machine a second OpenMP thread only adds
    # barrier spinning (the MLP test ran 10x slower with 2 threads under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------- recipe


@pytest.mark.parametrize(
    "field, value",
    [
        ("format", "e5m2"),
        ("scaling", "blockwise"),
        ("amax_history_len", 0),
        ("amax_history_len", True),
        ("amax_compute_algo", "mean"),
        ("margin", -1),
        ("margin", 1.5),
        ("interval", 2),
    ],
)
def test_recipe_rejects_bad_field_naming_it(field, value):
    with pytest.raises(ConfigError, match=field) as info:
        Fp8Recipe(**{field: value})
    assert "\n" not in str(info.value)


def test_recipe_defaults_are_te_defaults_and_dtypes():
    r = Fp8Recipe()
    assert (r.format, r.scaling, r.amax_history_len, r.amax_compute_algo, r.margin) == (
        "hybrid", "delayed", 1024, "max", 0,
    )
    assert (r.fwd_dtype, r.bwd_dtype, r.fwd_max, r.bwd_max) == (E4M3, E5M2, 448.0, 57344.0)
    e4 = Fp8Recipe(format="e4m3")
    assert (e4.bwd_dtype, e4.bwd_max) == (E4M3, 448.0)
    assert E4M3_MAX == torch.finfo(E4M3).max and E5M2_MAX == torch.finfo(E5M2).max
    with pytest.raises(ConfigError, match="margin"):
        Fp8Recipe(scaling="current", margin=1)


# ------------------------------------------------------- delayed scaling vs float64 reference


def _ref_delayed_scaling(amaxes, history_len, fp8_max, margin, algo):
    """Float64 delayed scaling written from TE's description, without roll: the scale after
    step t uses the last `history_len` amaxes (the window, padded with the zeros a fresh
    history holds) or amax t; 0 / inf / nan keeps the previous scale; a scale beyond the
    fp32 range becomes the fp32 max. Also the history after each update: row 0 zero,
    rows 1..L-1 the amaxes of steps t-L+2..t, oldest first."""
    scale, scales, histories = 1.0, [], []
    for t, a_t in enumerate(amaxes):
        window = [amaxes[i] if i >= 0 else 0.0 for i in range(t - history_len + 1, t + 1)]
        a = max(window) if algo == "max" else a_t
        if a > 0 and math.isfinite(a):
            s = (fp8_max / a) / 2.0**margin
            scale = FP32_MAX if s > FP32_MAX else s
        scales.append(scale)
        hist = [0.0] + [amaxes[i] if i >= 0 else 0.0 for i in range(t - history_len + 2, t + 1)]
        histories.append(hist[:history_len])
    return scales, histories


def _uniform(low: float, high: float, gen: torch.Generator) -> float:
    return float(torch.empty(1, dtype=torch.float64).uniform_(low, high, generator=gen))


def _literal_values(tp) -> set:
    """The values a typing.Literal annotation allows, looking inside Optional/Union."""
    if typing.get_origin(tp) is typing.Literal:
        return set(typing.get_args(tp))
    return set().union(*(_literal_values(arg) for arg in typing.get_args(tp)))


def _fp32(v: float) -> float:
    return torch.tensor(v, dtype=torch.float32).item()


@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize("margin", [0, 2])
@pytest.mark.parametrize("fp8_max", [E4M3_MAX, E5M2_MAX])
def test_delayed_scaling_matches_float64_reference(algo, margin, fp8_max):
    gen = torch.Generator().manual_seed(1000 * margin + len(algo) + int(fp8_max))
    history_len, steps = 5, 17
    amaxes = [_fp32(10 ** _uniform(-3, 3, gen)) for _ in range(steps)]
    amaxes[4] = 0.0  # zero amax: keeps the scale (most_recent)
    amaxes[9] = math.inf  # inf amax: keeps the scale for the whole window (max)
    amaxes[13] = _fp32(1e-40)  # fp32-subnormal amax: quotient overflows -> fp32 max
    ref_scales, ref_hist = _ref_delayed_scaling(amaxes, history_len, fp8_max, margin, algo)

    history = torch.zeros(history_len, 1)
    scale = torch.ones(1)
    for t, a in enumerate(amaxes):
        history[0, 0] = a  # what a forward records at position 0
        history, scale = delayed_scaling_update(history, scale, fp8_max, margin, algo)
        assert scale.item() == pytest.approx(ref_scales[t], rel=1e-6), f"step {t}"
        assert history[:, 0].tolist() == ref_hist[t], f"step {t}"
    assert len(set(ref_scales)) >= 4  # the sequence really moves the scale
    if algo == "most_recent":
        assert FP32_MAX in ref_scales and ref_scales[4] == ref_scales[3]


def test_zero_inf_nan_amax_keep_previous_scale():
    prev = torch.tensor([3.0, 5.0, 7.0, 11.0])
    amax = torch.tensor([0.0, math.inf, math.nan, 2.0])
    got = scale_from_amax(amax, prev, E4M3_MAX, margin=1)
    assert got[:3].tolist() == [3.0, 5.0, 7.0]
    assert got[3].item() == pytest.approx(448.0 / 2.0 / 2.0)
    history = torch.zeros(4, 4)
    history[0] = amax
    _, s = delayed_scaling_update(history, prev, E4M3_MAX, 0, "most_recent")
    assert s[:3].tolist() == [3.0, 5.0, 7.0]
    cur = current_scale(torch.tensor([0.0, math.inf, 4.0]), E4M3_MAX)
    assert cur.tolist() == [1.0, 1.0, 112.0]


# ----------------------------------------------------------------------------- casts


@pytest.mark.parametrize(
    "dtype, bound, amaxes, octaves",
    [(E4M3, 2.0**-4, (1e-4, 1.0, 3e3), 8), (E5M2, 2.0**-3, (1e-6, 1.0, 1e6), 12)],
)
def test_quantize_relative_error_bound(dtype, bound, amaxes, octaves):
    gen = torch.Generator().manual_seed(7)
    fp8_max = torch.finfo(dtype).max
    for amax in amaxes:
        exponent = torch.empty(4096, dtype=torch.float64).uniform_(-octaves, 0, generator=gen)
        mag = amax * 2.0**exponent
        sign = torch.randint(0, 2, (4096,), generator=gen) * 2 - 1
        x = (mag * sign).float()
        x[0] = amax
        scale = current_scale(x.abs().amax(), fp8_max)
        q = quantize(x, scale, dtype)
        assert q.dtype == dtype
        y = dequantize(q, scale)
        rel = ((y.double() - x.double()).abs() / x.double().abs()).max().item()
        assert rel <= bound * (1 + 1e-6), (amax, rel)
        assert rel > bound / 4  # real FP8 rounding happened
        assert q.float().abs().max().item() == fp8_max  # amax maps onto the FP8 max
    # Without a scale the small tensor would underflow: scaling is what keeps it.
    tiny = torch.full((8,), 1e-6)
    assert dequantize(quantize(tiny, torch.tensor(1.0), E4M3), torch.tensor(1.0)).abs().max() == 0


def test_saturation_gives_finite_values():
    x = torch.tensor([1e9, -1e9, 3e38, 500.0, -7e4])
    for dtype in (E4M3, E5M2):
        y = dequantize(quantize(x, torch.tensor(1.0), dtype), torch.tensor(1.0))
        assert torch.isfinite(y).all()
        fmax = torch.finfo(dtype).max
        assert y[:3].tolist() == [fmax, -fmax, fmax]


def test_emulated_gemm_equals_torch_scaled_mm():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 64, generator=gen) * 3
    w = torch.randn(48, 64, generator=gen) * 0.1
    g = torch.randn(32, 48, generator=gen) * 1e-3
    sx, sw = current_scale(x.abs().amax(), 448.0), current_scale(w.abs().amax(), 448.0)
    sg = current_scale(g.abs().amax(), 57344.0)
    xq, wq, gq = quantize(x, sx, E4M3), quantize(w, sw, E4M3), quantize(g, sg, E5M2)
    emu = dequantize(xq, sx) @ dequantize(wq, sw).t()
    ref = torch._scaled_mm(
        xq, wq.t(), scale_a=sx.reciprocal(), scale_b=sw.reciprocal(), out_dtype=torch.float32
    )
    torch.testing.assert_close(emu, ref, rtol=1e-5, atol=1e-6)
    emu_g = dequantize(gq, sg) @ dequantize(wq, sw)  # dgrad: e5m2 x e4m3
    ref_g = torch._scaled_mm(
        gq, wq.t().contiguous().t(), scale_a=sg.reciprocal(), scale_b=sw.reciprocal(),
        out_dtype=torch.float32,
    )
    torch.testing.assert_close(emu_g, ref_g, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- Fp8Linear


def _pair(in_f=64, out_f=48, seed=0, history_len=16):
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f)
    fp8 = Fp8Linear(in_f, out_f, recipe=Fp8Recipe(amax_history_len=history_len))
    fp8.load_state_dict(ref.state_dict())
    return ref, fp8


def test_fp8_linear_uses_previous_step_scales_exactly():
    recipe = Fp8Recipe(amax_history_len=16)
    _, m = _pair()
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        x = (torch.randn(8, 64, generator=gen) * (step + 1)).requires_grad_()
        s = m.fp8_scale.clone()
        with fp8_autocast(recipe=recipe):
            y = m(x)
        xd = dequantize(quantize(x, s[INPUT], E4M3), s[INPUT])
        wd = dequantize(quantize(m.weight, s[WEIGHT], E4M3), s[WEIGHT])
        assert torch.equal(y, xd @ wd.t() + m.bias)
        assert m.fp8_amax_history[-1, INPUT].item() == x.abs().max().item()
        assert m.fp8_scale[INPUT].item() == pytest.approx(
            448.0 / m.fp8_amax_history[:, INPUT].max().item(), rel=1e-6
        )
        # Backward: dy in e5m2 with the grad scale as of now, operands the forward's FP8 copies.
        grad = torch.randn(8, 48, generator=gen) * 10.0**-step
        s_g = m.fp8_scale[GRAD_OUTPUT].clone()
        m.zero_grad()
        y.backward(grad)
        gd = dequantize(quantize(grad, s_g, E5M2), s_g)
        assert torch.equal(x.grad, gd @ wd)
        assert torch.equal(m.weight.grad, gd.t() @ xd)
        assert torch.equal(m.bias.grad, grad.sum(0))
    assert (m.fp8_scale != 1.0).all()


def test_fp8_linear_scales_follow_reference_over_steps():
    # Integrated: real tensors' amaxes through forward/backward and fp8_autocast exits, with
    # a second layer in its own region after each backward (as with one region per
    # micro-batch): the forward columns must advance once per forward, the gradient
    # column once per backward, or the amax window would shrink.
    recipe = Fp8Recipe(amax_history_len=4, margin=1)
    _, m = _pair(history_len=4)
    _, other = _pair(history_len=4, seed=1)
    gen = torch.Generator().manual_seed(2)
    in_amax, grad_amax = [], []
    for step in range(9):
        x = torch.randn(8, 64, generator=gen) * 10 ** _uniform(-2, 2, gen)
        with fp8_autocast(recipe=recipe):
            y = m(x)
        in_amax.append(x.abs().max().item())
        assert m.fp8_scale[INPUT].item() == pytest.approx(
            _ref_delayed_scaling(in_amax, 4, E4M3_MAX, 1, "max")[0][-1], rel=1e-6
        )
        grad = torch.randn(y.shape, generator=gen) * 10 ** _uniform(-3, 1, gen)
        y.backward(grad)
        grad_amax.append(grad.abs().max().item())
        with fp8_autocast(recipe=recipe):
            other(x)  # this region's exit folds m's gradient amax in
        assert m.fp8_scale[GRAD_OUTPUT].item() == pytest.approx(
            _ref_delayed_scaling(grad_amax, 4, E5M2_MAX, 1, "max")[0][-1], rel=1e-6
        )
        assert m.fp8_amax_history[-1].tolist() == pytest.approx(
            [in_amax[-1], m.weight.abs().max().item(), grad_amax[-1]]
        )


def test_fp8_linear_close_to_linear_forward_and_backward():
    ref, m = _pair()
    recipe = Fp8Recipe(amax_history_len=16)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):  # let the delayed scales calibrate
        x = torch.randn(4, 16, 64, generator=gen)
        grad = torch.randn(4, 16, 48, generator=gen)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref.zero_grad(), m.zero_grad()
        yr = ref(xr)
        with fp8_autocast(recipe=recipe):
            yf = m(xf)
        yr.backward(grad)
        yf.backward(grad)
    assert yf.shape == yr.shape and yf.dtype == yr.dtype
    assert 1e-4 < _rel_err(yf, yr) < 0.05
    assert 1e-4 < _rel_err(xf.grad, xr.grad) < 0.1
    assert 1e-4 < _rel_err(m.weight.grad, ref.weight.grad) < 0.1
    torch.testing.assert_close(m.bias.grad, ref.bias.grad)  # dbias stays high precision
    for t in (yf, xf.grad, m.weight.grad):
        assert torch.isfinite(t).all()


def test_fp8_linear_saturates_inputs_far_above_calibrated_range():
    _, m = _pair()
    recipe = Fp8Recipe(amax_history_len=16, amax_compute_algo="most_recent")
    with fp8_autocast(recipe=recipe):
        m(torch.randn(8, 64) * 1e-3).sum().backward()
    with fp8_autocast(recipe=recipe):
        y = m(torch.randn(8, 64) * 1e-3)
    y.sum().backward()  # calibrates the grad scale to grads of size ~1
    assert m.fp8_scale[INPUT] > 1e4
    x = (torch.randn(8, 64) * 1e6).requires_grad_()
    with fp8_autocast(recipe=recipe):
        y = m(x)
    (y * 1e12).sum().backward()
    for t in (y, x.grad, m.weight.grad):
        assert torch.isfinite(t).all()


def test_fp8_meta_round_trips_through_state_dict(tmp_path):
    recipe = Fp8Recipe(amax_history_len=8)
    _, m = _pair(history_len=8)
    for i in range(3):
        with fp8_autocast(recipe=recipe):
            y = m(torch.randn(8, 64) * (i + 1))
        y.sum().backward()
    torch.save(m.state_dict(), tmp_path / "fp8.pt")
    loaded = torch.load(tmp_path / "fp8.pt", weights_only=True)
    assert set(loaded) == {"weight", "bias", "fp8_amax_history", "fp8_scale"}
    fresh = Fp8Linear(64, 48, recipe=recipe)
    fresh.load_state_dict(loaded)
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert (fresh.fp8_scale != 1).all()
    x = torch.randn(8, 64)
    with fp8_autocast(recipe=recipe):
        a, b = m(x), fresh(x)
    assert torch.equal(a, b) and torch.equal(m.fp8_scale, fresh.fp8_scale)


def test_fp8_linear_loads_a_checkpoint_without_fp8_state_but_not_a_partial_one():
    ref, m = _pair()
    m.fp8_scale.fill_(5.0)
    m.load_state_dict(ref.state_dict())  # a run without FP8: strict load works
    assert torch.equal(m.weight, ref.weight) and (m.fp8_scale == 5.0).all()
    partial = {**ref.state_dict(), "fp8_scale": torch.ones(3)}
    with pytest.raises(RuntimeError, match="fp8_amax_history"):
        m.load_state_dict(partial)
    stripped = strip_fp8_meta({"a.weight": 1, "a.fp8_scale": 2, "a.fp8_amax_history": 3})
    assert set(stripped) == {"a.weight"}


def test_fp8_linear_is_plain_linear_outside_autocast_and_frozen_under_no_grad():
    ref, m = _pair()
    x = torch.randn(8, 64)
    assert torch.equal(m(x), ref(x))
    with torch.no_grad(), fp8_autocast(recipe=Fp8Recipe(amax_history_len=16)):
        y = m(x)
    assert not torch.equal(y, ref(x))  # FP8 was used
    assert (m.fp8_amax_history == 0).all() and (m.fp8_scale == 1).all()  # no state change


def test_fp8_meta_stays_fp32_when_module_is_cast_to_bf16():
    _, m = _pair()
    m = m.to(torch.bfloat16)
    assert m.weight.dtype == torch.bfloat16
    assert m.fp8_amax_history.dtype == torch.float32 and m.fp8_scale.dtype == torch.float32
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    with fp8_autocast(recipe=Fp8Recipe(amax_history_len=16)):
        y = m(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert m.weight.grad.dtype == torch.bfloat16


def test_autocast_history_len_mismatch_is_a_clear_error():
    _, m = _pair(history_len=16)
    with pytest.raises(ConfigError, match="amax_history_len"):
        with fp8_autocast(recipe=Fp8Recipe(amax_history_len=32)):
            m(torch.randn(2, 64))


def test_convert_linears_to_fp8_keeps_params_and_filters():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.GELU(), nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8))
    )
    attn = nn.MultiheadAttention(8, 2)
    model.add_module("attn", attn)
    weights = {n: p for n, p in model.named_parameters()}
    keys_before = set(model.state_dict())
    x = torch.randn(4, 16)
    before = model[2](model[1](model[0](x)))
    recipe = Fp8Recipe(amax_history_len=8)
    names = convert_linears_to_fp8(model, recipe, filter_fn=lambda name, lin: name != "2.1")
    assert names == ["0", "2.0"]
    assert isinstance(model[0], Fp8Linear) and isinstance(model[2][0], Fp8Linear)
    assert type(model[2][1]) is nn.Linear and type(attn.out_proj) is not Fp8Linear
    for n, p in model.named_parameters():
        assert p is weights[n]  # same Parameter objects: optimizer state stays valid
    extra = set(model.state_dict()) - keys_before
    assert extra == {"0.fp8_amax_history", "0.fp8_scale", "2.0.fp8_amax_history", "2.0.fp8_scale"}
    assert torch.equal(model[2](model[1](model[0](x))), before)
    with pytest.raises(ConfigError, match="parent"):
        convert_linears_to_fp8(nn.Linear(2, 2), recipe)


def test_deepcopied_and_meta_initialised_modules_keep_their_own_state():
    recipe = Fp8Recipe(amax_history_len=4)
    _, a = _pair(history_len=4)
    b = copy.deepcopy(a)
    with fp8_autocast(recipe=recipe):
        a(torch.randn(8, 64))
        b(torch.randn(8, 64) * 100)
    assert a.fp8_scale[INPUT] > 10 * b.fp8_scale[INPUT] > 0  # both updated, independently
    lazy = Fp8Linear(64, 48, device="meta", recipe=recipe).to_empty(device="cpu")
    assert (lazy.fp8_scale == 1).all() and (lazy.fp8_amax_history == 0).all()


def test_current_scaling_uses_each_tensors_own_amax_and_keeps_no_state():
    recipe = Fp8Recipe(scaling="current", amax_history_len=4)
    _, m = _pair(history_len=4)
    x = (torch.randn(8, 64) * 1e-3).requires_grad_()
    with fp8_autocast(recipe=recipe):
        y = m(x)
    s_x = torch.tensor(448.0) / x.abs().max()
    s_w = torch.tensor(448.0) / m.weight.abs().max()
    xd = dequantize(quantize(x, s_x, E4M3), s_x)
    wd = dequantize(quantize(m.weight, s_w, E4M3), s_w)
    torch.testing.assert_close(y, xd @ wd.t() + m.bias, rtol=1e-6, atol=1e-7)
    grad = torch.randn(8, 48) * 1e4
    y.backward(grad)
    s_g = torch.tensor(57344.0) / grad.abs().max()
    torch.testing.assert_close(x.grad, dequantize(quantize(grad, s_g, E5M2), s_g) @ wd)
    assert (m.fp8_scale == 1).all() and (m.fp8_amax_history == 0).all()


def test_update_happens_once_at_the_outermost_exit_and_not_after_an_error():
    recipe = Fp8Recipe(amax_history_len=4)
    _, m = _pair(history_len=4)
    with fp8_autocast(recipe=recipe):
        with fp8_autocast(enabled=False):
            ones = torch.ones(2, 64)
            assert torch.equal(m(ones), nn.functional.linear(ones, m.weight, m.bias))
        m(torch.randn(8, 64))
        assert (m.fp8_scale == 1).all()  # not yet: only at the outermost exit
    assert m.fp8_scale[INPUT] != 1
    before = m.fp8_scale.clone()
    with pytest.raises(ValueError, match="boom"):
        with fp8_autocast(recipe=recipe):
            m(torch.randn(8, 64) * 50)
            raise ValueError("boom")
    assert torch.equal(m.fp8_scale, before)


def _regression_loss(use_fp8: bool, steps: int = 200) -> tuple[float, float]:
    # Noisy targets (noise variance 1) on enough points that the fp32 loss ends near the
    # noise floor, where FP8 rounding of a good fit costs only a little.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=gen)
    signal = torch.tanh(x @ torch.randn(16, 4, generator=gen)) @ torch.randn(4, 1, generator=gen)
    y = signal + torch.randn(2048, 1, generator=gen)
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)
    )
    recipe = Fp8Recipe(amax_history_len=16)
    if use_fp8:
        assert convert_linears_to_fp8(model, recipe) == ["0", "2", "4"]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(steps):
        with fp8_autocast(enabled=use_fp8, recipe=recipe):
            loss = nn.functional.mse_loss(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad(), fp8_autocast(enabled=use_fp8, recipe=recipe):
        return first, nn.functional.mse_loss(model(x), y).item()


def test_tiny_mlp_trains_with_emulated_fp8_like_fp32():
    first32, loss32 = _regression_loss(False)
    first8, loss8 = _regression_loss(True)
    assert loss32 < 0.15 * first32 and loss8 < 0.15 * first8  # both really learn
    assert abs(loss8 - loss32) <= 0.04 * loss32, (loss8, loss32)


# ------------------------------------------------------------------- amax reduction, 2 ranks


def _amax_reduction_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        recipe = Fp8Recipe(amax_history_len=4)
        torch.manual_seed(0)
        reduced = Fp8Linear(32, 16, recipe=recipe)
        local = Fp8Linear(32, 16, recipe=recipe)
        local.load_state_dict(reduced.state_dict())
        gen = torch.Generator().manual_seed(5)
        for step in range(3):
            x = torch.randn(8, 32, generator=gen) * (rank + 1) * (step + 1)
            for m, group in ((reduced, dist.group.WORLD), (local, None)):
                with fp8_autocast(recipe=recipe, amax_reduction_group=group):
                    y = m(x)
                (y * (rank + 1)).sum().backward()
        state = {
            "reduced": reduced.fp8_scale.clone(),
            "local": local.fp8_scale.clone(),
            "hist": reduced.fp8_amax_history.clone(),
        }
        # A rank that runs different FP8 layers in the region gets a clear error, no hang.
        extra = Fp8Linear(32, 16, recipe=recipe)
        mismatch = ""
        try:
            with fp8_autocast(recipe=recipe, amax_reduction_group=dist.group.WORLD):
                reduced(x)
                if rank == 0:
                    extra(x)
        except RuntimeError as exc:
            mismatch = str(exc)
        torch.save({**state, "mismatch": mismatch}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_amax_reduction_makes_tp_ranks_agree(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = (2, str(tmp_path / "store"), str(tmp_path))
    mp.spawn(_amax_reduction_worker, args=args, nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for r in (r0, r1):
        assert "different number" in r["mismatch"]
    assert torch.equal(r0["reduced"], r1["reduced"]) and torch.equal(r0["hist"], r1["hist"])
    assert not torch.equal(r0["local"], r1["local"])  # without the group they differ
    # The reduced scales are those of the rank with the larger amaxes (rank 1).
    torch.testing.assert_close(r0["reduced"], r1["local"], rtol=0, atol=0)
    gen = torch.Generator().manual_seed(5)
    in_amax = [
        (torch.randn(8, 32, generator=gen) * 2 * (step + 1)).abs().max().item() for step in (0, 1, 2)
    ]
    assert r0["reduced"][INPUT].item() == pytest.approx(448.0 / max(in_amax), rel=1e-6)


# ----------------------------------------------------------------------------- selection


def test_resolve_precision_plans_and_errors(caplog):
    cpu = HardwareProbe(cuda=False, capability=None, te_ok=False, te_reason="no CUDA device")
    a100 = HardwareProbe(cuda=True, capability=(8, 0), te_ok=True, te_reason="")
    h100 = HardwareProbe(cuda=True, capability=(9, 0), te_ok=True, te_reason="")
    h100_no_te = HardwareProbe(
        cuda=True, capability=(9, 0), te_ok=False, te_reason="No module named 'transformer_engine'"
    )

    p = resolve_precision("fp32", probe=cpu)
    assert (p.param_dtype, p.autocast_dtype, p.fp8_backend) == (torch.float32, None, None)
    assert resolve_precision("bf16", probe=cpu).autocast_dtype == torch.bfloat16
    with caplog.at_level(logging.INFO, logger="titans_scale.precision.select"):
        p = resolve_precision("fp8", "auto", probe=cpu)
    assert p.fp8_backend == "emulated" and "no CUDA" in p.reason
    assert "emulated" in caplog.text and "no CUDA" in caplog.text
    assert resolve_precision("fp8", "auto", probe=h100).fp8_backend == "te"
    p = resolve_precision("fp8", "auto", probe=h100_no_te)
    assert p.fp8_backend == "emulated" and "transformer_engine" in p.reason
    assert resolve_precision("fp8", "emulated", probe=a100).fp8_backend == "emulated"

    with pytest.raises(ConfigError, match="fp8_backend='te' needs a CUDA GPU"):
        resolve_precision("fp8", "te", probe=cpu)
    with pytest.raises(ConfigError, match="8.9"):
        resolve_precision("fp8", "auto", probe=a100)
    with pytest.raises(ConfigError, match="8.9"):
        resolve_precision("fp8", "te", probe=a100)
    with pytest.raises(ConfigError, match="transformer_engine"):
        resolve_precision("fp8", "te", probe=h100_no_te)
    with pytest.raises(ConfigError, match="precision="):
        resolve_precision("fp16", probe=cpu)
    with pytest.raises(ConfigError, match="fp8_backend="):
        resolve_precision("fp8", "cuda", probe=cpu)


def test_resolve_precision_on_this_machine():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-machine path; GPU paths are covered with fake probes")
    assert resolve_precision("fp8").fp8_backend == "emulated"
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_precision("fp8", "te")


# ---------------------------------------------- TE backend: mappings checkable without TE


def test_megatron_fp8_kwargs_build_a_transformer_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    recipe = Fp8Recipe(margin=1, amax_history_len=16, amax_compute_algo="most_recent")
    kwargs = te_backend.megatron_fp8_config_kwargs(recipe)
    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    assert set(kwargs) <= set(fields)
    for key in ("fp8", "fp8_recipe", "fp8_amax_compute_algo"):  # Literal-typed fields
        assert kwargs[key] in _literal_values(fields[key].type), key
    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, **kwargs)
    assert (cfg.fp8, cfg.fp8_recipe, cfg.fp8_margin) == ("hybrid", "delayed", 1)
    assert (cfg.fp8_amax_history_len, cfg.fp8_amax_compute_algo) == (16, "most_recent")
    current = te_backend.megatron_fp8_config_kwargs(Fp8Recipe(scaling="current", format="e4m3"))
    assert (current["fp8"], current["fp8_recipe"]) == ("e4m3", "tensorwise")


def test_megatron_te_spec_names_exist_in_megatron_core():
    import megatron.core

    root = Path(megatron.core.__file__).parent
    for path in [*te_backend.MEGATRON_TE_LAYER_SPEC.values(), te_backend.MEGATRON_GPT_TE_SPEC_FN]:
        module, name = path.rsplit(".", 1)
        source = root.joinpath(*module.split(".")[2:]).with_suffix(".py")
        tree = ast.parse(source.read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        assert name in defined, path


def test_te_shape_check_names_bad_layers():
    bad = te_backend.te_fp8_shape_problems([("ok", 64, 48), ("in", 40, 48), ("out", 64, 12)])
    assert bad == ["in (out=48, in=40)", "out (out=12, in=64)"]


def test_te_backend_without_te_is_a_clear_error():
    ok, why = te_backend.te_available()
    if ok:
        pytest.skip("transformer_engine is installed here")
    assert "transformer_engine" in why and "\n" not in why
    with pytest.raises(ConfigError, match="emulated"):
        te_backend.te_fp8_autocast(recipe=Fp8Recipe())


# ------------------------------------------------------------------ TE backend: CUDA only

_CUDA = torch.cuda.is_available()
_TE_OK, _TE_WHY = te_backend.te_available() if _CUDA else (False, "no CUDA device")
if _TE_OK:
    _TE_OK, _TE_WHY = te_backend.te_fp8_supported()
needs_te = pytest.mark.skipif(
    not _TE_OK, reason=f"needs a CUDA GPU (cc >= 8.9) with transformer_engine: {_TE_WHY}"
)


@needs_te
@pytest.mark.gpu
def test_te_recipe_has_the_same_fields():
    from transformer_engine.common import recipe as te_recipe

    recipe = Fp8Recipe(margin=2, amax_history_len=16, amax_compute_algo="most_recent")
    r = te_backend.to_te_recipe(recipe)
    assert isinstance(r, te_recipe.DelayedScaling)
    assert (r.margin, r.amax_history_len, r.amax_compute_algo) == (2, 16, "most_recent")
    assert r.fp8_format == te_recipe.Format.HYBRID
    assert te_backend.to_te_recipe(Fp8Recipe(format="e4m3")).fp8_format == te_recipe.Format.E4M3


@needs_te
@pytest.mark.gpu
def test_te_linear_matches_the_emulation():
    recipe = Fp8Recipe(amax_history_len=8)
    torch.manual_seed(0)
    emu = Fp8Linear(64, 48, device="cuda", recipe=recipe)
    te_lin = te_backend.make_te_linear(64, 48, params_dtype=torch.float32, device="cuda")
    with torch.no_grad():
        te_lin.weight.copy_(emu.weight)
        te_lin.bias.copy_(emu.bias)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for step in range(4):
        x = torch.randn(16, 64, device="cuda", generator=gen) * (step + 1)
        with fp8_autocast(recipe=recipe):
            y_emu = emu(x)
        with te_backend.te_fp8_autocast(recipe=recipe):
            y_te = te_lin(x)
        assert _rel_err(y_te, y_emu) < 1e-2, step
        y_emu.sum().backward()
        y_te.sum().backward()
    te_scale = te_lin.fp8_meta["scaling_fwd"].scale[:2]  # TE's (input, weight) slots
    torch.testing.assert_close(te_scale, emu.fp8_scale[:2], rtol=1e-6, atol=0)
    assert _rel_err(te_lin.weight.grad, emu.weight.grad) < 5e-2


@needs_te
@pytest.mark.gpu
def test_convert_linears_to_te_runs_in_fp8():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).cuda()
    reference = copy.deepcopy(model)
    names = te_backend.convert_linears_to_te(model)
    assert names == ["0", "2"]
    x = torch.randn(32, 64, device="cuda")
    with te_backend.te_fp8_autocast(recipe=Fp8Recipe(amax_history_len=8)):
        y = model(x)
    assert _rel_err(y, reference(x)) < 0.1
