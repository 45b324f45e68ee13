"""Fresh random inputs for the memory op tests (shared by the op and kernel tests)."""

import torch
import torch.nn.functional as F


def make_inputs(B=2, H=2, L=37, d=8, depth=2, expansion=2, dtype=torch.float64, seed=None,
                requires_grad=False):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q = F.normalize(r(B, H, L, d), dim=-1)
    k = F.normalize(r(B, H, L, d), dim=-1)
    v = r(B, H, L, d)
    # non-trivial gates: spread over (0, 1), not constant
    theta = torch.rand(B, H, L, generator=g, dtype=dtype) * 0.6
    eta = torch.rand(B, H, L, generator=g, dtype=dtype)
    alpha = torch.rand(B, H, L, generator=g, dtype=dtype) * 0.4
    dims = [d] if depth == 1 else [d] + [expansion * d] * (depth - 1)
    dims = dims + [d]
    init = [r(B, H, dims[i], dims[i + 1]) * (0.5 / dims[i] ** 0.5) for i in range(depth)]
    tensors = [q, k, v, theta, eta, alpha, *init]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return q, k, v, theta, eta, alpha, init


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
