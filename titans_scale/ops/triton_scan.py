"""impl="triton": the memory scan on the fused chunk kernels, differentiable end to end.

ops/memory.py imports this module on first use (importing triton is slow). The call layout
(PyTorch chunk_step for partial chunks at either end, one autograd Function over the full
chunks in between, coefficient gradients mapped back to the gates, recompute groups) is
ops/scan_function.py, shared with impl="fused"; this module supplies its per-chunk loops
as the forward kernel (kernels/memory_fwd.py) and the backward kernel
(kernels/memory_bwd.py), one program per (batch, head).

Tiles come from kernels/plan.py: on CUDA the first candidate tiling that fits the device's
shared memory (compiled ahead of time for its architecture, once per shape and process);
where none fits, unsupported() says why (logged once), so impl="auto" runs "fused" and
impl="triton" raises instead of launching a kernel the GPU refuses.

The normalised memory (norm = (ln_weight, ln_bias), DESIGN.md section 3) is the kernels'
NORM variant: ln_weight/ln_bias go in per (batch, head) [BH, d] as the ScanBackend protocol
hands them, their gradients are added into dnorm by the backward kernel.

Precision: state and accumulation are fp32; inputs may be fp32, bf16 or fp16 (cast to
fp32 on load). With fp32 inputs the kernels' dots run in IEEE fp32; with 16-bit inputs in
TF32 on tensor cores.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass

import torch
import triton

from titans_scale.kernels import plan
from titans_scale.kernels.memory_fwd import _fwd_linear, _fwd_mlp2
from titans_scale.kernels.plan import Shape, Tiles

from .scan_function import ScanConfig, scan_with_backend
from .state import MemoryState

log = logging.getLogger(__name__)


def _interpreted(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(fn, InterpretedFunction)


# Fixed when the kernels were defined. Triton's own @jit helpers (tl.sum, ...) are defined
# when triton is imported: if TRITON_INTERPRET=1 came later, ours are interpreted but those
# are not, and launching fails deep inside triton, so it is reported as a usage error.
INTERPRETED = _interpreted(_fwd_linear)
INTERPRETER_BROKEN = INTERPRETED and not _interpreted(triton.language.standard.sum)
POISON_OUTPUTS = False   # tests: fill kernel outputs with NaN first, so unwritten elements show
TILES: dict[str, Tiles] = {}   # tests: force a tiling per kind, "fwd" | "bwd" (the interpreter has no target)
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class KernelConfig(ScanConfig):
    dtype: str             # q, k, v: fp32 | bf16 | fp16
    fwd: Tiles
    fwd_recompute: Tiles   # the forward without reads (recompute in backward)
    bwd: Tiles
    norm: bool             # the normalised memory (the kernels' NORM)

    @property
    def shape(self) -> Shape:
        return Shape(self.depth, self.d_in, self.d_out, self.hidden, self.chunk_size, self.dtype, self.norm)

    def launch(self, kind: str, write_y: bool = True) -> dict:
        """The launch's constexprs and compile options."""
        tiles = self.bwd if kind == "bwd" else self.fwd if write_y else self.fwd_recompute
        return dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                    **plan.constexprs(self.shape, kind, tiles, write_y))


class TritonBackend:
    """The ScanBackend of ops/scan_function.py on the kernels (q, k, v may be 16-bit)."""

    @staticmethod
    def new(shape, device, dtype=torch.float32) -> torch.Tensor:
        if POISON_OUTPUTS:
            return torch.full(shape, float("nan"), device=device, dtype=dtype)
        return torch.empty(shape, device=device, dtype=dtype)

    @staticmethod
    def forward(cfg, q, k, v, coefs, ws, ss, saved_w, saved_s, y=None, tok_chunk0=0, norm=None):
        cs, cw, P, A, Q = coefs
        BH, n = P.shape
        args = dict(n_chunks=n, tok_chunk0=tok_chunk0, n_tok_chunks=q.shape[1] // cfg.chunk_size,
                    save_stride=cfg.save_stride, n_slots=saved_w[0].shape[1], **cfg.launch("fwd", y is not None))
        y_arg = y if y is not None else q   # never written when WRITE_Y is False
        ln = _norm_args(cfg, norm, q)
        if cfg.depth == 1:
            grid = (BH, triton.cdiv(cfg.d_out, args["BLOCK_OUT"]))
            _fwd_linear[grid](q, k, v, cs, cw, P, A, Q, y_arg, ws[0], ss[0], saved_w[0], saved_s[0], *ln, **args)
        else:
            _fwd_mlp2[(BH,)](q, k, v, cs, cw, P, A, Q, y_arg, *ws, *ss, *saved_w, *saved_s, *ln, **args)

    @staticmethod
    def backward(cfg, q, k, v, dy, coefs, states_w, states_s, slot0, dws, dss, dq, dk, dv, tok_chunk0,
                 norm=None, dnorm=None):
        cs, cw, P, A, Q = coefs
        BH, n = P.shape
        dcoefs = [TritonBackend.new(t.shape, t.device) for t in coefs]
        args = dict(n_chunks=n, tok_chunk0=tok_chunk0, n_tok_chunks=q.shape[1] // cfg.chunk_size,
                    slot0=slot0, n_slots=states_w[0].shape[1], **cfg.launch("bwd"))
        plan.kernel(cfg.shape, "bwd")[(BH,)](q, k, v, dy, cs, cw, P, A, Q, *states_w, *states_s, *dws, *dss,
                                             *_norm_args(cfg, norm, q), dq, dk, dv, *dcoefs,
                                             *_norm_args(cfg, dnorm, q, into=True), **args)
        return dcoefs


