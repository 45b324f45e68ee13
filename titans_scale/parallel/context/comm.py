"""The collectives context parallelism uses, differentiable and byte-counted.

``CPComm(group)`` wraps one context-parallel process group (megatron's
``parallel_state.get_context_parallel_group()``, or any torch.distributed group). Every
transfer goes through it, so ``comm.stats`` holds the bytes this rank sent, per
(scope, phase, op), for the benchmark and the tests.

Byte convention ("bytes this rank puts on the wire" under the textbook algorithm; what a
rank receives is symmetric over the group):

    p2p send            n                      (the tensor's bytes)
    all_gather          n * (P - 1)            (this rank's piece to every other rank)
    reduce_scatter      N * (P - 1) / P        (N = the full input; every slice but its own)
    all_to_all          sum of the splits addressed to other ranks
    broadcast           n * (P - 1) on the source, 0 elsewhere
    all_reduce          2 n (P - 1) / P        (ring reduce-scatter + all-gather)

The autograd Functions put the adjoint collective in backward (all_gather <-> reduce_scatter,
all_to_all <-> all_to_all with the splits swapped, broadcast <-> sum to the source, a send to
the next rank <-> a send of the gradient to the previous rank), counted under phase "bwd".
Point-to-point messages carry a tag drawn from a counter that advances identically on every
rank, so messages cannot be mismatched even when ranks post them in a different order.

Ordering. Collectives in backward must run in the same order on every rank, but autograd
orders nodes by readiness, which differs between ranks (rank 0 never reads the maps of
earlier ranks in state passing, so that all-gather's output does not even reach its loss).
So every differentiable transfer also takes and returns a zero "token": transfer k consumes
the token transfer k-1 produced, which chains their backward nodes into exactly the reverse
forward order on every rank. A unit of CP work (one mixer, one cp_memory_scan) opens the
chain with a token anchored to its input (``begin``) and ties the last token to its output
(``end``), so its transfers all run in backward after its output's gradient is known and
before its input's gradient is complete: units are ordered too.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.autograd import Function

from titans_scale.device import collective_device

from .shard import CPConfigError

_TAG_SPACE = 1 << 24


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CPComm:
    """One context-parallel group: its size, this rank's place in it, counted transfers."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_initialized():
            raise CPConfigError("context parallelism needs torch.distributed initialised first: call "
                                "titans_scale.parallel.state.init_parallel(cp=...) or launch with torchrun")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device = collective_device(group)   # every tensor this module makes for a transfer
        self.stats: dict[tuple[str, str, str], int] = defaultdict(int)
        self._scope = "cp"
        self._tag = 0
        self._token: torch.Tensor | None = None
        self._depth = 0
        self.alone = False         # inside alone_(): the CP modules run as on one device

    @contextmanager
    def alone_(self):
        """The CP modules inside run as on one device, with no transfer: for documents that lie
        whole inside this rank's shard of packed rows (documents.py)."""
        old, self.alone = self.alone, True
        try:
            yield
        finally:
            self.alone = old

    # -- bookkeeping ----------------------------------------------------------------------
    @contextmanager
    def scope(self, name: str):
        """Attribute the transfers inside to `name` (e.g. "memory", "halo")."""
        old, self._scope = self._scope, name
        try:
            yield
        finally:
            self._scope = old

    def reset_stats(self) -> None:
        self.stats.clear()

    def total_bytes(self, phase: str | None = None, scope: str | None = None) -> int:
        return sum(v for (s, p, _), v in self.stats.items()
                   if (phase is None or p == phase) and (scope is None or s == scope))

    def _count(self, op: str, phase: str, n: int, scope: str | None = None) -> None:
        self.stats[(scope or self._scope, phase, op)] += int(n)

    def zero(self) -> torch.Tensor:
        """A zero token (or a token's gradient) on the group's device."""
        return torch.zeros((), device=self.device)

    def tags(self, n: int) -> int:
        """Reserve n consecutive p2p tags; every rank of the group reserves the same ones."""
        base = self._tag
        self._tag = (self._tag + n) % _TAG_SPACE
        return base + 1        # tag 0 stays free for anything outside this module

    # -- backward ordering (see the module docstring) ------------------------------------
    def begin(self, *anchors: torch.Tensor) -> None:
        """Open a unit: the token chain starts from (a zero function of) its inputs."""
        self._depth += 1
        if self._depth > 1:
            return
        # one element of each input, times zero: ties the chain to the inputs without a copy
        zeros = [a[(0,) * a.dim()] * 0 for a in anchors if torch.is_tensor(a) and a.requires_grad and a.numel()]
        token = sum(zeros) if zeros else self.zero()
        if torch.is_grad_enabled() and not token.requires_grad:
            token = token.detach().requires_grad_(True)
        self._token = token

    def end(self, out: torch.Tensor) -> torch.Tensor:
        """Close a unit: `out` (returned unchanged) carries the last token into backward."""
        self._depth -= 1
        if self._depth > 0:
            return out
        token, self._token = self._token, None
        return _Tie.apply(out, token) if token is not None and token.requires_grad else out

    def abort(self) -> None:
        self._depth, self._token = 0, None

    def _chain(self, fn, *args):
        """Run transfer Function fn with the current token; keep the token it returns."""
        token = self._token if self._token is not None else self.zero()
        out, self._token = fn.apply(token, *args)
        return out

    # -- raw counted transfers (no autograd) ----------------------------------------------
    def isend(self, t: torch.Tensor, dst: int, tag: int, phase: str, scope: str | None = None):
        self._count("p2p", phase, nbytes(t), scope)
        return dist.isend(t.contiguous(), group=self.group, group_dst=dst, tag=tag)

    def irecv(self, t: torch.Tensor, src: int, tag: int):
        return dist.irecv(t, group=self.group, group_src=src, tag=tag)

    def raw_all_gather(self, t: torch.Tensor, phase: str, scope: str | None = None) -> torch.Tensor:
        """[*s] -> [P, *s]."""
        t = t.contiguous()
        out = t.new_empty(self.size * t.numel())       # gloo wants flat buffers
        self._count("all_gather", phase, nbytes(t) * (self.size - 1), scope)
        dist.all_gather_single(out, t.reshape(-1), group=self.group)
        return out.view(self.size, *t.shape)

    def raw_reduce_scatter(self, t: torch.Tensor, phase: str, scope: str | None = None) -> torch.Tensor:
        """[P, *s] -> [*s]: this rank's slice of the sum over ranks."""
        t = t.contiguous()
        out = t.new_empty(t[0].numel())
        self._count("reduce_scatter", phase, nbytes(t) * (self.size - 1) // self.size, scope)
        dist.reduce_scatter_single(out, t.reshape(-1), group=self.group)
        return out.view(t.shape[1:])

    def raw_all_to_all(self, flat: torch.Tensor, in_splits: list[int], out_splits: list[int],
                       phase: str, scope: str | None = None) -> torch.Tensor:
        out = flat.new_empty(sum(out_splits))
        sent = sum(n for j, n in enumerate(in_splits) if j != self.rank)
        self._count("all_to_all", phase, sent * flat.element_size(), scope)
        dist.all_to_all_single(out, flat.contiguous(), out_splits, in_splits, group=self.group)
        return out

    def raw_broadcast(self, t: torch.Tensor, src: int, phase: str, scope: str | None = None) -> torch.Tensor:
        t = t.detach().clone().contiguous()
        if self.rank == src:
            self._count("broadcast", phase, nbytes(t) * (self.size - 1), scope)
        dist.broadcast(t, group=self.group, group_src=src)
        return t

    def raw_all_reduce(self, t: torch.Tensor, phase: str, scope: str | None = None) -> torch.Tensor:
        t = t.detach().clone().contiguous()
        self._count("all_reduce", phase, 2 * nbytes(t) * (self.size - 1) // self.size, scope)
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather_ints(self, value: int) -> list[int]:
        """One int from every rank (shard lengths); counted, not differentiable."""
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        return [int(v) for v in self.raw_all_gather(mine, "fwd")[:, 0]]

    # -- differentiable collectives -------------------------------------------------------
    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return self._chain(_AllGather, t, self, self._scope)

    def all_to_all(self, flat: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> torch.Tensor:
        return self._chain(_AllToAll, flat, self, list(in_splits), list(out_splits), self._scope)

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        return self._chain(_Broadcast, t, self, src, self._scope)

    def broadcast_all(self, ts: list[torch.Tensor], src: int) -> list[torch.Tensor]:
        """broadcast of several tensors of one dtype (the same shapes on every rank) as one message."""
        flat = self.broadcast(torch.cat([t.reshape(-1) for t in ts]), src)
        return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in ts]), ts)]

    def shift(self, send: torch.Tensor, recv_shape: tuple[int, ...]) -> torch.Tensor:
        """Send `send` to rank+1, receive a `recv_shape` tensor from rank-1 (rank 0 gets the
        empty tensor it asks for). Every rank of the group must call it at the same point;
        the sizes must agree (rank r+1's recv_shape is rank r's send shape)."""
        return self._chain(_Shift, send, self, tuple(recv_shape), self.tags(1), self._scope)


