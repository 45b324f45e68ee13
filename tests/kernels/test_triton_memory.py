"""The Triton memory kernels equal the chunked path and the float64 reference.

Runs the kernels in the Triton interpreter on the CPU (TRITON_INTERPRET=1, set by this
folder's conftest.py before triton is first imported), or on CUDA where there is one.
Every kernel output buffer is filled with NaN before each launch (POISON_OUTPUTS), so an
element a kernel forgets to write fails the comparison. Shapes are tiny on purpose: the
interpreter runs each tl.dot through numpy.
"""

import os
import subprocess
import sys
from itertools import product
from types import SimpleNamespace

import pytest
import torch

from titans_scale.ops import triton_scan as km  # noqa: E402  (conftest.py set TRITON_INTERPRET first)
from titans_scale.kernels import plan  # noqa: E402

if (not km.INTERPRETED and not torch.cuda.is_available()) or km.INTERPRETER_BROKEN:
    raise RuntimeError("the kernel tests need TRITON_INTERPRET=1 set before triton is first imported "
                       "(tests/kernels/conftest.py sets it; something imported triton earlier): "
                       "run them with TRITON_INTERPRET=1 in the environment")

from titans_scale.ops.memory import MemoryArgumentError, _resolve, memory_scan  # noqa: E402
from titans_scale.ops.state import MemoryState  # noqa: E402
from tests.helpers import make_inputs, rel_err  # noqa: E402

DEVICE = "cpu" if km.INTERPRETED else "cuda"


@pytest.fixture(autouse=True)
def interpreter_and_poison(monkeypatch):
    if km.INTERPRETED:              # triton also consults it when an interpreted kernel launches
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(km, "POISON_OUTPUTS", True)


def _inputs(depth, d, L, E=2, dtype=torch.float32, H=2, theta_scale=1.0, seed=None):
    q, k, v, th, et, al, init = make_inputs(B=1, H=H, L=L, d=d, depth=depth, expansion=E, dtype=torch.float32,
                                            seed=seed)
    th = th * theta_scale
    acts = [x.to(DEVICE, dtype).requires_grad_(True) for x in (q, k, v, th, et, al)]
    return (*acts, [w.to(DEVICE).requires_grad_(True) for w in init])


def _as_float64(args):
    *acts, init = args
    return (*[x.detach().double().requires_grad_(True) for x in acts],
            [w.detach().double().requires_grad_(True) for w in init])


def _run(impl, args, C, probe, g=None, pieces=None, norm=()):
    """y, final state and the gradients of a loss on both w.r.t. every input.
    pieces: cut points for streaming the sequence through several calls; norm: (ln_weight,
    ln_bias) for the normalised memory, whose gradients come last."""
    L = args[0].shape[2]
    state, ys = args[6], []
    bounds = [0, *(pieces or []), L]
    ln = dict(zip(("ln_weight", "ln_bias"), norm))
    for a, b in zip(bounds[:-1], bounds[1:]):
        y, state = memory_scan(*(x[:, :, a:b] for x in args[:6]), state, chunk_size=C, impl=impl,
                               recompute_group=g, **ln)
        ys.append(y)
    y = torch.cat(ys, dim=2)
    p_y, p_w = probe
    loss = (y.to(p_y.dtype) * p_y.to(y.device)).sum()
    loss = loss + sum((w * pw.to(w)).sum() for w, pw in zip(state.weights + state.chunk_start, p_w * 2))
    loss = loss + sum((m * m).sum() for m in state.momentum)
    flat = [*args[:6], *args[6], *norm]
    return y, state, torch.autograd.grad(loss, flat)


