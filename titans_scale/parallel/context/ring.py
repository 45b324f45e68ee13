"""ring: hand the running state from rank r to rank r+1, pipelined over micro-batches.

Any streaming computation (inputs, state) -> (outputs, state) can be spread over the CP
group this way: rank 0 starts from the sequence's start state, every other rank waits for
the state its predecessor ended with, runs its shard from it and passes its end state on.
It is exact for any memory depth and for MAC (whose segment attention reads the memory
the previous segment wrote, so no rank can start before its predecessor's state is known).
To keep ranks busy the work is cut into m micro-batches along dim 0 (batch, or batch x
memory heads for the memory op, which are independent): at step t rank r runs micro-batch
t - r, so after P - 1 steps of fill all ranks compute at once; m + P - 1 steps in all.

``ring_apply`` is one autograd Function with an explicit schedule in both directions:
forward keeps each micro-batch's graph; backward walks the pipeline in reverse (rank P-1
first), takes each micro-batch's gradients with torch.autograd.grad given the gradient of
its end state received from rank r+1, and sends the gradient of its start state to rank
r-1. Parameters the step function uses are passed in, so their gradients come back
through the Function (this also works under torch.autograd.grad and gradient hooks).

Bytes per rank and layer: the state once per micro-batch (a small shape header first), so
B H 3 |W| s for the memory op, forward and backward, independent of the sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils._pytree as pytree
from torch.autograd import Function

from titans_scale.ops.memory import memory_scan
from titans_scale.ops.state import MemoryState, state_dtype

from .comm import CPComm
from .shard import ShardInfo

StepFn = Callable[[list[torch.Tensor], list[torch.Tensor]], tuple[list[torch.Tensor], list[torch.Tensor]]]


@dataclass
class _Run:
    fn: StepFn
    comm: CPComm
    n_in: int
    n_state: int
    micro_batches: int
    scope: str


def _split(ts, m):
    return [t.tensor_split(m, dim=0) for t in ts]


class _Ring(Function):
    @staticmethod
    def forward(ctx, run: _Run, token, *tensors):
        comm, P, r = run.comm, run.comm.size, run.comm.rank
        ins, st0 = tensors[:run.n_in], tensors[run.n_in:run.n_in + run.n_state]
        # backward needs the inputs' shapes and dtypes only (zero-stride views hold no data)
        ctx.saved_like = [[torch.empty((), dtype=t.dtype, device=t.device).expand(t.shape) for t in ts]
                          for ts in (ins, st0)]
        m = run.micro_batches
        need = ctx.needs_input_grad[2:]
        any_grad = any(need)
        ins_mb, st0_mb = _split(ins, m), _split(st0, m)
        ndims = [t.dim() for t in st0]
        tags = comm.tags(m * (run.n_state + 1))
        records, received, pending = [None] * m, {}, []

        def recv_state(j):
            head = torch.empty(sum(ndims), dtype=torch.int64, device=comm.device)
            comm.irecv(head, r - 1, tags + j * (run.n_state + 1)).wait()
            shapes, i = [], 0
            for nd in ndims:
                shapes.append(head[i:i + nd].tolist())
                i += nd
            out = [t.new_empty(s) for t, s in zip(st0, shapes)]
            for i, t in enumerate(out):
                comm.irecv(t, r - 1, tags + j * (run.n_state + 1) + 1 + i).wait()
            received[j] = out

        for t in range(m + P - 1):
            j = t - r
            if 0 <= j < m:
                start = [s[j] for s in st0_mb] if r == 0 else received.pop(j)
                with torch.enable_grad():
                    xs = [x[j].detach().requires_grad_(g) for x, g in zip(ins_mb, need)]
                    sts = [s.detach().requires_grad_(any_grad and s.is_floating_point()) for s in start]
                    outs, st_out = run.fn(xs, sts)
                records[j] = (xs, sts, list(outs), list(st_out))
                if r < P - 1:
                    head = torch.tensor([n for s in st_out for n in s.shape], dtype=torch.int64, device=comm.device)
                    base = tags + j * (run.n_state + 1)
                    pending.append((comm.isend(head, r + 1, base, "fwd", run.scope), head))
                    for i, s in enumerate(st_out):
                        s = s.detach().contiguous()
                        pending.append((comm.isend(s, r + 1, base + 1 + i, "fwd", run.scope), s))
            if r > 0 and 0 <= t + 1 - r < m:
                recv_state(t + 1 - r)
        for w, _ in pending:
            w.wait()
        ctx.run, ctx.records, ctx.params = run, records, tensors[run.n_in + run.n_state:]
        ctx.n_out = len(records[0][2])
        outs = [torch.cat([rec[2][i] for rec in records]).detach() for i in range(ctx.n_out)]
        ends = [torch.cat([rec[3][i] for rec in records]).detach() for i in range(run.n_state)]
        return (*outs, *ends, token.new_zeros(()))

    @staticmethod
    def backward(ctx, *grads):
        grads = grads[:-1]                               # the last one is the order token's
        run, records = ctx.run, ctx.records
        comm, P, r, m = run.comm, run.comm.size, run.comm.rank, run.micro_batches
        need = ctx.needs_input_grad[2:]
        g_out = [None if g is None else g.tensor_split(m, dim=0) for g in grads[:ctx.n_out]]
        g_end = [None if g is None else g.tensor_split(m, dim=0) for g in grads[ctx.n_out:]]
        params = [p for p in ctx.params if p.requires_grad]
        g_in = [[None] * m for _ in range(run.n_in)]
        g_st0 = [[None] * m for _ in range(run.n_state)]
        g_par = [None] * len(params)
        tags = comm.tags(m * run.n_state)
        received, pending = {}, []

        def recv_grads(j):
            out = [s.new_empty(s.shape) for s in records[j][3]]
            for i, t in enumerate(out):
                comm.irecv(t, r + 1, tags + j * run.n_state + i).wait()
            received[j] = out

        for t in range(m + P - 1):
            j = t - (P - 1 - r)
            if 0 <= j < m:
                xs, sts, outs, st_out = records[j]
                from_next = received.pop(j) if r < P - 1 else [None] * run.n_state
                ys, gs = [], []
                for i, o in enumerate(outs):
                    if o.requires_grad:
                        ys.append(o)
                        gs.append(torch.zeros_like(o) if g_out[i] is None else g_out[i][j])
                for i, o in enumerate(st_out):
                    g = None if g_end[i] is None else g_end[i][j]
                    if from_next[i] is not None:
                        g = from_next[i] if g is None else g + from_next[i]
                    if o.requires_grad:
                        ys.append(o)
                        gs.append(torch.zeros_like(o) if g is None else g)
                targets = [x for x in xs if x.requires_grad] + [s for s in sts if s.requires_grad] + params
                res = list(torch.autograd.grad(ys, targets, gs, allow_unused=True)) if ys and targets else []
                res.reverse()
                for i, x in enumerate(xs):
                    if x.requires_grad:
                        g_in[i][j] = res.pop()
                g_start = [res.pop() if s.requires_grad else None for s in sts]
                for i, p in enumerate(params):
                    g = res.pop()
                    if g is not None:
                        g_par[i] = g if g_par[i] is None else g_par[i] + g
                g_start = [torch.zeros_like(s) if g is None else g for s, g in zip(sts, g_start)]
                if r > 0:
                    for i, g in enumerate(g_start):
                        g = g.contiguous()
                        pending.append((comm.isend(g, r - 1, tags + j * run.n_state + i, "bwd", run.scope), g))
                else:
                    for i, g in enumerate(g_start):
                        g_st0[i][j] = g
                records[j] = None                        # free this micro-batch's graph
            if r < P - 1 and 0 <= t + 1 - (P - 1 - r) < m:
                recv_grads(t + 1 - (P - 1 - r))
        for w, _ in pending:
            w.wait()
        ctx.records = None

        def join(parts, like, needed):
            if not needed or all(p is None for p in parts):
                return None
            mbs = like.tensor_split(m, dim=0)
            return torch.cat([torch.zeros_like(mb) if p is None else p for p, mb in zip(parts, mbs)])

        n_in, n_st = run.n_in, run.n_state
        ins, st0 = ctx.saved_like
        out_in = [join(g_in[i], ins[i], need[i]) for i in range(n_in)]
        out_st = [join(g_st0[i], st0[i], need[n_in + i]) if r == 0 else None for i in range(n_st)]
        it = iter(g_par)
        out_par = [next(it) if p.requires_grad else None for p in ctx.params]
        return (None, comm.zero(), *out_in, *out_st, *out_par)


def ring_apply(fn: StepFn, inputs: list[torch.Tensor], state0: list[torch.Tensor], comm: CPComm,
               micro_batches: int, params: list[torch.Tensor] = (), scope: str | None = None):
    """Run fn over the CP group as a ring. inputs / state0: this rank's shard / the start
    state, micro-batched along dim 0 (state0 is only read on rank 0, but every rank passes
    one of the right structure: its dtypes and ranks describe what is received). fn must
    not change the number of state tensors or their dtypes. params: tensors fn reads that
    need gradients. Returns (outputs, end states): each rank's end state is that of its
    shard; rank P-1's is the sequence's final state."""
    m = max(1, min(int(micro_batches), inputs[0].shape[0]))
    run = _Run(fn, comm, len(inputs), len(state0), m, scope or comm._scope)
    token = comm._token if comm._token is not None else comm.zero()
    *res, comm._token = _Ring.apply(run, token, *inputs, *state0, *params)
    return list(res[:len(res) - len(state0)]), list(res[len(res) - len(state0):])


def ring_forward(forward, x: torch.Tensor, state0, pos0: int, comm: CPComm, micro_batches: int,
                 params: list[torch.Tensor] = ()):
    """A streaming forward(x, state, pos0) -> (out, state) over the CP group as a ring (a mixer
    run whole): rank r resumes from the state rank r-1 ended with. The state travels as its
    tensors (a torch pytree); its other fields (a memory's chunk position) are state0's and
    must not change. pos0: this rank's first position. Returns (out, this rank's end state)."""
    leaves, spec = pytree.tree_flatten(state0)

    def step(xs, sts):
        out, end = forward(xs[0], pytree.tree_unflatten(sts, spec), pos0)
        ends, end_spec = pytree.tree_flatten(end)
        if end_spec != spec:
            raise RuntimeError(f"ring_forward: the state's structure changed from {spec} to {end_spec}")
        return [out], ends

    (out,), ends = ring_apply(step, [x], leaves, comm, micro_batches, params)
    return out, pytree.tree_unflatten(ends, spec)


def ring_memory_scan(q, k, v, theta, eta, alpha, state: MemoryState, comm: CPComm, info: ShardInfo,
                     impl: str = "auto", recompute_group: int | None = None, micro_batches: int | None = None,
                     norm=None):
    """The memory op as a ring over the CP group (any depth). Arguments as a2a_memory_scan;
    micro-batches run over the B*H independent (sequence, head) pairs, 2P by default. A
    micro-batch's pairs are scanned as the heads of one sequence ([1, pairs, ...]), so the
    normalised memory's per-head ln_weight/ln_bias travel as one row per pair."""
    B, H, Lr, d = q.shape
    C, n, dt = state.chunk_size, state.depth, state_dtype(q)
    position = (state.position + info.offset()) % C
    flat = lambda t: t.reshape(B * H, 1, *t.shape[2:])  # noqa: E731
    pairs_as_heads = lambda t: t.transpose(0, 1)  # noqa: E731  [pairs, 1, ...] <-> [1, pairs, ...]

    def step(xs, sts):
        start = MemoryState(*(list(map(pairs_as_heads, sts[i:i + n])) for i in range(0, 3 * n, n)), position, C)
        ln = dict(zip(("ln_weight", "ln_bias"), xs[6:]))
        y, end = memory_scan(*map(pairs_as_heads, xs[:6]), start, C, impl, recompute_group=recompute_group, **ln)
        return [pairs_as_heads(y)], list(map(pairs_as_heads, end.tensors()))

    ins = [flat(t) for t in (q, k, v, theta, eta, alpha)]
    if norm is not None:                           # [H, d] -> one row per (sequence, head) pair
        ins += [p.to(dt).unsqueeze(0).expand(B, H, d).reshape(B * H, d) for p in norm]
    st0 = [flat(t.to(dt)) for t in state.tensors()]
    (y,), ends = ring_apply(step, ins, st0, comm, micro_batches or 2 * comm.size)
    # every rank gets the final state (it is rank P-1's end state): one broadcast, O(H |W|)
    final = [e.view(B, H, *e.shape[2:]) for e in comm.broadcast_all(ends, comm.size - 1)]
    end = MemoryState(final[:n], final[n:2 * n], final[2 * n:], (state.position + info.total) % C, C)
    return y.view(B, H, Lr, -1), end
