"""Blocks shared by the sequence models (DEQ-Transformer, DEQ-TrellisNet and their twins)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dropout import VariationalDropout


def sinusoid(distances: Tensor, dim: int) -> Tensor:
    """Sinusoidal encodings of (relative) positions: ``(L,) -> (L, dim)`` (Vaswani et al. 2017)."""
    inv = torch.exp(
        torch.arange(0, dim, 2, device=distances.device, dtype=torch.float32)
        * (-math.log(10000.0) / dim)
    )
    ang = distances.float().unsqueeze(1) * inv.unsqueeze(0)  # (L, dim/2)
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class RelativeAttention(nn.Module):
    """Causal multi-head self-attention with Transformer-XL relative positions (Dai et al. 2019):
    ``score_ij = (q_i + u)·k_j + (q_i + v)·W_r R_{i-j}``, over the keys ``[context; z]``.

    ``forward(z, ctx, inj, ctx_inj)``: z ``(B, T, D)`` the current segment, ctx ``(B, M, D)``
    fixed context before it (memory; M may be 0), inj ``(B, T, 3D)`` an optional input injection
    added to the segment's query/key/value projections (the DEQ-Transformer's ``z W_QKV + x̃``),
    and ctx_inj ``(B, M, 3D)`` the injection of the context positions (so that keys and values
    of remembered positions are exactly those they had in their own segment).
    Position ``i`` of the segment attends to all of ctx and to segment positions ``<= i``.
    """

    def __init__(self, d_model: int, n_heads: int, dropatt: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        self.h, self.dh = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.r_net = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.u = nn.Parameter(torch.zeros(n_heads, self.dh))
        self.v = nn.Parameter(torch.zeros(n_heads, self.dh))
        self.dropatt = VariationalDropout(dropatt, shared_dims=())  # fixed per DEQ forward

    def forward(
        self, z: Tensor, ctx: Tensor, inj: Tensor | None = None, ctx_inj: Tensor | None = None
    ) -> Tensor:
        B, T, D = z.shape
        M = ctx.shape[1]
        K = M + T
        cat = torch.cat([ctx, z], dim=1)  # (B, K, D)
        qkv = self.qkv(cat)  # (B, K, 3D)
        if inj is not None or ctx_inj is not None:
            head = qkv[:, :M] if ctx_inj is None else qkv[:, :M] + ctx_inj
            tail = qkv[:, M:] if inj is None else qkv[:, M:] + inj
            qkv = torch.cat([head, tail], dim=1)
        q, k, v = qkv.split(D, dim=2)
        q = q[:, M:].reshape(B, T, self.h, self.dh)
        k = k.reshape(B, K, self.h, self.dh)
        v = v.reshape(B, K, self.h, self.dh)
        r = self.r_net(sinusoid(torch.arange(K, device=z.device), D).to(z.dtype)).reshape(
            K, self.h, self.dh
        )
        ac = torch.einsum("bihd,bjhd->bhij", q + self.u, k)  # (B, H, T, K)
        bd_all = torch.einsum("bihd,lhd->bhil", q + self.v, r)  # (B, H, T, K): by distance l
        # Relative distance of query i (absolute position M + i) to key j is M + i - j >= 0.
        i = torch.arange(T, device=z.device).unsqueeze(1)
        j = torch.arange(K, device=z.device).unsqueeze(0)
        dist = M + i - j  # (T, K)
        bd = bd_all.gather(3, dist.clamp(min=0).expand(B, self.h, T, K))
        score = (ac + bd) / math.sqrt(self.dh)
        score = score.masked_fill(dist < 0, float("-inf"))
        attn = self.dropatt(torch.softmax(score, dim=-1))
        o = torch.einsum("bhij,bjhd->bihd", attn, v).reshape(B, T, D)
        return self.out(o)


class FeedForward(nn.Module):
    """``W₂ ReLU(W₁ x)`` with variational dropout on the hidden layer (mask shared over time)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = VariationalDropout(dropout, shared_dims=(1,))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.relu(self.fc1(x))))


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, left: Tensor) -> Tensor:
    """Causal convolution over time: x ``(B, T, C)``, weight ``(C_out, C, k)``, ``left`` the
    ``k - 1`` positions before x ``(B, k-1, C)`` (context; zeros at the start of a stream)."""
    xp = torch.cat([left, x], dim=1).transpose(1, 2)  # (B, C, T + k - 1)
    return F.conv1d(xp, weight, bias).transpose(1, 2)  # (B, T, C_out)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
