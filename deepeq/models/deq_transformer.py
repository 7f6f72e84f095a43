"""DEQ-Transformer (Bai et al. 2019, §3.3): a weight-tied Transformer-XL layer with input
injection, solved for its equilibrium; and its explicit twins."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.dropout import VariationalDropout
from ..nn.layers import FeedForward, RelativeAttention
from ._registry import register_model
from ._sequence import SequenceConfig, SequenceModel


@dataclass(frozen=True, kw_only=True)
class DEQTransformerConfig(SequenceConfig):
    n_heads: int = 4  # attention heads (d_model must be divisible by it)
    d_ff: int = 64  # hidden width of the position-wise feed-forward layer
    pre_ln: bool = False  # Bai et al. 2021 Table 5 compares Post-LN and Pre-LN
    dropatt: float = 0.0  # dropout on attention weights (one mask per forward)


class TransformerLayer(nn.Module):
    """``f(z, x)`` with ``x = prepare(x̃, ctx)``: Post-LN ``u = LN(z + Attn(z; ctx, x̃))``, ``f = LN(u + FFN(u))``;
    Pre-LN ``u = z + Attn(LN(z); LN(ctx), x̃)``, ``f = LN_out(u + FFN(LN(u)))`` (the final LN keeps
    the map bounded, so that an equilibrium exists). z ``(B, T, D)``, x̃ ``(B, T, 3D)`` enters the
    query/key/value projections (``z W_QKV + x̃``), ctx ``(B, M, 4D)`` is the memory: the
    equilibria of earlier positions and their injections ``[z*, x̃]``, so that a remembered
    position has exactly the keys and values it had in its own segment."""

    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, dropout: float, dropatt: float, pre_ln: bool
    ):
        super().__init__()
        self.attn = RelativeAttention(d_model, n_heads, dropatt)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ln_out = nn.LayerNorm(d_model) if pre_ln else None
        self.drop = VariationalDropout(dropout, shared_dims=(1,))
        self.pre_ln = pre_ln

    def prepare(self, inj: Tensor, ctx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The layer input ``x = (x̃, K_ctx, V_ctx)`` from the injection and the memory: the
        memory's keys and values do not depend on z, so a solve computes them once, not in every
        iteration (with autograd in the caller's mode, so gradients reach them)."""
        D = inj.shape[-1] // 3
        # memory: [z*, x̃] of earlier positions. The z* part is copied: autograd saves it for
        # the key/value projection, and a view would keep the whole (B, M, 4D) memory alive.
        ctx_z, ctx_inj = ctx[..., :D].contiguous(), ctx[..., D:]
        k, v = self.attn.context(self.ln1(ctx_z) if self.pre_ln else ctx_z, ctx_inj)
        return inj, k, v

    def forward(self, z: Tensor, x: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        inj, k_ctx, v_ctx = x
        if self.pre_ln:
            u = z + self.drop(self.attn.attend(self.ln1(z), k_ctx, v_ctx, inj))
            return self.ln_out(u + self.ff(self.ln2(u)))
        u = self.ln1(z + self.drop(self.attn.attend(z, k_ctx, v_ctx, inj)))
        return self.ln2(u + self.ff(u))


class TransformerInjection(nn.Module):
    """x̃ = W_inj x: the embedding projected to the query/key/value width ``(B, T, 3D)``."""

    def __init__(self, d_embed: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_embed, 3 * d_model)

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:
        return self.proj(x)


class DEQTransformer(SequenceModel):
    """Token model with a DEQ-Transformer core (``core="deq"``), or its twins: the same layer
    applied ``depth`` times weight-tied (``"tied"``) or a Transformer-XL-style stack of ``depth``
    untied layers sized to the same non-embedding parameters (``"untied"``)."""

    family = "transformer"
    config: DEQTransformerConfig

    def default_size(self) -> Any:
        return (self.config.d_model, self.config.d_ff)

    def candidate_sizes(self):
        """Widths in steps of n_heads, each with the FFN width that matches the DEQ's
        parameters, keeping the usual shape (FFN at least as wide as the model)."""
        c = self.config
        sizes = self.ffn_matched_sizes(range(c.n_heads, c.d_model + 1, c.n_heads))
        yield from (sz for sz in sizes if sz[1] >= sz[0])

    def make_layer(self, size: Any) -> nn.Module:
        c = self.config
        return TransformerLayer(size[0], c.n_heads, size[1], c.dropout, c.dropatt, c.pre_ln)

    def make_injection(self, size: Any) -> nn.Module:
        return TransformerInjection(self.config.d_embed, size[0])

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
    vocab_size=10,
    d_embed=32,
    d_model=32,
    n_heads=4,
    d_ff=64,
    mem_len=16,
    solve=dict(f_max_steps=12, eval_max_steps=20, b_max_steps=12),
)
# Penn Treebank at CPU scale (configs/ptb_*.toml): 0.26M non-embedding parameters, tied 10k
# embedding/softmax; segments of 70 tokens with a memory of 70. Solver caps 12 forward / 12
# backward (Anderson): cheaper caps that looked free in 600-step trials broke down or fell behind
# over the 5,000 steps of configs/ptb_deq_transformer.toml (docs/results/ptb.md).
_SMALL = dict(
    vocab_size=10000,
    d_embed=128,
    d_model=128,
    n_heads=4,
    d_ff=512,
    mem_len=70,
    tie_weights=True,
    dropout=0.1,
    emb_dropout=0.1,
    solve=dict(f_max_steps=12, eval_max_steps=20, b_max_steps=12),
)
# WikiText-103 (the DEQ talk, Bai et al. 2021 and the original DEQ repository; vocabulary 267,735,
# frequency-ordered). "medium": embedding 700, sequence length 150, variational dropout 0.06, weight
# norm; the original DEQ repository trains with f_thres 30, b_thres 50, subsequence length 75 and
# pretrain_steps ~10-20% of training.
_WT103_MEDIUM = dict(
    vocab_size=267735,
    d_embed=700,
    d_model=700,
    n_heads=10,
    d_ff=4000,
    mem_len=150,
    dropout=0.06,
    weight_norm=True,
    # The papers solve with Broyden. Causal solving (the default) needs per-position mixing, and
    # Broyden's per-position inverse estimates diverge on these models (the residual jumps to O(1)
    # after ~15-30 steps, measured on fresh weights, docs/guide/models.md), so the forward solver is
    # Anderson with per-position coefficients; the backward solve (not causal) keeps Broyden.
    solve=dict(
        solver="anderson", b_solver="broyden", f_max_steps=30, eval_max_steps=40, b_max_steps=50
    ),
    subseq_len=75,
    pretrain_steps=20000,
)
# "small" (the DEQ talk's table: 4.5M non-embedding parameters, 138M with the full softmax):
# Transformer-XL small's widths (410, 10 heads, FFN 2100) with an adaptive embedding/softmax.
_WT103_SMALL = {
    **_WT103_MEDIUM,
    "d_embed": 410,
    "d_model": 410,
    "d_ff": 2100,
    "dropout": 0.1,
    "adaptive": True,
    "tie_weights": True,
    "cutoffs": (20000, 40000, 200000),
    "div_value": 1.0,
}


