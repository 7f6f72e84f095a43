"""Small DEQ layers used by the demo (`python -m deepeq demo`) and the benchmarks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalAttentionLayer(nn.Module):
    """Transformer-style DEQ layer with input injection (DEQ-Transformer, post-LN):
    ``f(z, x) = LN(u + FFN(u))``, ``u = LN(z + CausalSelfAttention(z) + x)``; z, x: (B, T, D)."""

    def __init__(self, d_model: int = 64, n_heads: int = 4, d_ff: int = 128):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        B, T, D = z.shape
        q, k, v = self.qkv(z).view(B, T, 3, self.n_heads, D // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(  # (B, H, T, D/H)
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        u = self.ln1(z + self.proj(a.transpose(1, 2).reshape(B, T, D)) + x)
        return self.ln2(u + self.ff(u))


class ConvLayer(nn.Module):
    """MDEQ-style residual conv DEQ layer: ``f(z, x) = GN(ReLU(z + conv(ReLU(conv(z))) + x))``;
    z, x: (B, C, H, W). (GroupNorm inside the branch makes it scale-invariant and near-neutrally
    stable at random init, which no solver handles well; the output GroupNorm is enough here.)"""

    def __init__(self, channels: int = 16, groups: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(groups, channels)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.norm(F.relu(z + self.conv2(F.relu(self.conv1(z))) + x))


def make_layer(kind: str, batch: int = 8, seed: int = 0) -> tuple[nn.Module, Tensor]:
    """A seeded layer and its injected input: ``"attention"`` (B, 64, 64) or ``"conv"`` (B, 16, 16, 16)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "attention":
        layer: nn.Module = CausalAttentionLayer()
        x = torch.randn(batch, 64, 64, generator=gen)
    elif kind == "conv":
        layer = ConvLayer()
        x = torch.randn(batch, 16, 16, 16, generator=gen)
    else:
        raise ValueError(f"Unknown layer kind {kind!r}; expected 'attention' or 'conv'.")
    return layer.eval(), x


def demo(smoke: bool = False) -> str:
    """Solve the demo layers with every solver and return the stats table (markdown)."""
    from . import Anderson, Broyden, Picard, fixed_point

    batch = 2 if smoke else 8
    rows = [
        "| layer | solver | status | steps mean/max | nfe | sample evals | max rel residual | ms | buffers KiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    solvers = [Picard(max_steps=60), Anderson(max_steps=60), Broyden(max_steps=60)]
    for kind in ("attention", "conv"):
        layer, x = make_layer(kind, batch)
        for solver in solvers:
            sol = fixed_point(layer, torch.zeros_like(x), solver, args=(x,))
            st = sol.stats
            rows.append(
                f"| {kind} | {type(solver).__name__} | {sol.status.name} | "
                f"{st.num_steps.float().mean().item():.1f}/{int(st.num_steps.max())} | {st.nfe} | "
                f"{st.sample_evals} | {st.rel_residual.max().item():.2e} | "
                f"{1e3 * st.wall_time:.1f} | {math.ceil(st.buffer_bytes / 1024)} |"
            )
    return "\n".join(rows)
