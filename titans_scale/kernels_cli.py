"""`titans-scale kernels --arch sm_90 [--config X] [section.field=value ...]`

Compiles, ahead of time on any machine (no GPU needed), every Triton kernel impl="triton"
would launch for the config's memory layers, forward and backward, and prints per kernel
the tiles chosen for the target, shared memory, registers, local-memory stack (spills) and
the dispatcher's decision. Exit status 1 if a kernel the dispatcher would launch does not
build; a shape no tiling fits is reported as the fallback to impl="fused" it gets.
"""

from __future__ import annotations


def add_kernels_parser(sub) -> None:
    k = sub.add_parser("kernels", help="compile the memory kernels for a GPU target and report their resources")
    k.add_argument("--arch", default="sm_90", help="sm_80 (A100), sm_90 (H100/H200), sm_100 (B200)")
    k.add_argument("--config", help="run config TOML (default: the built-in defaults)")
    k.add_argument("overrides", nargs="*", help="section.field=value, as for train")
    k.set_defaults(fn=_cmd_kernels)


def memory_shape(cfg):
    """The shape every memory layer of the run hands the memory op (None: no memory layer)."""
    from titans_scale.kernels.plan import Shape
    m = cfg.model
    if not m.has_memory:
        return None
    d = m.mem_head_dim
    hidden = m.mem_expansion * d if m.mem_depth >= 2 else d
    dtype = "fp32" if cfg.train.precision == "fp32" else "bf16"   # bf16 and fp8 runs autocast to bf16
    return Shape(m.mem_depth, d, d, hidden, m.chunk_size, dtype, m.mem_norm)


def report(shape, arch: int, recompute: bool, programs: int) -> tuple[list[str], bool]:
    """The table's lines, and whether every kernel the dispatcher would launch builds."""
    from titans_scale.kernels import aot, plan
    lines = [f"sm_{arch}: {aot.smem_limit(arch):,} B shared memory per block; memory depth {shape.depth}, "
             f"d {shape.d_in}, hidden {shape.hidden}, chunk {shape.chunk}, {shape.dtype} inputs, "
             f"{programs} programs (batch x memory heads)"]
    if shape.depth > 2:
        return lines + ["no kernels for depth > 2: the dispatcher runs impl='chunked'"], True
    choices = plan.plan(shape, arch, recompute=recompute, compile=True)
    fallback = any(c.tiles is None for c in choices)
    lines.append(f"{'kernel':<22}{'tiles':<38}{'shared B':>10}{'regs':>6}{'stack B':>9}  decision")
    for c in choices:
        res = c.resources
        tiles = f"{c.tiles}" if c.tiles else "-"
        shared = f"{c.shared:,}" if c.shared is not None else "-"
        regs, stack = (str(res.regs), str(res.stack)) if res else ("-", "-")
        decision = ("fused (nothing fits)" if fallback else "launch") if c.ok else f"FAILS: {c.reason}"
        lines.append(f"{c.name:<22}{tiles:<38}{shared:>10}{regs:>6}{stack:>9}  {decision}")
    if fallback:
        lines.append("impl='auto' runs 'fused' for this shape: " + "; ".join(c.reason for c in choices if c.reason))
    builds = all(c.ok or c.tiles is None for c in choices)
    return lines, builds


def _cmd_kernels(args) -> int:
    from titans_scale.config import load_run_config
    from titans_scale.kernels.aot import parse_arch
    cfg = load_run_config(args.config, args.overrides)
    shape = memory_shape(cfg)
    if shape is None:
        print("no memory layers in this config: no kernels to build")
        return 0
    lines, builds = report(shape, parse_arch(args.arch), cfg.model.recompute_group > 1,
                           cfg.data.batch_size * cfg.model.resolved_mem_heads)
    print("\n".join(lines))
    return 0 if builds else 1