def _probe(args, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return (torch.randn(args[0].shape[:3] + (args[2].shape[-1],), dtype=torch.float64, generator=g),
            [torch.randn(w.shape, dtype=torch.float64, generator=g) for w in args[6]])


def _assert_close(got, want, tol, what):
    y, s, grads = got
    y_ref, s_ref, grads_ref = want
    assert not torch.isnan(y).any(), f"{what}: y has unwritten (NaN) elements"
    assert rel_err(y.double().cpu(), y_ref.double().cpu()) < tol, f"{what}: y"
    for name in ("chunk_start", "weights", "momentum"):
        for a, b in zip(getattr(s, name), getattr(s_ref, name)):
            assert rel_err(a.double().cpu(), b.double().cpu()) < tol, f"{what}: state {name}"
    assert s.position == s_ref.position
    names = ["q", "k", "v", "theta", "eta", "alpha"] + [f"W{i}" for i in range(len(s.weights))]
    names += ["ln_weight", "ln_bias"]
    for name, a, b in zip(names, grads, grads_ref):
        assert not torch.isnan(a).any(), f"{what}: grad {name} has unwritten (NaN) elements"
        assert rel_err(a.double().cpu(), b.double().cpu()) < tol, f"{what}: grad {name}"


CASES = [  # depth, d, chunk size, L (never a multiple of C), expansion (hidden 48: a partial tile), heads
    (1, 16, 8, 21, 1, 2), (1, 32, 64, 137, 1, 1), (1, 64, 16, 45, 1, 2),
    (2, 16, 16, 45, 3, 2), (2, 32, 8, 21, 2, 2), (2, 64, 64, 137, 2, 1),
]


@pytest.mark.parametrize("depth,d,C,L,E,H", CASES)
def test_fp32_equals_chunked_and_reference(depth, d, C, L, E, H):
    args = _inputs(depth, d, L, E, H=H)
    probe = _probe(args)
    got = _run("triton", args, C, probe)
    _assert_close(got, _run("chunked", args, C, probe), 1e-5, "vs chunked")
    _assert_close(got, _run("naive", _as_float64(args), C, probe), 1e-5, "vs float64 reference")


def _norm(H, d, dtype=torch.float32):
    """ln_weight, ln_bias [H, d] away from their init (1, 0), so every term of f shows."""
    g = torch.Generator().manual_seed(0)
    w = 1.0 + 0.3 * torch.randn(H, d, generator=g)
    b = 0.2 * torch.randn(H, d, generator=g)
    return [p.to(DEVICE, dtype).requires_grad_(True) for p in (w, b)]


def _norm64(norm):
    return [p.detach().double().requires_grad_(True) for p in norm]


# depth, d (24: LN over 24 of a 32-wide tile), chunk size, L (partial chunk at the end), expansion, heads.
# Inner steps up to 0.15 (theta_scale 0.25), as tests/ops/test_memory_norm.py: LN makes the inner
# loop chaotic at larger steps, so the float64 reference itself moves by more than fp32 rounding.
# Fixed inputs: fp32 rounding alone reaches 1e-5 to 3e-5 of the reference on most draws, but a
# row of g with a small spread amplifies it (one draw at d 24, L 37: 3.4e-4 for impl="chunked",
# 1.8e-4 for the kernels).
NORM_CASES = [(1, 16, 8, 21, 1, 2), (1, 24, 8, 21, 1, 1), (2, 16, 8, 21, 2, 2), (2, 24, 8, 37, 2, 1)]
NORM_SLOW = [(1, 64, 16, 45, 1, 2), (2, 64, 64, 137, 2, 1)]


@pytest.mark.parametrize("depth,d,C,L,E,H",
                         NORM_CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in NORM_SLOW])
def test_normalised_memory_equals_reference(depth, d, C, L, E, H):
    """f(k) = k + ln_weight LN(g(k)) + ln_bias: values, final state and every gradient
    (ln_weight and ln_bias included) against the float64 per-token reference."""
    args = _inputs(depth, d, L, E, H=H, theta_scale=0.25, seed=1)
    norm = _norm(H, d)
    probe = _probe(args, seed=0)
    got = _run("triton", args, C, probe, norm=norm)
    _assert_close(got, _run("naive", _as_float64(args), C, probe, norm=_norm64(norm)), 1e-4, "norm vs float64")


