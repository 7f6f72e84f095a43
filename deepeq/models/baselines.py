"""Recurrent and convolutional baselines with the zoo's calling protocol (copy memory, LM)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_model


@dataclass(frozen=True, kw_only=True)
class BaselineConfig:
    vocab_size: int = 10  # tokens of the vocabulary
    d_embed: int = 16  # width of the token embedding
    hidden: int = 50  # RNN hidden size / TCN channels
    num_layers: int = 1  # stacked RNN layers
    dropout: float = 0.0  # dropout between layers
    mem_len: int = 0  # unused by RNNs (their state is the hidden state); kept for a uniform API
    kernel_size: int = 6  # TCN only
    levels: int = 6  # TCN only


def _out(logits: Tensor, targets: Tensor | None) -> Tensor:
    """Logits, or the per-token NLL ``(B, T)`` when targets are given (the sequence protocol)."""
    if targets is None:
        return logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view(targets.shape)


class RNNModel(nn.Module):
    """LSTM/GRU language-model-style baseline: embedding -> torch.nn RNN -> linear head.
    ``state`` is the RNN hidden state (detached between segments)."""

    family = "rnn"

    def __init__(self, config: BaselineConfig, cell: str):
        super().__init__()
        self.config = config
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.embed = nn.Embedding(config.vocab_size, config.d_embed)
        self.rnn = rnn(
            config.d_embed,
            config.hidden,
            config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(config.hidden, config.vocab_size)

    def non_embedding_parameters(self) -> int:
        return sum(p.numel() for p in self.rnn.parameters())

    def forward(self, tokens: Tensor, state=None, *, targets: Tensor | None = None):
        out, h = self.rnn(self.embed(tokens), state)
        h = tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()
        return _out(self.head(out), targets), h, []


class TCN(nn.Module):
    """Temporal convolutional network (Bai et al. 2018): residual blocks of two causal dilated
    convolutions (dilation 2^i), weight norm, ReLU. ``state`` holds the last inputs of the
    receptive field, so segments continue exactly."""

    family = "tcn"

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.config = config
        c, k = config.hidden, config.kernel_size
        self.embed = nn.Embedding(config.vocab_size, config.d_embed)
        self.inp = nn.Linear(config.d_embed, c)
        self.convs = nn.ModuleList()
        for i in range(config.levels):
            for _ in range(2):
                self.convs.append(
                    nn.utils.parametrizations.weight_norm(nn.Conv1d(c, c, k, dilation=2**i))
                )
        self.head = nn.Linear(c, config.vocab_size)
        self.context = 2 * (k - 1) * (2**config.levels - 1)  # receptive field - 1

    def non_embedding_parameters(self) -> int:
        return sum(p.numel() for m in (self.inp, self.convs) for p in m.parameters())

    def forward(self, tokens: Tensor, state=None, *, targets: Tensor | None = None):
        x = self.inp(self.embed(tokens))  # (B, T, C)
        B, T, C = x.shape
        past = state if state is not None else x.new_zeros(B, self.context, C)
        h = torch.cat([past, x], dim=1).transpose(1, 2)  # (B, C, ctx + T)
        for i in range(0, len(self.convs), 2):
            d = self.convs[i].dilation[0]
            pad = (self.config.kernel_size - 1) * d
            y = F.relu(self.convs[i](F.pad(h, (pad, 0))))
            y = F.relu(self.convs[i + 1](F.pad(y, (pad, 0))))
            h = F.relu(h + y)
        out = h[:, :, -T:].transpose(1, 2)
        new_state = torch.cat([past, x], dim=1)[:, -self.context :].detach()
        return _out(self.head(out), targets), new_state, []


# name, defaults (over BaselineConfig's), builder, one line for listings
for _name, _defaults, _builder, _doc in (
    ("lstm_tiny", dict(hidden=50), functools.partial(RNNModel, cell="lstm"),
     "LSTM baseline of about 14K parameters (copy memory: the DEQ-Transformer's size)."),
    ("gru_tiny", dict(hidden=58), functools.partial(RNNModel, cell="gru"),
     "GRU baseline of about 14K parameters."),
    ("tcn_tiny", dict(hidden=14, kernel_size=6, levels=6), TCN,
     "Small TCN (6 levels, kernel 6, 14 channels: receptive field 631), about 14K parameters."),
):  # fmt: skip
    register_model(_name, BaselineConfig, _defaults, _builder, _doc)