# name, defaults (over the config class's), one line for listings
for _name, _defaults, _doc in (
    ("deq_transformer_tiny", _TINY,
     "DEQ-Transformer small enough for CPU tests and copy memory (d=32, 4 heads)."),
    ("transformer_tied_tiny", {**_TINY, "core": "tied"},
     "Explicit twin of ``deq_transformer_tiny``: its layer applied L = f_max_steps times, weight-tied."),
    ("transformer_xl_tiny", {**_TINY, "core": "untied"},
     "Untied twin of ``deq_transformer_tiny``: L layers, width matched to its non-embedding parameters."),
    ("deq_transformer_small", _SMALL,
     "DEQ-Transformer for Penn Treebank on a CPU (d=128, 4 heads, FFN 512, tied 10k softmax)."),
    ("transformer_tied_small", {**_SMALL, "core": "tied", "depth": 12},
     "Weight-tied twin of ``deq_transformer_small``: its layer unrolled L = 12 times."),
    ("transformer_xl_small", {**_SMALL, "core": "untied", "depth": 4},
     "Untied Transformer-XL-style twin of ``deq_transformer_small``: 4 layers (as Transformer-XL small), widths matched to the DEQ's non-embedding parameters."),
    ("deq_transformer_wt103_medium", _WT103_MEDIUM,
     "Paper-size DEQ-Transformer for WikiText-103, full softmax (GPU; documented configuration)."),
    ("deq_transformer_wt103_medium_adaptive",
     {**_WT103_MEDIUM, "adaptive": True, "tie_weights": True, "cutoffs": (20000, 40000, 200000),
      "div_value": 4.0},
     "WikiText-103 medium with tied adaptive embedding/softmax (cut-offs 20K/40K/200K, div 4)."),
    ("deq_transformer_wt103_small", _WT103_SMALL,
     "WikiText-103 small (410 wide, 10 heads, FFN 2100) with tied adaptive embedding/softmax."),
):  # fmt: skip
    register_model(_name, DEQTransformerConfig, _defaults, DEQTransformer, _doc)
