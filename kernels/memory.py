"""impl="triton": the memory scan on the fused chunk kernels, differentiable end to end.

Importing this module registers the impl with titans_scale.ops.memory. The call layout
(PyTorch chunk_step for partial chunks at either end, one autograd Function over the full
chunks in between, coefficient gradients mapped back to the gates, recompute groups) is
ops/scan_function.py, shared with impl="fused"; this module supplies its per-chunk loops
as the forward kernel (kernels/memory_fwd.py) and the backward kernel
(kernels/memory_bwd.py), one program per (batch, head).

Precision: state and accumulation are fp32; inputs may be fp32, bf16 or fp16 (cast to
fp32 on load). With fp32 inputs the kernels' dots run in IEEE fp32; with 16-bit inputs in
TF32 on tensor cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import triton

from titans_scale.ops.memory import register_impl
from titans_scale.ops.scan_function import ScanConfig, scan_with_backend
from titans_scale.ops.state import MemoryState

from .memory_bwd import _bwd_linear, _bwd_mlp2
from .memory_fwd import _fwd_linear, _fwd_mlp2


def _interpreted(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(fn, InterpretedFunction)


# Fixed when the kernels were defined. Triton's own @jit helpers (tl.sum, ...) are defined
# when triton is imported: if TRITON_INTERPRET=1 came later, ours are interpreted but those
# are not, and launching fails deep inside triton, so it is reported as a usage error.
INTERPRETED = _interpreted(_fwd_linear)
INTERPRETER_BROKEN = INTERPRETED and not _interpreted(triton.language.standard.sum)
POISON_OUTPUTS = False   # tests: fill kernel outputs with NaN first, so unwritten elements show


def _p2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))   # tl.dot wants every dim >= 16


@dataclass(frozen=True)
class KernelConfig(ScanConfig):
    precision: str         # tl.dot input_precision
    block_j: int           # hidden (depth 2) / output-column (depth 1) tile

    @property
    def blocks(self) -> dict:
        return dict(BLOCK_C=_p2(self.chunk_size), **(
            dict(BLOCK_IN=_p2(self.d_in), BLOCK_OUT=self.block_j) if self.depth == 1
            else dict(BLOCK_D=_p2(self.d_in), BLOCK_J=self.block_j)))

    @property
    def dims(self) -> dict:
        if self.depth == 1:
            return dict(C=self.chunk_size, D_IN=self.d_in, D_OUT=self.d_out)
        return dict(C=self.chunk_size, D=self.d_in, HID=self.hidden)


def _warps(cfg: KernelConfig) -> int:
    return 4 if cfg.depth == 1 else 8


class TritonBackend:
    """The ScanBackend of ops/scan_function.py on the kernels (q, k, v may be 16-bit)."""

    @staticmethod
    def new(shape, device, dtype=torch.float32) -> torch.Tensor:
        if POISON_OUTPUTS:
            return torch.full(shape, float("nan"), device=device, dtype=dtype)
        return torch.empty(shape, device=device, dtype=dtype)

    @staticmethod
    def forward(cfg, q, k, v, coefs, ws, ss, saved_w, saved_s, y=None, tok_chunk0=0):
        cs, cw, P, A, Q = coefs
        BH, n = P.shape
        args = dict(n_chunks=n, tok_chunk0=tok_chunk0, n_tok_chunks=q.shape[1] // cfg.chunk_size,
                    save_stride=cfg.save_stride, n_slots=saved_w[0].shape[1], WRITE_Y=y is not None,
                    PRECISION=cfg.precision, num_warps=_warps(cfg), **cfg.dims, **cfg.blocks)
        y_arg = y if y is not None else q   # never written when WRITE_Y is False
        if cfg.depth == 1:
            grid = (BH, triton.cdiv(cfg.d_out, cfg.block_j))
            _fwd_linear[grid](q, k, v, cs, cw, P, A, Q, y_arg, ws[0], ss[0], saved_w[0], saved_s[0], **args)
        else:
            _fwd_mlp2[(BH,)](q, k, v, cs, cw, P, A, Q, y_arg, *ws, *ss, *saved_w, *saved_s, **args)

    @staticmethod
    def backward(cfg, q, k, v, dy, coefs, states_w, states_s, slot0, dws, dss, dq, dk, dv, tok_chunk0):
        cs, cw, P, A, Q = coefs
        BH, n = P.shape
        dcoefs = [TritonBackend.new(t.shape, t.device) for t in coefs]
        args = dict(n_chunks=n, tok_chunk0=tok_chunk0, n_tok_chunks=q.shape[1] // cfg.chunk_size,
                    slot0=slot0, n_slots=states_w[0].shape[1], PRECISION=cfg.precision,
                    num_warps=_warps(cfg), **cfg.dims, **cfg.blocks)
        kernel = _bwd_linear if cfg.depth == 1 else _bwd_mlp2
        kernel[(BH,)](q, k, v, dy, cs, cw, P, A, Q, *states_w, *states_s, *dws, *dss,
                      dq, dk, dv, *dcoefs, **args)
        return dcoefs

def unsupported(q: torch.Tensor, state: MemoryState) -> str | None:
    """Why impl='triton' cannot run these inputs (None when it can)."""
    if INTERPRETER_BROKEN:
        return ("impl='triton' under TRITON_INTERPRET=1 needs the variable set before triton is first "
                "imported (something imported triton earlier); export it before starting Python")
    if not (q.is_cuda or INTERPRETED):
        return ("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is first "
                f"imported to run on the CPU (got {q.device} tensors); use impl='chunked' on the CPU")
    if state.depth > 2:
        return f"impl='triton' has kernels for memory depth 1 and 2, got depth {state.depth}; use impl='chunked'"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"impl='triton' computes in fp32 from fp32/bf16/fp16 inputs, got {q.dtype}; use impl='chunked'"
    return None


def kernel_config(q, v, state: MemoryState, recompute_group) -> KernelConfig:
    base = ScanConfig.of(q, v, state, recompute_group)
    # untuned (no GPU was at hand): depth 2 keeps ~20 [C, tile] fp32 tiles live in backward
    tile = 32 if (INTERPRETED or state.depth == 2) else 64
    return KernelConfig(**asdict(base), precision="ieee" if q.dtype == torch.float32 else "tf32",
                        block_j=min(tile, _p2(base.hidden)))


def triton_scan(q, k, v, theta, eta, alpha, state: MemoryState, recompute_group: int | None = None):
    """The registered impl: PyTorch for partial chunks at either end, kernels in between."""
    cfg = kernel_config(q, v, state, recompute_group)
    return scan_with_backend(TritonBackend, cfg, q, k, v, theta, eta, alpha, state)


register_impl("triton", triton_scan, native_dtype=True, unsupported=unsupported)
