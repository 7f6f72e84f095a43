"""Scale-safe norms for stopping rules and solver internals."""

from __future__ import annotations

import torch
from torch import Tensor


def safe_norm(x: Tensor, dim: int) -> Tensor:
    """Euclidean norms along ``dim`` in float64 that neither overflow nor underflow.

    Lower-precision inputs are accumulated in float64, whose range holds every square of a
    float32/bf16/fp16 value. float64 inputs are scaled by their largest entry where the plain
    result leaves the range in which squaring is exact (about 1e-140 ... 1e140)."""
    if x.dtype != torch.float64:
        return torch.linalg.vector_norm(x, dim=dim, dtype=torch.float64)
    n = torch.linalg.vector_norm(x, dim=dim)
    ok = (n > 1e-140) & (n < 1e140)
    if bool(ok.all()):
        return n
    m = x.abs().amax(dim, keepdim=True)
    scaled = torch.linalg.vector_norm(x / m.clamp_min(torch.finfo(x.dtype).tiny), dim=dim)
    m = m.squeeze(dim)
    scaled = torch.where(torch.isinf(m), m, scaled * m)  # inf entries: inf, not inf/inf = nan
    return torch.where(ok, n, scaled)