def test_normalised_depth1_plans_one_output_tile():
    """LN couples a row's outputs, so the depth-1 forward gets every column in one program;
    the backward tiles the state's input rows instead."""
    for d in (16, 48, 128):
        shape = plan.Shape(1, d, d, d, 8, "fp32", norm=True)
        assert {t.block_j for t in plan.candidates(shape, "fwd")} == {plan.p2(d)}
        assert {t.block_j for t in plan.candidates(shape, "bwd")} == {16, 32, 64} & set(range(plan.p2(d) + 1))


# Every tiling the dispatcher may choose (plan.candidates, its own table) over the widths the configs
# can ask for (d 16-256, expansion 1-4), per depth, norm, kernel kind and input dtype: a new candidate
# is run here without editing this file. The interpreter ignores warps and stages, so a tiling is its
# BLOCK_J and its precision override (16-bit inputs fall back to IEEE dots where TF32 tiles do not
# fit; those run with bf16 inputs). Each runs at the first test width that offers it (partial tiles
# where the width allows: 48 is a partial 64-wide and 1.5 32-wide tiles), with recompute so the
# forward without reads runs too.
CONFIG_WIDTHS = [(d, E) for d in (16, 32, 64, 128, 256) for E in (1, 2, 3, 4)]
TEST_WIDTHS = {1: [(48, 1), (24, 1), (16, 1), (96, 1), (192, 1)], 2: [(16, 3)]}   # depth: (d, E), preferred first


def _shape(depth, d, E, norm, dtype="fp32"):
    return plan.Shape(depth, d, d, E * d if depth == 2 else d, 8, dtype, norm)


def _tilings(depth, d, E, norm, kind, dtype="fp32"):
    return {(t.block_j, t.precision) for t in plan.candidates(_shape(depth, d, E, norm, dtype), kind)}


def _dispatcher_tilings():
    """(depth, norm, d, E, kinds, BLOCK_J, precision) to run: the kinds that run that tiling at that
    test width."""
    wanted = {(depth, norm, kind, tiling) for depth in (1, 2) for norm in (False, True) for kind in plan.KINDS
              for d, E in CONFIG_WIDTHS if depth == 2 or E == 1 for dtype in ("fp32", "bf16")
              for tiling in _tilings(depth, d, E, norm, kind, dtype)}
    runs: dict = {}
    for depth, norm, kind, tiling in sorted(wanted, key=str):
        d, E = next(w for w in TEST_WIDTHS[depth] if tiling in _tilings(depth, *w, norm, kind, "bf16"))
        runs.setdefault((depth, norm, d, E, *tiling), []).append(kind)
    return [(depth, norm, d, E, tuple(kinds), bj, prec) for (depth, norm, d, E, bj, prec), kinds in runs.items()]


TILINGS = _dispatcher_tilings()


def test_the_tiling_tests_cover_every_candidate():
    """The table above is not empty by accident: BLOCK_J 16, 32 and 64 for every depth, norm and
    kind, with and without the IEEE override, and the normalised depth-1 forward's whole-row tiles
    up to 256."""
    covered = {(depth, norm, kind, bj, prec) for depth, norm, d, E, kinds, bj, prec in TILINGS for kind in kinds}
    for key in product((1, 2), (False, True), plan.KINDS, (16, 32, 64), (None, "ieee")):
        assert key in covered
    whole_rows = {bj for depth, norm, kind, bj, prec in covered if (depth, norm, kind) == (1, True, "fwd")}
    assert whole_rows == {16, 32, 64, 128, 256}


def _tiling_param(depth, norm, d, E, kinds, bj, prec):
    """The whole-row 256 tile (d 192, ~8 s each) is slow: it fits no target (262,144 B), so only the
    interpreter runs it."""
    return pytest.param(depth, norm, d, E, kinds, bj, prec, marks=[pytest.mark.slow] if d > 128 else [],
                        id=f"depth{depth}-{'norm' if norm else 'plain'}-d{d}-E{E}-{'+'.join(kinds)}-{bj}"
                           + (f"-{prec}" if prec else ""))