class _Tie(Function):
    """out unchanged; backward also hands the token a (zero) gradient, so the chain runs."""

    @staticmethod
    def forward(ctx, out, token):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(())


class _AllGather(Function):
    @staticmethod
    def forward(ctx, token, t, comm: CPComm, scope):
        ctx.comm, ctx.scope = comm, scope
        return comm.raw_all_gather(t, "fwd", scope), token.new_zeros(())

    @staticmethod
    def backward(ctx, grad, _):
        # every rank used every piece: this rank's piece gets the sum of all ranks' gradients
        return ctx.comm.zero(), ctx.comm.raw_reduce_scatter(grad.contiguous(), "bwd", ctx.scope), None, None


class _AllToAll(Function):
    @staticmethod
    def forward(ctx, token, flat, comm: CPComm, in_splits, out_splits, scope):
        ctx.comm, ctx.splits, ctx.scope = comm, (in_splits, out_splits), scope
        return comm.raw_all_to_all(flat, in_splits, out_splits, "fwd", scope), token.new_zeros(())

    @staticmethod
    def backward(ctx, grad, _):
        in_splits, out_splits = ctx.splits
        g = ctx.comm.raw_all_to_all(grad.contiguous(), out_splits, in_splits, "bwd", ctx.scope)
        return ctx.comm.zero(), g, None, None, None, None


