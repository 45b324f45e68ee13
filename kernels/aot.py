"""Compile a kernel ahead of time for a GPU that need not be here, and read what it needs.

    compiled(fn, arch=90, constexprs={...}, dtypes={"q_ptr": "bf16"}, num_warps=8, num_stages=1)
      -> Resources(shared=..., regs=..., stack=...) or raises CompilationFailed

Triton's own compiler and bundled ptxas build the cubin for GPUTarget("cuda", arch, 32); no GPU
or driver is involved, so a CPU machine checks what an A100 (80), H100/H200 (90) or B200 (100)
would be asked to run. Shared memory comes from the compiled metadata (the per-block dynamic
allocation the launch requests); registers and the local-memory stack (spills) from the cubin's
resource table (cuobjdump -res-usage), which is what the driver reports after loading it.
Results are cached per process; Triton's on-disk cache also skips repeated compiles.
"""

from __future__ import annotations

import functools
import re
import subprocess
import tempfile
from dataclasses import dataclass

# Shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes.
SMEM_LIMIT = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448, 100: 232_448,
              103: 232_448, 120: 101_376}
MAX_REGS = 255            # per thread; more spills to local memory (the stack below)
ARCH_NAMES = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90, "sm_100": 100, "sm_120": 120}


class CompilationFailed(RuntimeError):
    """The kernel does not compile for the target (the message says why)."""


@dataclass(frozen=True)
class Resources:
    shared: int            # bytes of shared memory per block
    regs: int              # registers per thread
    stack: int             # bytes of local memory per thread (register spills)


def parse_arch(name: str | int) -> int:
    """'sm_90', '90' or 90 -> 90."""
    if isinstance(name, int):
        return name
    if name in ARCH_NAMES:
        return ARCH_NAMES[name]
    digits = name.removeprefix("sm_").rstrip("a")
    if not digits.isdigit():
        raise ValueError(f"unknown GPU architecture {name!r}; use one of {', '.join(ARCH_NAMES)}")
    return int(digits)


def smem_limit(arch: int) -> int:
    return SMEM_LIMIT.get(arch, 101_376)


def _signature(fn, constexprs: dict, dtypes: dict) -> tuple[dict, dict]:
    """Pointers are fp32 unless dtypes says otherwise and 16-byte aligned (torch allocations
    are); other runtime arguments are i32."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtypes.get(name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
    return sig, attrs


def _resource_usage(cubin: bytes, name: str) -> tuple[int, int]:
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    block = out.split(f"Function {name}:", 1)[-1]
    regs, stack = re.search(r"REG:(\d+)", block), re.search(r"STACK:(\d+)", block)
    return int(regs.group(1)), int(stack.group(1))


def _source(fn, arch, constexprs, dtypes, num_warps, num_stages):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    sig, attrs = _signature(fn, dict(constexprs), dict(dtypes))
    target = GPUTarget("cuda", arch, 32)
    return ASTSource(fn, sig, dict(constexprs), attrs), target, make_backend(target)


def _failed(fn, arch, e: Exception) -> CompilationFailed:
    lines = str(e).strip().splitlines()
    return CompilationFailed(f"{fn.__name__} does not compile for sm_{arch}: {type(e).__name__}: "
                             f"{lines[-1] if lines else ''}")


def _allocation_passes(pm, arch: int, ptx_version: int) -> None:
    """The head of the NVIDIA backend's make_llir, up to shared-memory allocation. Triton's passes
    are private, so their signatures move between releases."""
    from triton._C.libtriton import nvidia, passes
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    try:
        passes.ttgpuir.add_allocate_warp_groups(pm, False)      # Triton >= 3.7: (pm, consan)
    except TypeError:
        passes.ttgpuir.add_allocate_warp_groups(pm)             # Triton 3.6 (torch 2.11's)
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, arch, ptx_version)


@functools.lru_cache(maxsize=None)
def _shared(fn, arch: int, constexprs: tuple, dtypes: tuple, num_warps: int, num_stages: int) -> int:
    """Triton's own pipeline up to its shared-memory allocation pass (the number the cubin
    is built with), skipping LLVM and ptxas: about 1 s instead of 10-80."""
    from triton._C.libtriton import ir
    from triton.backends.nvidia.compiler import get_ptx_version_from_options
    src, target, backend = _source(fn, arch, constexprs, dtypes, num_warps, num_stages)
    options = backend.parse_options(dict(num_warps=num_warps, num_stages=num_stages))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    try:
        mod = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                          context)
        metadata: dict = {}
        mod = stages["ttgir"](stages["ttir"](mod, metadata), metadata)
    except Exception as e:
        raise _failed(fn, arch, e) from e
    try:
        pm = ir.pass_manager(mod.context)
        _allocation_passes(pm, arch, get_ptx_version_from_options(options, arch))
        pm.run(mod, "titans_scale.aot.shared")
        return mod.get_int_attr("ttg.shared")
    except (TypeError, AttributeError, RuntimeError):
        # another Triton moved its passes: the full compile (slower, cached) reports the same number
        return _compile(fn, arch, constexprs, dtypes, num_warps, num_stages).shared


@functools.lru_cache(maxsize=None)
def _compile(fn, arch: int, constexprs: tuple, dtypes: tuple, num_warps: int, num_stages: int) -> Resources:
    import triton
    src, target, _ = _source(fn, arch, constexprs, dtypes, num_warps, num_stages)
    try:
        k = triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:   # CompilationError, PTXASError, MLIR pass failures: all mean "does not build"
        raise _failed(fn, arch, e) from e
    regs, stack = _resource_usage(k.asm["cubin"], k.metadata.name)
    return Resources(shared=k.metadata.shared, regs=regs, stack=stack)


def _check_jit(fn) -> None:
    from triton.runtime import JITFunction
    if not isinstance(fn, JITFunction):
        raise CompilationFailed("ahead-of-time compiling needs TRITON_INTERPRET unset when triton is imported")


def shared_memory(fn, arch: int, constexprs: dict, dtypes: dict, num_warps: int, num_stages: int) -> int:
    """Bytes of shared memory per block fn needs on sm_<arch> (no LLVM, no ptxas); cached."""
    _check_jit(fn)
    return _shared(fn, arch, tuple(sorted(constexprs.items())), tuple(sorted(dtypes.items())),
                   num_warps, num_stages)


def compiled(fn, arch: int, constexprs: dict, dtypes: dict, num_warps: int, num_stages: int) -> Resources:
    """Compile fn (a @triton.jit kernel, not an interpreted one) to a cubin for sm_<arch>; cached."""
    _check_jit(fn)
    return _compile(fn, arch, tuple(sorted(constexprs.items())), tuple(sorted(dtypes.items())),
                    num_warps, num_stages)
