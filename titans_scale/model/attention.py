"""Attention with persistent-memory prefix: sliding window, segment (MAC) and full causal.

Persistent tokens (docs/design.md section 4) are learned input-independent tokens whose keys and
values every query sees, whatever its window; they carry no position (no RoPE).
Head counts are read off the weight shapes, so tensor parallelism can shrink them from outside.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import rope


def _with_prefix(k, v, mask, pk, pv):
    """Prepend persistent keys/values (always visible) to k, v and the boolean mask."""
    if pk is None:
        return k, v, mask
    lead = k.shape[:-2]                     # pk, pv: [1, h, Np, dh]; k may carry block dims
    extra = (1,) * (k.dim() - pk.dim())
    pk = pk.reshape(*pk.shape[:2], *extra, *pk.shape[2:]).expand(*lead, *pk.shape[-2:])
    pv = pv.reshape(*pv.shape[:2], *extra, *pv.shape[2:]).expand(*lead, *pv.shape[-2:])
    ones = mask.new_ones(*mask.shape[:-1], pk.shape[-2])
    return torch.cat([pk, k], -2), torch.cat([pv, v], -2), torch.cat([ones, mask], -1)


def _blocked_attention(q, k, v, mask):
    """SDPA per block: q [B, h, n, S, dh], k and v [B, h, n, T, dh], mask [n, S, T] or, shared
    by every block, [S, T] (True = attend). Heads and blocks merge into one batch dim because on
    a CPU a 4-D call runs the fused (flash) kernel, which keeps no S x T probabilities for
    backward (a 5-D call runs the math path, slower). It keeps its float copy of the mask, so a
    shared [S, T] mask is passed as it is rather than expanded per block (68 MB per layer at
    16k tokens)."""
    B, h, n, S, dh = q.shape
    T = k.shape[-2]
    m = mask if mask.dim() == 2 else mask.expand(h, n, S, T).reshape(1, h * n, S, T)
    merge = lambda x: x.reshape(B, h * n, x.shape[-2], dh)  # noqa: E731
    return F.scaled_dot_product_attention(merge(q), merge(k), merge(v), attn_mask=m).view(B, h, n, S, dh)


def sliding_window_attention(q, k, v, window: int, pk=None, pv=None):
    """q: [B, h, Lq, dh] are the last Lq of k's Lk positions; query p sees keys (p - window, p].

    Blocked by `window`: each block of queries attends to its own and the previous block of
    keys only, so cost is O(L * window), not O(L^2).
    """
    B, h, Lq, dh = q.shape
    Lk, w = k.shape[2], window
    off = Lk - Lq                                   # k-frame index of the first query
    nb = -(-Lq // w)
    # Key frame padded so block b's keys are kp[off + b*w : off + b*w + 2w].
    right = off + (nb + 1) * w - (Lk + w)
    kp = F.pad(k, (0, 0, w, max(right, 0)))
    vp = F.pad(v, (0, 0, w, max(right, 0)))
    # [B, h, nb, 2w, dh]: blocks b-1 and b side by side. cat, not unfold: unfold's backward
    # scatter-adds overlapping windows and cost more than the attention itself on a CPU
    kb, vb = (torch.cat([x[:, :, :-1], x[:, :, 1:]], dim=3)
              for x in (t[:, :, off: off + (nb + 1) * w].reshape(B, h, nb + 1, w, dh) for t in (kp, vp)))
    qb = F.pad(q, (0, 0, 0, nb * w - Lq)).view(B, h, nb, w, dh)
    i = torch.arange(w, device=q.device)[:, None]
    j = torch.arange(2 * w, device=q.device)[None, :]
    diff = w + i - j                                 # query pos - key pos
    in_window = (diff >= 0) & (diff < w)
    key_pos = off + torch.arange(nb, device=q.device)[:, None] * w - w + j   # [nb, 2w] in k frame
    mask = in_window[None] & (key_pos >= 0)[:, None, :]                         # [nb, w, 2w]
    kb, vb, mask = _with_prefix(kb, vb, mask, pk, pv)
    # Only leading blocks reach left of the sequence (key_pos < 0; block 0 unless the keys carry
    # earlier context). Every block runs with the mask the others share, then the leading ones
    # again with their own: slicing the others out instead would copy their keys and values.
    lead = int((key_pos < 0).any(-1).sum())
    if lead == nb:
        out = _blocked_attention(qb, kb, vb, mask)
    else:
        out = _blocked_attention(qb, kb, vb, mask[lead])
        if lead:
            first = _blocked_attention(qb[:, :, :lead], kb[:, :, :lead], vb[:, :, :lead], mask[:lead])
            out = torch.cat([first, out[:, :, lead:]], dim=2)
    return out.reshape(B, h, nb * w, dh)[:, :, :Lq]


def causal_attention(q, k, v, pk=None, pv=None):
    """Full causal attention; q are the last Lq positions of k (bottom-right aligned)."""
    Lq, Lk = q.shape[2], k.shape[2]
    mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
    k, v, mask = _with_prefix(k, v, mask, pk, pv)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def segment_attention(q, k, v, segment: int, pk=None, pv=None, hk=None, hv=None):
    """Causal attention inside segments of `segment` tokens, counted from q's first token
    (q, k, v all [B, h, L, dh]; a partial last segment is allowed). With hk/hv (MAC), each
    query i also sees its segment's retrieved memory tokens h_j, j <= i (docs/design.md section 4)."""
    B, h, L, dh = q.shape
    full = (L // segment) * segment
    if 0 < full < L:                                 # full segments, then the partial one
        parts = [(0, full), (full, L)]
        sl = lambda t, a, b: None if t is None else t[:, :, a:b]  # noqa: E731
        return torch.cat([segment_attention(sl(q, a, b), sl(k, a, b), sl(v, a, b), segment, pk, pv,
                                            sl(hk, a, b), sl(hv, a, b)) for a, b in parts], dim=2)
    S = min(segment, L)
    n = L // S
    split = lambda t: t.reshape(B, h, n, S, dh)  # noqa: E731
    qs, ks, vs = split(q), split(k), split(v)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    mask = causal
    if hk is not None:
        ks, vs = torch.cat([split(hk), ks], -2), torch.cat([split(hv), vs], -2)
        mask = torch.cat([causal, causal], -1)
    ks, vs, mask = _with_prefix(ks, vs, mask, pk, pv)
    return _blocked_attention(qs, ks, vs, mask).reshape(B, h, L, dh)


class Attention(nn.Module):
    """Multi-head attention projections + persistent tokens; the pattern is chosen per call."""

    def __init__(self, d_model: int, n_heads: int, n_persistent: int, rope_base: float, init_std: float):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.rope_base = rope_base
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)   # output laid out [heads, 3, dh]
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.persistent = nn.Parameter(torch.randn(n_persistent, d_model) * init_std) if n_persistent else None

    def heads(self, x: torch.Tensor, positions: torch.Tensor | None):
        """x: [B, L, D] -> q, k, v [B, h, L, dh] with RoPE at the given absolute positions."""
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, -1, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if positions is not None:
            q, k = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
        return q, k, v

    def persistent_kv(self):
        if self.persistent is None:
            return None, None
        _, pk, pv = self.heads(self.persistent.unsqueeze(0), None)
        return pk, pv

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        B, h, L, dh = o.shape
        return self.out(o.transpose(1, 2).reshape(B, L, h * dh))

    def sliding(self, x: torch.Tensor, pos0: int, n_out: int, window: int) -> torch.Tensor:
        """Outputs for the last n_out tokens of x, whose first token sits at position pos0."""
        q, k, v = self.heads(x, torch.arange(pos0, pos0 + x.shape[1], device=x.device))
        o = sliding_window_attention(q[:, :, -n_out:], k, v, window, *self.persistent_kv())
        return self.merge(o)

    def causal(self, x: torch.Tensor, pos0: int, n_out: int) -> torch.Tensor:
        q, k, v = self.heads(x, torch.arange(pos0, pos0 + x.shape[1], device=x.device))
        return self.merge(causal_attention(q[:, :, -n_out:], k, v, *self.persistent_kv()))

    def segments(self, x: torch.Tensor, pos0: int, segment: int, h_tokens=None) -> torch.Tensor:
        pos = torch.arange(pos0, pos0 + x.shape[1], device=x.device)
        q, k, v = self.heads(x, pos)
        hk = hv = None
        if h_tokens is not None:             # retrieved memory tokens share their token's position
            _, hk, hv = self.heads(h_tokens, pos)
        return self.merge(segment_attention(q, k, v, segment, *self.persistent_kv(), hk, hv))