@pytest.mark.parametrize("depth,norm,d,E,kinds,block_j,precision", [_tiling_param(*t) for t in TILINGS])
def test_every_tiling_equals_chunked_and_reference(depth, norm, d, E, kinds, block_j, precision, monkeypatch):
    tiles = plan.Tiles(block_j, num_warps=4, num_stages=1, precision=precision)
    monkeypatch.setattr(km, "TILES", dict.fromkeys(kinds, tiles))
    what = f"{kinds} {tiles}"
    dtype, tol = (torch.bfloat16, 1e-2) if precision else (torch.float32, 1e-4 if norm else 1e-5)
    if norm:     # as test_normalised_memory_equals_reference: small inner steps
        args = _inputs(depth, d, 21, E, dtype=dtype, H=1, theta_scale=0.25, seed=1)
        ln = _norm(1, d)
        probe = _probe(args, seed=0)
        got = _run("triton", args, 8, probe, g=2, norm=ln)
        _assert_close(got, _run("naive", _as_float64(args), 8, probe, norm=_norm64(ln)), tol, what)
        return
    args = _inputs(depth, d, 21, E, dtype=dtype, H=1)
    probe = _probe(args)
    got = _run("triton", args, 8, probe, g=2)
    if not precision:
        _assert_close(got, _run("chunked", args, 8, probe), tol, f"{what} vs chunked")
    _assert_close(got, _run("naive", _as_float64(args), 8, probe), tol, f"{what} vs float64 reference")


@pytest.mark.parametrize("depth", [1, 2])
def test_normalised_memory_streamed(depth):
    """Cut mid-chunk, with recompute: the same as one call of the chunked path."""
    args = _inputs(depth, 16, 45, E=2, theta_scale=0.25, seed=2)
    norm = _norm(2, 16)
    probe = _probe(args, seed=0)
    whole = _run("chunked", args, 8, probe, norm=norm)
    _assert_close(_run("triton", args, 8, probe, g=2, pieces=[5, 29, 30], norm=norm), whole, 1e-4, "streamed")


@pytest.mark.parametrize("depth", [1, 2])
def test_normalised_memory_bf16_inputs(depth):
    """bf16 q, k, v with fp32 ln_weight/ln_bias (the kernels keep the norm and the state in fp32)."""
    args = _inputs(depth, 32, 45, dtype=torch.bfloat16, H=1, theta_scale=0.25, seed=1)
    norm = _norm(1, 32)
    probe = _probe(args, seed=0)
    got = _run("triton", args, 16, probe, norm=norm)
    assert got[0].dtype == torch.bfloat16 and got[2][-1].dtype == torch.float32
    _assert_close(got, _run("naive", _as_float64(args), 16, probe, norm=_norm64(norm)), 1e-2, "bf16 norm")


@pytest.mark.parametrize("depth", [1, 2])
def test_bf16_inputs_equal_reference(depth):
    args = _inputs(depth, 32, 45, dtype=torch.bfloat16, H=1)
    probe = _probe(args)
    y, state, grads = got = _run("triton", args, 16, probe)
    assert y.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16
    assert all(w.dtype == torch.float32 for w in state.weights + state.momentum)
    _assert_close(got, _run("naive", _as_float64(args), 16, probe), 1e-2, "bf16 vs float64 reference")


@pytest.mark.parametrize("depth", [1, 2])
def test_streaming_state_in_and_out(depth):
    """Cut mid-chunk: each call has a leading partial chunk, full chunks and a trailing piece."""
    args = _inputs(depth, 16, 45, E=2)
    probe = _probe(args)
    whole = _run("chunked", args, 8, probe)
    _assert_close(_run("triton", args, 8, probe, pieces=[5, 29, 30]), whole, 1e-5, "streamed")
    _assert_close(_run("triton", args, 8, probe, pieces=[16, 40]), whole, 1e-5, "streamed on the grid")


