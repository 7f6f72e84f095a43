"""Implicit Llama-style language model: a weight-tied pre-RMSNorm block with rotary position
embeddings, SwiGLU and causal attention with input injection, solved for its equilibrium (as in
the implicit Llama/Mamba-style models trained as DEQs, ICML 2025); and its explicit twins."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.dropout import VariationalDropout
from ._registry import register_model
from ._sequence import SequenceConfig, SequenceModel


@dataclass(frozen=True, kw_only=True)
class DEQLlamaConfig(SequenceConfig):
    n_heads: int = 4  # attention heads (d_model / n_heads must be even)
    d_ff: int = 64  # SwiGLU hidden width
    rope_base: float = 10000.0  # base of the rotary position embedding's frequencies


def rotate(x: Tensor, pos: Tensor, base: float) -> Tensor:
    """Rotary position embedding (Su et al. 2021) of ``x`` ``(B, L, H, dh)`` at positions
    ``pos`` ``(L,)``: pairs of channels rotated by ``pos * base^(-2i/dh)``; scores of rotated
    queries and keys depend only on the positions' difference."""
    dh = x.shape[-1]
    wd = torch.promote_types(x.dtype, torch.float32)  # angles at least in float32
    inv = base ** (-torch.arange(0, dh, 2, device=x.device, dtype=wd) / dh)
    ang = pos.to(wd).unsqueeze(1) * inv  # (L, dh/2)
    cos, sin = ang.cos().to(x.dtype)[:, None], ang.sin().to(x.dtype)[:, None]  # (L, 1, dh/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def _rms(norm: nn.RMSNorm, x: Tensor) -> Tensor:
    """RMSNorm in float32 whatever the autocast dtype (as Llama does: in bfloat16 the normalised
    scale carries ~0.4% round-off into every iteration of the solve)."""
    with torch.autocast(x.device.type, enabled=False):
        return norm(x.to(torch.promote_types(x.dtype, norm.weight.dtype))).to(x.dtype)


class LlamaLayer(nn.Module):
    """``f(z, x)``: ``h = z + Attn(RMSNorm(z); memory, x̃)``, ``f = RMSNorm_out(h +
    SwiGLU(RMSNorm(h)))`` (pre-norm; the output norm keeps the map bounded so that an
    equilibrium exists). The injection x̃ ``(B, T, 3D)`` enters the query/key/value projections;
    the memory ``(B, M, 4D)`` holds ``[z*, x̃]`` of earlier positions, whose rotated keys and
    values are computed once per solve (``prepare``). Positions: memory 0..M-1, segment
    M..M+T-1; each segment position attends to the memory and to segment positions ``<= t``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, rope_base: float):
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(
                f"d_model ({d_model}) must be n_heads ({n_heads}) times an even head width "
                f"(rotary embeddings rotate channel pairs)."
            )
        self.h, self.dh, self.base = n_heads, d_model // n_heads, rope_base
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.norm_out = nn.RMSNorm(d_model)
        self.drop = VariationalDropout(dropout, shared_dims=(1,))

    def prepare(self, inj: Tensor, ctx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x̃, K_ctx, V_ctx)``: the memory's rotated keys and values (independent of z)."""
        B, M = ctx.shape[:2]
        D = inj.shape[-1] // 3
        ctx_z, ctx_inj = ctx[..., :D].contiguous(), ctx[..., D:]
        kv = F.linear(_rms(self.norm1, ctx_z), self.qkv.weight[D:]) + ctx_inj[..., D:]
        k, v = kv.view(B, M, 2, self.h, self.dh).unbind(2)
        k = rotate(k, torch.arange(M, device=ctx.device), self.base)
        return inj, k, v

    def forward(self, z: Tensor, x: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        inj, k_ctx, v_ctx = x
        B, T, D = z.shape
        M = k_ctx.shape[1]
        q, k, v = (F.linear(_rms(self.norm1, z), self.qkv.weight) + inj).view(B, T, 3, self.h, self.dh).unbind(2)  # fmt: skip
        pos = torch.arange(M, M + T, device=z.device)
        q, k = rotate(q, pos, self.base), rotate(k, pos, self.base)
        k, v = torch.cat([k_ctx, k], 1), torch.cat([v_ctx, v], 1)  # (B, M+T, H, dh)
        i = torch.arange(T, device=z.device).unsqueeze(1)
        j = torch.arange(M + T, device=z.device).unsqueeze(0)
        allowed = j <= M + i  # memory, then segment positions <= t
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed
        ).transpose(1, 2)
        h = z + self.drop(self.out(a.reshape(B, T, D)))
        u = _rms(self.norm2, h)
        return _rms(self.norm_out, h + self.w2(F.silu(self.w1(u)) * self.w3(u)))