def _norm_args(cfg: KernelConfig, pair, placeholder, into: bool = False) -> tuple:
    """The kernels' (ln_weight, ln_bias) pointers, [BH, d] fp32, or with into=True the
    (d ln_weight, d ln_bias) buffers the backward adds into in place; a placeholder pair
    (never read) for the plain memory."""
    if not cfg.norm:
        return placeholder, placeholder
    assert all(p.dtype == torch.float32 for p in pair), "the kernels take the norm's tensors in fp32"
    if into:
        assert all(p.is_contiguous() for p in pair), "dnorm buffers are written in place: contiguous"
        return tuple(pair)
    return tuple(p.contiguous() for p in pair)


def _shape(q: torch.Tensor, state: MemoryState, norm: bool = False) -> Shape:
    w = state.weights
    return Shape(state.depth, q.shape[-1], w[-1].shape[-1], w[0].shape[-1], state.chunk_size, _DTYPES[q.dtype], norm)


def _arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def _device_plan(shape: Shape, arch: int) -> tuple[dict, str | None]:
    """Tiles per launch on sm_<arch>, or why nothing fits (logged once per shape). The
    backward, the largest kernel, is tried first: a shape it refuses needs no more compiles."""
    tiles = {}
    for key, kind, write_y in (("bwd", "bwd", True), ("fwd", "fwd", True), ("fwd_recompute", "fwd", False)):
        choice = plan.choose(shape, kind, arch, write_y)
        if not choice.ok:
            log.warning("impl='triton' cannot run %s on sm_%d: %s; impl='auto' runs 'fused' instead",
                        shape, arch, choice.reason)
            return {}, choice.reason
        tiles[key] = choice.tiles
    return tiles, None


def unsupported(q: torch.Tensor, state: MemoryState, norm: bool = False) -> str | None:
    """Why impl='triton' cannot run these inputs (None when it can); norm: the normalised
    memory, whose kernels differ (and so does what fits)."""
    if INTERPRETER_BROKEN:
        return ("impl='triton' under TRITON_INTERPRET=1 needs the variable set before triton is first "
                "imported (something imported triton earlier); export it before starting Python")
    if not (q.is_cuda or INTERPRETED):
        return ("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is first "
                f"imported to run on the CPU (got {q.device} tensors); use impl='chunked' on the CPU")
    if state.depth > 2:
        return f"impl='triton' has kernels for memory depth 1 and 2, got depth {state.depth}; use impl='chunked'"
    if q.dtype not in _DTYPES:
        return f"impl='triton' computes in fp32 from fp32/bf16/fp16 inputs, got {q.dtype}; use impl='chunked'"
    if q.is_cuda:
        reason = _device_plan(_shape(q, state, norm), _arch(q.device))[1]
        if reason is not None:
            return f"{reason}; use impl='fused'"
    return None


def kernel_config(q, v, state: MemoryState, recompute_group, norm: bool = False) -> KernelConfig:
    base = ScanConfig.of(q, v, state, recompute_group)
    shape = _shape(q, state, norm)
    if q.is_cuda:
        tiles = _device_plan(shape, _arch(q.device))[0]     # unsupported() already refused what does not fit
    else:
        tiles = {key: TILES.get(kind) or plan.default_tiles(shape, kind)
                 for key, kind in (("fwd", "fwd"), ("fwd_recompute", "fwd"), ("bwd", "bwd"))}
    return KernelConfig(**asdict(base), dtype=shape.dtype, norm=norm, **tiles)


def triton_scan(q, k, v, theta, eta, alpha, state: MemoryState, recompute_group: int | None = None, norm=None):
    """The registered impl: PyTorch for partial chunks at either end, kernels in between.
    norm: (ln_weight, ln_bias) [H, d], or None for the plain memory."""
    cfg = kernel_config(q, v, state, recompute_group, norm is not None)
    extra = {} if norm is None else {"norm": tuple(p.to(state.weights[0].dtype) for p in norm)}
    return scan_with_backend(TritonBackend, cfg, q, k, v, theta, eta, alpha, state, **extra)

