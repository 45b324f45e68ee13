"""The reference: docs/design.md section 3 applied one token at a time.

Slow and plain on purpose. Tests run it in float64 and compare every fast path with it.
The per-token gradient is taken with autograd here (create_graph=True, so the outer loss
still differentiates through it), independently of the hand-written gradients the fast
paths use.
"""

from __future__ import annotations

import torch

from .mlp import MemoryNorm, mlp_forward
from .state import MemoryState


def _inner_grad(weights: list[torch.Tensor], k_t: torch.Tensor, v_t: torch.Tensor,
                norm: MemoryNorm | None) -> list[torch.Tensor]:
    """grad_W of l_t = 1/2 ||f_W(k_t) - v_t||^2, per (batch, head)."""
    outer = torch.is_grad_enabled()      # keep the graph only if the outer loss needs it
    with torch.enable_grad():
        ws = [w if w.requires_grad else w.detach().requires_grad_(True) for w in weights]
        pred = mlp_forward(ws, k_t.unsqueeze(2), norm)
        loss = 0.5 * (pred - v_t.unsqueeze(2)).pow(2).sum()   # sum over (b, h) keeps slices separate
        return list(torch.autograd.grad(loss, ws, create_graph=outer))


def naive_scan(q, k, v, theta, eta, alpha, state: MemoryState, norm: MemoryNorm | None = None):
    C = state.chunk_size
    w_c, w, s, pos = list(state.chunk_start), list(state.weights), list(state.momentum), state.position
    ys = []
    for t in range(q.shape[2]):
        ys.append(mlp_forward(w_c, q[:, :, t:t + 1], norm))                # y_t = f_{W_c}(q_t)
        u = _inner_grad(w_c, k[:, :, t], v[:, :, t], norm)                  # u_t = grad l_t(W_c)
        th, et, al = (g[:, :, t, None, None] for g in (theta, eta, alpha))
        s = [et * s_l - th * u_l for s_l, u_l in zip(s, u)]                 # S_t = eta S - theta u
        w = [(1 - al) * w_l + s_l for w_l, s_l in zip(w, s)]                # W_t = (1-alpha) W + S
        pos += 1
        if pos == C:                                                        # chunk ends: W_{c+1}
            w_c, pos = list(w), 0
    y = torch.cat(ys, dim=2) if ys else q.new_zeros(q.shape[:3] + (v.shape[-1],))
    return y, MemoryState(w_c, w, s, pos, C)
