"""Adaptive input embeddings (Baevski & Auli 2019) and adaptive softmax (Grave et al. 2017) for
large vocabularies (WikiText-103: 267K words), with the weights tied as in the papers' code.

The vocabulary, ordered by decreasing frequency, is cut into clusters ``[0, c1), [c1, c2), ...,
[ck, V)``. Cluster ``i`` has width ``d_i = d / div_value**i``: an embedding table ``(n_i, d_i)``
and a projection ``d_i -> d``. The softmax scores the head (cluster 0 plus one logit per tail
cluster) and, inside tail cluster ``i``, ``p(w) = p(cluster i) p(w | cluster i)``. With
``tie_weights`` the softmax's word vectors ARE the embedding tables and its projections the
transposed embedding projections (the papers tie both), so a tied model stores each matrix once.

``torch.nn.AdaptiveLogSoftmaxWithLoss`` has no way to share its matrices with an embedding, hence
this small module; it is tested against an explicit full softmax (normalisation, NLL).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _clusters(vocab_size: int, cutoffs: tuple[int, ...]) -> list[int]:
    cuts = list(cutoffs)
    if any(b <= a for a, b in zip([0, *cuts], cuts, strict=False)) or (
        cuts and cuts[-1] >= vocab_size
    ):
        raise ValueError(
            f"cutoffs must increase strictly within (0, vocab_size={vocab_size}); got {list(cutoffs)}."
        )
    return [0, *cuts, vocab_size]


class AdaptiveEmbedding(nn.Module):
    """Token ids ``(...)`` -> vectors ``(..., d)``; cluster ``i`` stores ``(n_i, d/div**i)`` and a
    projection to ``d``. Outputs are scaled by ``sqrt(d)`` as in Transformer-XL."""

    def __init__(
        self, vocab_size: int, d: int, cutoffs: tuple[int, ...], div_value: float = 4.0
    ) -> None:
        super().__init__()
        self.bounds = _clusters(vocab_size, cutoffs)
        self.d = d
        self.dims = [max(1, int(d // div_value**i)) for i in range(len(self.bounds) - 1)]
        self.tables = nn.ModuleList(
            nn.Embedding(hi - lo, di)
            for lo, hi, di in zip(self.bounds[:-1], self.bounds[1:], self.dims, strict=True)
        )
        # proj[i]: (d, d_i), applied as table_i(w) @ proj[i].T
        self.projs = nn.ParameterList(
            nn.Parameter(torch.empty(d, di).normal_(0, di**-0.5)) for di in self.dims
        )
        for t in self.tables:
            nn.init.normal_(t.weight, 0, t.embedding_dim**-0.5)
        self.scale = math.sqrt(d)

    def forward(self, ids: Tensor) -> Tensor:
        # Every cluster projects ALL tokens (out-of-cluster ids clamped, their rows discarded):
        # each matrix product then has the same shape whatever the tokens, so a token's vector
        # never depends on which other tokens are in the batch (a product over only the
        # cluster's tokens changes its row count, and BLAS kernels, hence float rounding, with
        # it: a causal model's earlier outputs moved by ~1e-6 when later tokens changed). Costs
        # about 1 + 1/4 + 1/16 + ... of cluster 0's product.
        flat = ids.reshape(-1)
        out = None
        for i, (lo, hi) in enumerate(zip(self.bounds[:-1], self.bounds[1:], strict=True)):
            vec = self.tables[i]((flat - lo).clamp(0, hi - lo - 1)) @ self.projs[i].T
            inside = ((flat >= lo) & (flat < hi)).unsqueeze(1)
            out = vec if out is None else torch.where(inside, vec, out)
        return (out * self.scale).view(*ids.shape, self.d)


class AdaptiveSoftmax(nn.Module):
    """Hidden ``(N, d)`` -> log-probabilities over the vocabulary, computed by clusters.

    ``nll(h, target)`` is the training path (only the target's cluster is scored per row);
    ``log_prob(h)`` returns the full normalised ``(N, V)`` distribution. ``embedding``: an
    ``AdaptiveEmbedding`` to tie the word vectors and projections with."""

    def __init__(
        self,
        vocab_size: int,
        d: int,
        cutoffs: tuple[int, ...],
        div_value: float = 4.0,
        embedding: AdaptiveEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.bounds = _clusters(vocab_size, cutoffs)
        self.vocab_size = vocab_size
        n_tail = len(self.bounds) - 2
        self.dims = [max(1, int(d // div_value**i)) for i in range(n_tail + 1)]
        self.tied = embedding is not None
        if embedding is not None:
            if embedding.bounds != self.bounds or embedding.dims != self.dims or embedding.d != d:
                raise ValueError(
                    "tie_weights: the adaptive embedding's clusters/dims differ from the softmax's "
                    f"({embedding.bounds}/{embedding.dims} vs {self.bounds}/{self.dims})."
                )
            self.embedding = embedding
        else:
            self.weights = nn.ParameterList(
                nn.Parameter(torch.empty(hi - lo, di).normal_(0, di**-0.5))
                for lo, hi, di in zip(self.bounds[:-1], self.bounds[1:], self.dims, strict=True)
            )
            self.projs = nn.ParameterList(
                nn.Parameter(torch.empty(d, di).normal_(0, d**-0.5)) for di in self.dims
            )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.zeros(hi - lo))
            for lo, hi in zip(self.bounds[:-1], self.bounds[1:], strict=True)
        )
        self.cluster_weight = nn.Parameter(torch.zeros(n_tail, d))
        self.cluster_bias = nn.Parameter(torch.zeros(n_tail))

    def _wp(self, i: int) -> tuple[Tensor, Tensor]:
        if self.tied:
            return self.embedding.tables[i].weight, self.embedding.projs[i]
        return self.weights[i], self.projs[i]

    def _cluster_logits(self, h: Tensor, i: int) -> Tensor:
        w, p = self._wp(i)
        return F.linear(h @ p, w, self.biases[i])

    def _head_logprob(self, h: Tensor) -> Tensor:
        head = torch.cat(
            [self._cluster_logits(h, 0), F.linear(h, self.cluster_weight, self.cluster_bias)], -1
        )
        return head.log_softmax(-1)

    def log_prob(self, h: Tensor) -> Tensor:
        """Normalised log-probabilities ``(..., V)``."""
        shape = h.shape[:-1]
        h = h.reshape(-1, h.shape[-1])
        head = self._head_logprob(h)
        n0 = self.bounds[1]
        parts = [head[:, :n0]]
        for i in range(1, len(self.bounds) - 1):
            parts.append(head[:, n0 + i - 1 : n0 + i] + self._cluster_logits(h, i).log_softmax(-1))
        return torch.cat(parts, -1).view(*shape, self.vocab_size)

    def nll(self, h: Tensor, target: Tensor) -> Tensor:
        """Negative log-likelihood of ``target`` ``(...)`` under ``h`` ``(..., d)``; targets equal
        to -100 are ignored (NLL 0)."""
        shape = target.shape
        h, t = h.reshape(-1, h.shape[-1]), target.reshape(-1)
        head = self._head_logprob(h)
        n0 = self.bounds[1]
        out = torch.zeros(t.shape, device=h.device, dtype=head.dtype)
        in_head = (t >= 0) & (t < n0)
        rows = in_head.nonzero(as_tuple=True)[0]
        out = out.index_put((rows,), -head[rows, t[rows]])
        for i in range(1, len(self.bounds) - 1):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            rows = ((t >= lo) & (t < hi)).nonzero(as_tuple=True)[0]
            if not rows.numel():
                continue
            lp = self._cluster_logits(h[rows], i).log_softmax(-1)
            val = head[rows, n0 + i - 1] + lp.gather(1, (t[rows] - lo).unsqueeze(1)).squeeze(1)
            out = out.index_put((rows,), -val)
        return out.view(shape)
