"""What impl="triton" launches for a memory shape, with which tiles, and whether a GPU holds it.

A shape (depth, widths, chunk size, input dtype) runs one forward kernel (and, with recompute,
the same kernel without its reads) and one backward kernel. Each has a few candidate tilings
(the hidden / output-column tile BLOCK_J, warps, pipeline stages), tried in order of speed;
`choose` keeps the first whose shared memory fits the target's per-block limit, compiled ahead
of time for that target (kernels/aot.py). No candidate fitting is an answer too: the
dispatcher then runs impl="fused" instead of launching something the GPU refuses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import triton

from . import aot
from .memory_bwd import _bwd_linear, _bwd_linear_norm, _bwd_mlp2
from .memory_fwd import _fwd_linear, _fwd_mlp2

@dataclass(frozen=True)
class Shape:
    depth: int             # 1 (linear) or 2
    d_in: int
    d_out: int
    hidden: int            # depth 2: E * d; depth 1: d_out
    chunk: int
    dtype: str             # q, k, v as given: fp32 | bf16 | fp16
    norm: bool = False     # the normalised memory k + w LN(g(k)) + b (ln_weight, ln_bias)

    @property
    def precision(self) -> str:
        """tl.dot's input_precision: IEEE fp32 from fp32 inputs, TF32 tensor cores from 16-bit ones
        (bf16 operands failed the bf16 value test: 2% error in a depth-2 state vs its 1%)."""
        return "ieee" if self.dtype == "fp32" else "tf32"


@dataclass(frozen=True)
class Tiles:
    block_j: int           # hidden (depth 2) / output-column (depth 1) tile
    num_warps: int
    num_stages: int
    precision: str | None = None   # tl.dot's input_precision where not the shape's ("ieee": CUDA cores)

    def __str__(self) -> str:
        extra = f" {self.precision}" if self.precision else ""
        return f"BLOCK_J={self.block_j} warps={self.num_warps} stages={self.num_stages}{extra}"


def p2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))   # tl.dot wants every dim >= 16


def kernel(shape: Shape, kind: str):
    """kind: "fwd" | "bwd"."""
    if (shape.depth, kind) == (1, "bwd") and shape.norm:
        return _bwd_linear_norm
    return {(1, "fwd"): _fwd_linear, (2, "fwd"): _fwd_mlp2,
            (1, "bwd"): _bwd_linear, (2, "bwd"): _bwd_mlp2}[shape.depth, kind]


KINDS = ("fwd", "bwd")


def candidates(shape: Shape, kind: str) -> list[Tiles]:
    """Tilings in order of preference: wide tiles first (fewer passes over the chunk), then
    fewer pipeline stages (each stage buffers the next weight tiles in shared memory). The
    normalised depth-1 forward has one width: its LN needs every output column in one
    program; its backward tiles the state's input rows instead (BLOCK_J is then BLOCK_I).
    16-bit inputs try their TF32 tilings first, then the same on CUDA cores in IEEE fp32:
    TF32's tensor-core operands take more shared memory (the d 128 backward fits no TF32
    tiling on sm_90: 270,336 B at its smallest, 229,376 B in IEEE)."""
    if (shape.depth, kind) == (1, "fwd") and shape.norm:
        width = p2(shape.d_out)
        tiles = [Tiles(width, 4 if width <= 64 else 8, stages) for stages in (2, 1)]
    else:
        widest = min(64, p2(shape.hidden))
        warps = 8 if shape.depth == 2 or shape.norm else 4
        tiles = [Tiles(bj, warps, stages) for bj in (64, 32, 16) if bj <= widest for stages in (2, 1)]
    if shape.precision == "ieee":
        return tiles
    return tiles + [replace(t, precision="ieee") for t in tiles]


def default_tiles(shape: Shape, kind: str) -> Tiles:
    """Where no target is known (the interpreter): the first candidate."""
    return candidates(shape, kind)[0]


def constexprs(shape: Shape, kind: str, tiles: Tiles, write_y: bool = True) -> dict:
    blocks = dict(BLOCK_C=p2(shape.chunk))
    if kernel(shape, kind) is _bwd_linear_norm:
        return dict(C=shape.chunk, D=shape.d_in, **blocks, BLOCK_D=p2(shape.d_in), BLOCK_I=tiles.block_j,
                    PRECISION=tiles.precision or shape.precision)
    if shape.depth == 1:
        dims = dict(C=shape.chunk, D_IN=shape.d_in, D_OUT=shape.d_out)
        blocks.update(BLOCK_IN=p2(shape.d_in), BLOCK_OUT=tiles.block_j)
    else:
        dims = dict(C=shape.chunk, D=shape.d_in, HID=shape.hidden)
        blocks.update(BLOCK_D=p2(shape.d_in), BLOCK_J=tiles.block_j)
    extra = dict(WRITE_Y=write_y) if kind == "fwd" else {}
    if (shape.depth, kind) != (1, "bwd"):      # the plain _bwd_linear has no NORM variant
        extra["NORM"] = shape.norm
    return dict(**dims, **blocks, **extra, PRECISION=tiles.precision or shape.precision)


def pointer_dtypes(shape: Shape) -> dict:
    """q, k, v come in the caller's dtype; everything else (state, dy, gates) is fp32."""
    return {name: shape.dtype for name in ("q_ptr", "k_ptr", "v_ptr")}


@dataclass(frozen=True)
class Choice:
    name: str                          # kernel name, "+recompute" for the forward without reads
    tiles: Tiles | None                # None: nothing fits, the dispatcher falls back
    shared: int | None                 # bytes per block of the chosen tiles (or the smallest tried)
    resources: aot.Resources | None = None   # from the full compile (compile=True)
    reason: str | None = None          # why nothing fits / compiles

    @property
    def ok(self) -> bool:
        return self.reason is None


def choose(shape: Shape, kind: str, arch: int, write_y: bool = True, compile: bool = False) -> Choice:
    """The first candidate tiling that fits sm_<arch>'s shared memory (and, with compile=True,
    builds to a cubin through ptxas)."""
    fn = kernel(shape, kind)
    name = fn.__name__ + ("" if write_y else "+recompute")
    limit, smallest = aot.smem_limit(arch), None
    for tiles in candidates(shape, kind):
        args = (fn, arch, constexprs(shape, kind, tiles, write_y), pointer_dtypes(shape), tiles.num_warps,
                tiles.num_stages)
        try:
            shared = aot.shared_memory(*args)
        except aot.CompilationFailed as e:
            return Choice(name, None, None, reason=str(e))
        smallest = shared if smallest is None else min(smallest, shared)
        if shared > limit:
            continue
        if not compile:
            return Choice(name, tiles, shared)
        try:
            res = aot.compiled(*args)
        except aot.CompilationFailed as e:
            return Choice(name, tiles, shared, reason=str(e))
        return Choice(name, tiles, res.shared, res)
    return Choice(name, None, smallest,
                  reason=f"{name} needs {smallest:,} B of shared memory at its smallest tiling, "
                         f"sm_{arch} has {limit:,} B per block")


def plan(shape: Shape, arch: int, recompute: bool = False, compile: bool = False) -> list[Choice]:
    """Every kernel impl="triton" launches for this shape on sm_<arch>."""
    out = [choose(shape, "fwd", arch, True, compile)]
    if recompute:
        out.append(choose(shape, "fwd", arch, False, compile))
    return out + [choose(shape, "bwd", arch, True, compile)]