class LlamaInjection(nn.Module):
    """x̃ = W_inj x ``(B, T, 3D)``, added to the query/key/value projections."""

    def __init__(self, d_embed: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_embed, 3 * d_model, bias=False)

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:
        return self.proj(x)


class DEQLlama(SequenceModel):
    """Token model with an implicit Llama-style core (``core="deq"``), its weight-tied unroll
    (``"tied"``) or an untied stack of ``depth`` Llama blocks with matched non-embedding
    parameters (``"untied"``)."""

    family = "llama"
    config: DEQLlamaConfig

    def default_size(self) -> Any:
        return (self.config.d_model, self.config.d_ff)

    def candidate_sizes(self):
        """Widths in steps of 2 n_heads (even head widths for the rotations), each with the
        SwiGLU width that matches the DEQ's parameters: the usual shape (SwiGLU at least as wide
        as the model) where it exists, else any (a tiny twin at depth 12 is mostly injection
        weights: its SwiGLU width is ~2)."""
        c = self.config
        sizes = self.ffn_matched_sizes(range(2 * c.n_heads, c.d_model + 1, 2 * c.n_heads))
        usual = [sz for sz in sizes if sz[1] >= sz[0]]
        yield from usual or [sz for sz in sizes if sz[1] >= 1]

    def make_layer(self, size: Any) -> nn.Module:
        c = self.config
        return LlamaLayer(size[0], c.n_heads, size[1], c.dropout, c.rope_base)

    def make_injection(self, size: Any) -> nn.Module:
        return LlamaInjection(self.config.d_embed, size[0])

    def state_dim(self, size: Any) -> int:
        return size[0]

    def context_dim(self, size: Any) -> int:
        return 4 * size[0]

    def context_entry(self, z: Tensor, inj: Tensor, x: Tensor) -> Tensor:
        return torch.cat([z, inj], dim=-1)

    def layer_input(self, f: nn.Module, inj: Tensor, ctx: Tensor) -> Any:
        return f.prepare(inj, ctx)

    def readout_dim(self, size: Any) -> int:
        return size[0]


_TINY = dict(
    vocab_size=10, d_embed=32, d_model=32, n_heads=4, d_ff=64, mem_len=16,
    solve=dict(f_max_steps=12, eval_max_steps=20, b_max_steps=12),
)  # fmt: skip
# Penn Treebank at CPU scale, sized like deq_transformer_small (d=128, 4 heads, tied 10k softmax;
# SwiGLU width 344 keeps the FFN's parameters at the Transformer's 512-wide two-layer FFN).
_SMALL = dict(
    vocab_size=10000,
    d_embed=128,
    d_model=128,
    n_heads=4,
    d_ff=344,
    mem_len=70,
    tie_weights=True,
    dropout=0.1,
    emb_dropout=0.1,
    solve=dict(f_max_steps=12, eval_max_steps=20, b_max_steps=12),
)
# name, defaults (over the config class's), one line for listings
for _name, _defaults, _doc in (
    ("deq_llama_tiny", _TINY,
     "Implicit Llama-style model small enough for CPU tests (d=32, 4 heads, SwiGLU 64)."),
    ("llama_tied_tiny", {**_TINY, "core": "tied"},
     "Weight-tied twin of ``deq_llama_tiny``: its block applied L = f_max_steps times."),
    ("llama_untied_tiny", {**_TINY, "core": "untied"},
     "Untied twin of ``deq_llama_tiny``: L blocks, widths matched to its parameters."),
    ("deq_llama_small", _SMALL,
     "Implicit Llama-style model for Penn Treebank on a CPU (d=128, 4 heads, tied softmax)."),
    ("llama_tied_small", {**_SMALL, "core": "tied", "depth": 12},
     "Weight-tied twin of ``deq_llama_small``: its block unrolled L = 12 times."),
    ("llama_untied_small", {**_SMALL, "core": "untied", "depth": 4},
     "Untied twin of ``deq_llama_small``: 4 Llama blocks, widths matched to its parameters."),
):  # fmt: skip
    register_model(_name, DEQLlamaConfig, _defaults, DEQLlama, _doc)