@pytest.mark.parametrize("depth", [1, 2])
def test_recompute_gives_the_same_gradients(depth):
    args = _inputs(depth, 16, 61, E=2)
    probe = _probe(args)
    plain = _run("triton", args, 8, probe)
    for g in (2, 3):
        _assert_close(_run("triton", args, 8, probe, g=g), plain, 1e-6, f"recompute_group={g}")


def test_triton_refuses_what_it_cannot_run():
    q, k, v, th, et, al, init = make_inputs(B=1, H=1, L=8, d=8, depth=3)
    with pytest.raises(MemoryArgumentError, match="depth 1 and 2"):
        memory_scan(*(x.float() for x in (q, k, v, th, et, al)), [w.float() for w in init], impl="triton")
    with pytest.raises(MemoryArgumentError, match="float64"):
        memory_scan(q, k, v, th, et, al, [torch.zeros(1, 1, 8, 8, dtype=torch.float64)], impl="triton")
    state = MemoryState.fresh([w.float() for w in init], 64)
    assert _resolve("auto", q.float(), state, None) == "chunked"          # CPU tensors: never triton by default


def test_auto_falls_back_where_the_normalised_kernels_do_not_fit(monkeypatch):
    """The dispatcher plans the kernels it would launch, the normalised ones included: where those
    do not fit the device, impl='auto' runs 'fused' and impl='triton' says why. (A CUDA-looking q
    and a stubbed device plan: which shapes fit a real target is tests/kernels/test_aot.py.)"""
    asked = []

    def device_plan(shape, arch):
        asked.append((shape.norm, arch))
        return ({}, "_bwd_linear_norm needs 300,000 B of shared memory") if shape.norm else ({"bwd": None}, None)

    monkeypatch.setattr(km, "_device_plan", device_plan)
    monkeypatch.setattr(km, "_arch", lambda device: 90)
    q = SimpleNamespace(is_cuda=True, dtype=torch.float32, shape=(1, 1, 8, 16), device=torch.device("cuda", 0))
    state = MemoryState.fresh([torch.zeros(1, 1, 16, 16)], 8)
    norm = (torch.ones(1, 16), torch.zeros(1, 16))
    assert _resolve("auto", q, state, None) == "triton"
    assert _resolve("auto", q, state, norm) == "fused"
    with pytest.raises(MemoryArgumentError, match="shared memory; use impl='fused'"):
        _resolve("triton", q, state, norm)
    assert asked == [(False, 90), (True, 90), (True, 90)]


_NO_TRITON_SCRIPT = """
import sys, torch
{setup}
from titans_scale.ops.memory import MemoryArgumentError, memory_scan
x = torch.randn(1, 1, 8, 4); g = torch.rand(1, 1, 8)
try:
    memory_scan(x, x, x, g, g, g, [torch.zeros(1, 1, 4, 4)], chunk_size=4, impl="triton")
except MemoryArgumentError as e:
    print("ERR", e)
"""


@pytest.mark.parametrize("setup,expect", [
    ("", "needs CUDA tensors, or TRITON_INTERPRET=1"),             # triton installed, no GPU, no interpreter
    ("sys.modules['triton'] = None", "impl='triton' is unavailable"),  # triton not installed
    ("import os, triton; os.environ['TRITON_INTERPRET'] = '1'", "before triton is first imported"),
])
def test_clear_error_without_cuda_interpreter_or_triton(setup, expect):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so impl='triton' can run on CPU-less paths")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _NO_TRITON_SCRIPT.format(setup=setup)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip()
    assert line.startswith("ERR") and expect in line and "\n" not in line, line


def test_a_missing_kernels_package_is_an_error_not_a_fallback():
    """Without triton, impl='auto' quietly runs the PyTorch path; without our own kernels package
    (a broken install) it must raise, or a GPU run silently loses its kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    setup = "sys.modules['titans_scale.kernels'] = None"
    out = subprocess.run([sys.executable, "-c", _NO_TRITON_SCRIPT.format(setup=setup)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr and "titans_scale.kernels" in out.stderr, (
        out.stdout, out.stderr[-2000:])