class _Broadcast(Function):
    @staticmethod
    def forward(ctx, token, t, comm: CPComm, src, scope):
        ctx.comm, ctx.src, ctx.scope = comm, src, scope
        return comm.raw_broadcast(t, src, "fwd", scope), token.new_zeros(())

    @staticmethod
    def backward(ctx, grad, _):
        # the source's input fed every rank's copy: it gets the sum; other inputs were unused
        grad = grad.contiguous()
        total = ctx.comm.raw_all_reduce(grad, "bwd", ctx.scope)
        return ctx.comm.zero(), (total if ctx.comm.rank == ctx.src else torch.zeros_like(grad)), None, None, None


class _Shift(Function):
    @staticmethod
    def forward(ctx, token, send, comm: CPComm, recv_shape, tag, scope):
        ctx.comm, ctx.tag, ctx.scope, ctx.send_shape = comm, tag, scope, send.shape
        ctx.has_next = comm.rank < comm.size - 1 and send.numel() > 0
        recv = send.new_zeros(recv_shape)
        ctx.has_prev = comm.rank > 0 and recv.numel() > 0
        works = []
        if ctx.has_next:
            works.append(comm.isend(send.detach(), comm.rank + 1, tag, "fwd", scope))
        if ctx.has_prev:
            works.append(comm.irecv(recv, comm.rank - 1, tag))
        for w in works:
            w.wait()
        return recv, token.new_zeros(())

    @staticmethod
    def backward(ctx, grad, _):
        comm = ctx.comm
        grad = grad.contiguous()
        grad_send = grad.new_zeros(ctx.send_shape)
        works = []
        if ctx.has_prev:
            works.append(comm.isend(grad.contiguous(), comm.rank - 1, ctx.tag, "bwd", ctx.scope))
        if ctx.has_next:
            works.append(comm.irecv(grad_send, comm.rank + 1, ctx.tag))
        for w in works:
            w.wait()
        return ctx.comm.zero(), grad_send, None, None, None, None
