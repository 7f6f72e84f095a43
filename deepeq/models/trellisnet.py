"""DEQ-TrellisNet (Bai et al. 2019, §3.3): a weight-tied temporal convolution with LSTM-style
gating and input injection, solved for its equilibrium; and its explicit twins."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..nn.dropout import VariationalDropout
from ..nn.layers import causal_conv1d
from ._registry import register_model
from ._sequence import SequenceConfig, SequenceModel


@dataclass(frozen=True, kw_only=True)
class DEQTrellisNetConfig(SequenceConfig):
    kernel_size: int = 2  # k of the causal convolution over positions
    # How the input enters the gates: "conv" x̃ = Conv1D(x; W_x), causal with the layer's kernel
    # (TrellisNet; Bai et al. 2019 §3.3), or "pointwise" x̃_t = W_x x_t.
    injection: Literal["conv", "pointwise"] = "conv"

    def validate(self) -> None:
        super().validate()
        if self.injection not in ("conv", "pointwise"):
            raise ValueError(f"injection must be 'conv' or 'pointwise'; got {self.injection!r}.")


class TrellisLayer(nn.Module):
    """``f(z, (x̃, ctx))`` with state ``z = [h, c]`` ``(B, T, 2D)``:
    ``[i, f, o, g] = Conv1D([u, h]; W_z) + x̃`` (causal, kernel k, the ``k-1`` positions ``u`` before
    the segment taken from ctx), ``c' = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g)``, ``h' = σ(o) ⊙ tanh(c')``
    (the LSTM-style activation ψ of TrellisNet, Bai et al. 2019b). A context position holds
    ``[h, c]`` (then, with the convolutional injection, the embedding)."""

    def __init__(self, d_model: int, kernel_size: int, dropout: float):
        super().__init__()
        self.d, self.k = d_model, kernel_size
        self.conv = nn.Conv1d(d_model, 4 * d_model, kernel_size)
        self.drop = VariationalDropout(dropout, shared_dims=(1,))

    def forward(self, z: Tensor, x: tuple[Tensor, Tensor]) -> Tensor:
        inj, ctx = x
        D = self.d
        h, c = z[..., :D], z[..., D:]
        left = ctx[:, ctx.shape[1] - (self.k - 1) :, :D]  # (B, k-1, D)
        pre = causal_conv1d(self.drop(h), self.conv.weight, self.conv.bias, left) + inj
        i, f, o, g = pre.chunk(4, dim=-1)
        c_prev = torch.cat([ctx[:, -1:, D : 2 * D], c[:, :-1]], dim=1)
        c_new = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
        return torch.cat([torch.sigmoid(o) * torch.tanh(c_new), c_new], dim=-1)


class TrellisInjection(nn.Module):
    """x̃ = Conv1D(x; W_x): the embeddings of positions ``t-k+1 .. t`` mapped to the four gates
    ``(B, T, 4D)`` by a causal kernel-k convolution, as the hidden state is (TrellisNet: input and
    hidden state enter one convolution); the ``k-1`` embeddings before the segment come from the
    context (its last ``d_embed`` columns; zeros at the start of a stream)."""

    def __init__(self, d_embed: int, d_model: int, kernel_size: int):
        super().__init__()
        self.k = kernel_size
        self.conv = nn.Conv1d(d_embed, 4 * d_model, kernel_size)

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:
        left = ctx[:, ctx.shape[1] - (self.k - 1) :, ctx.shape[2] - x.shape[2] :]  # (B, k-1, E)
        return causal_conv1d(x, self.conv.weight, self.conv.bias, left)


class PointwiseInjection(nn.Module):
    """x̃_t = W_x x_t: each position's embedding projected to the four gates ``(B, T, 4D)``."""

    def __init__(self, d_embed: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_embed, 4 * d_model)

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:
        return self.proj(x)


class DEQTrellisNet(SequenceModel):
    """Token model with a DEQ-TrellisNet core (``core="deq"``), or its twins (``"tied"``: the layer
    applied ``depth`` times; ``"untied"``: ``depth`` layers of matched total size)."""

    family = "trellisnet"
    config: DEQTrellisNetConfig

    def make_layer(self, size: Any) -> nn.Module:
        return TrellisLayer(size, self.config.kernel_size, self.config.dropout)

    def make_injection(self, size: Any) -> nn.Module:
        c = self.config
        if c.injection == "pointwise":
            return PointwiseInjection(c.d_embed, size)
        return TrellisInjection(c.d_embed, size, c.kernel_size)

    def state_dim(self, size: Any) -> int:
        return 2 * size

    def context_dim(self, size: Any) -> int:
        """``[h, c]``, then the embedding when the injection is a convolution over positions."""
        return 2 * size + (self.config.d_embed if self.config.injection == "conv" else 0)

    def context_entry(self, z: Tensor, inj: Tensor, x: Tensor) -> Tensor:
        return torch.cat([z, x], dim=-1) if self.config.injection == "conv" else z

    def readout(self, z: Tensor) -> Tensor:
        return z[..., : z.shape[-1] // 2]

    def context_len(self) -> int:
        return max(self.config.kernel_size - 1, 1)


# d_model=34 lets the untied twin at depth 12 match the parameters within 5% (integer widths).
_TINY = dict(
    vocab_size=10,
    d_embed=32,
    d_model=34,
    kernel_size=2,
    solve=dict(f_max_steps=12, eval_max_steps=20, b_max_steps=12),
)
# Penn Treebank at CPU scale: state [h, c] of 2 x 128, kernel 2, tied 10k embedding/softmax. Solved
# by Picard iteration in subsequences of 14 positions (the original DEQ repository, note 2). A
# kernel-2 layer moves information one position per iteration, so a 70-position segment needs ~70
# iterations however contractive f is; Anderson and Broyden stall on this strongly non-normal
# Jacobian long before that, whereas Picard on 14-position chunks reaches 1e-3 within ~20 steps
# per chunk (measurements: docs/guide/models.md).
_SMALL = dict(
    vocab_size=10000,
    d_embed=128,
    d_model=128,
    tie_weights=True,
    kernel_size=2,
    dropout=0.1,
    emb_dropout=0.1,
    weight_norm=True,
    subseq_len=14,
    solve=dict(solver="picard", f_max_steps=30, eval_max_steps=40, b_max_steps=20),
)
# Penn Treebank word level (the DEQ talk Table 2 scale: ~24M parameters with a 10k vocabulary).
_PTB = dict(
    vocab_size=10000,
    d_embed=400,
    d_model=1000,
    kernel_size=2,
    dropout=0.1,
    weight_norm=True,
    solve=dict(f_max_steps=30, eval_max_steps=40, b_max_steps=30),
)


# name, defaults (over the config class's), one line for listings
for _name, _defaults, _doc in (
    ("deq_trellisnet_tiny", _TINY,
     "DEQ-TrellisNet small enough for CPU tests (d=34, kernel 2)."),
    ("trellisnet_tied_tiny", {**_TINY, "core": "tied"},
     "Explicit twin of ``deq_trellisnet_tiny``: its layer applied L = f_max_steps times, weight-tied."),
    ("trellisnet_untied_tiny", {**_TINY, "core": "untied"},
     "Untied twin of ``deq_trellisnet_tiny``: L layers, width matched to its non-embedding parameters."),
    ("deq_trellisnet_small", _SMALL,
     "DEQ-TrellisNet for Penn Treebank on a CPU (d=128, kernel 2, tied softmax)."),
    ("trellisnet_tied_small", {**_SMALL, "core": "tied", "depth": 20},
     "Weight-tied twin of ``deq_trellisnet_small``: the TrellisNet layer unrolled L = 20 times."),
    ("deq_trellisnet_ptb", _PTB,
     "Paper-size DEQ-TrellisNet for Penn Treebank (documented configuration)."),
):  # fmt: skip
    register_model(_name, DEQTrellisNetConfig, _defaults, DEQTrellisNet, _doc)
