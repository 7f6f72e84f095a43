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

    def context(self, ctx: Tensor, ctx_inj: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Keys and values ``(B, M, D)`` of the context positions. They do not depend on the
        segment's state, so an equilibrium solve computes them once (see ``attend``)."""
        D = ctx.shape[-1]
        kv = F.linear(ctx, self.qkv.weight[D:])  # (B, M, 2D): no queries for the context
        if ctx_inj is not None:
            kv = kv + ctx_inj[..., D:]
        k, v = kv.split(D, dim=2)
        return k, v

    def attend(self, z: Tensor, k_ctx: Tensor, v_ctx: Tensor, inj: Tensor | None = None) -> Tensor:
        """Attention of the segment z over ``[context; z]`` with the context's keys/values
        precomputed by ``context``."""
        B, T, D = z.shape
        M = k_ctx.shape[1]
        K = M + T
        qkv = self.qkv(z)  # (B, T, 3D)
        if inj is not None:
            qkv = qkv + inj
        q, k, v = qkv.split(D, dim=2)
        scale = self.dh**-0.5  # applied to the (B, T, D) queries, not the (B, H, T, K) scores
        q = q.reshape(B, T, self.h, self.dh) * scale
        k = torch.cat([k_ctx, k], dim=1).reshape(B, K, self.h, self.dh)
        v = torch.cat([v_ctx, v], dim=1).reshape(B, K, self.h, self.dh)
        r = self.r_net(sinusoid(torch.arange(K, device=z.device), D).to(z.dtype)).reshape(
            K, self.h, self.dh
        )
        bd_all = torch.einsum(
            "bihd,lhd->bhil", q + self.v * scale, r
        )  # (B, H, T, K): by distance l
        # Relative distance of query i (absolute position M + i) to key j is M + i - j >= 0.
        i = torch.arange(T, device=z.device).unsqueeze(1)
        j = torch.arange(K, device=z.device).unsqueeze(0)
        dist = M + i - j  # (T, K)
        bd = bd_all.gather(3, dist.clamp(min=0).expand(B, self.h, T, K))
        causal = torch.zeros(T, K, dtype=bd.dtype, device=bd.device).masked_fill_(
            dist < 0, float("-inf")
        )
        qu = q + self.u * scale
        if not torch.is_grad_enabled() and (self.dropatt.p == 0.0 or not self.training):
            # Fused kernel, softmax(qu·k + bd + causal) v (every row keeps its own position), for
            # the solver's iterations and evaluation. With autograd it would fall back to a path
            # that saves more for backward than the explicit one below.
            o = F.scaled_dot_product_attention(
                qu.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=bd + causal,
                scale=1.0,
            ).transpose(1, 2)
        else:
            score = torch.einsum("bihd,bjhd->bhij", qu, k) + bd + causal  # (B, H, T, K)
            attn = self.dropatt(torch.softmax(score, dim=-1))
            o = torch.einsum("bhij,bjhd->bihd", attn, v)
        return self.out(o.reshape(B, T, D))

    def forward(
        self, z: Tensor, ctx: Tensor, inj: Tensor | None = None, ctx_inj: Tensor | None = None
    ) -> Tensor:
        return self.attend(z, *self.context(ctx, ctx_inj), inj)


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
