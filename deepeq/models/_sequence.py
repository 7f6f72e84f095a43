"""The sequence-model wrapper shared by DEQ-Transformer and DEQ-TrellisNet: embedding, input
injection, an equilibrium (or explicit) core, memory and the output head.

Calling protocol, identical for every registered sequence model, DEQ or not::

    logits, state, solutions = model(tokens, state=None)

``tokens`` ``(B, T)`` int64; ``logits`` ``(B, T, vocab)``; ``state`` the memory to pass with
the next segment of the same streams (None at the start); ``solutions`` the list of
``deepeq.Solution`` records of this call (empty for explicit cores).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._solution import Solution
from ..nn.adaptive import AdaptiveEmbedding, AdaptiveSoftmax
from ..nn.layers import count_parameters
from ..regularization.norm import weight_norm
from ._core import CORES, make_core
from ._protocol import EquilibriumModel
from ._solve import SolveSpec


@dataclass(frozen=True, kw_only=True)
class SequenceConfig:
    """Fields shared by the sequence families (each family adds its own)."""

    vocab_size: int = 10  # tokens of the vocabulary
    d_embed: int = 32  # width of the token embedding
    d_model: int = 32  # width of the equilibrium state z (per position)
    core: Literal["deq", "tied", "untied"] = (
        "deq"  # equilibrium, weight-tied L layers, untied L layers
    )
    depth: int | None = None  # L of the explicit twins (default: solve.f_max_steps)
    mem_len: int = 0  # positions of memory carried to the next segment
    dropout: float = 0.0  # variational dropout inside f (one mask per forward)
    weight_norm: bool = False  # weight normalisation of the linear/conv layers of f
    tie_weights: bool = (
        False  # output head shares the embedding matrix (needs d_embed == head input)
    )
    # Equilibrium solving (deepeq.models.SolveSpec; the papers: 30 forward steps in training,
    # more at evaluation). Causal by default: no output ever depends on later tokens.
    solve: SolveSpec = field(default_factory=lambda: SolveSpec(causal=True))
    pretrain_depth: int = 2  # k of the shallow-pretraining warm-up (k-layer weight-tied unroll)
    pretrain_steps: int = 0  # training steps run in pretraining mode before equilibrium training
    subseq_len: int = 0  # solve segments in chunks of this many positions (0: whole segment)
    emb_dropout: float = 0.0  # dropout on the embedding output and on the head input
    # Adaptive input embedding + adaptive softmax (large vocabularies; seeds: WikiText-103 with
    # cut-offs 20000, 40000, 200000). Words must be ordered by decreasing frequency.
    adaptive: bool = False
    cutoffs: tuple[int, ...] = ()  # adaptive: token ids where each cluster begins
    div_value: float = 4.0  # adaptive: cluster i has width d_embed / div_value**i

    def __post_init__(self) -> None:
        self.validate()  # a config that exists is valid: checked once, where it is made

    def validate(self) -> None:
        make_core(self.core, CORES)
        for name in (
            "vocab_size",
            "d_embed",
            "d_model",
            "pretrain_depth",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1; got {v!r}.")
        for name in ("mem_len", "subseq_len", "pretrain_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0; got {v!r}.")
        for name in ("dropout", "emb_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)!r}.")
        if self.adaptive and not self.cutoffs:
            raise ValueError(
                "adaptive=True needs cutoffs (increasing word ranks, e.g. [20000, 40000, 200000])."
            )


class SequenceModel(EquilibriumModel):
    """Embedding -> injection -> core -> head. Families supply ``make_layer(size)``,
    ``make_injection(size)`` builders, the state width and the readout."""

    family: str = "sequence"

    def __init__(self, config: SequenceConfig):
        super().__init__()
        self.config = c = config
        self.core = make_core(c.core, CORES)
        if c.adaptive:
            self.embed = AdaptiveEmbedding(c.vocab_size, c.d_embed, tuple(c.cutoffs), c.div_value)
        else:
            self.embed = nn.Embedding(c.vocab_size, c.d_embed)
        self.emb_drop = nn.Dropout(c.emb_dropout)
        self.depth = c.depth if c.depth is not None else c.solve.f_max_steps
        self.pretraining = False
        base = self.default_size()
        if self.core.stacked:
            self.size = self.matched_size()
            self.blocks = nn.ModuleList(self.make_layer(self.size) for _ in range(self.depth))
            self.injections = nn.ModuleList(
                self.make_injection(self.size) for _ in range(self.depth)
            )
            self.stem, self.head_in = self.untied_io(self.size)
        else:
            self.size = base
            self.f = self.make_layer(base)
            self.inject = self.make_injection(base)
        if c.tie_weights and self.readout_dim(base) != c.d_embed:
            raise ValueError(
                f"tie_weights needs the head input ({self.readout_dim(base)}) to equal d_embed ({c.d_embed})."
            )
        if c.adaptive:
            self.head = AdaptiveSoftmax(
                c.vocab_size,
                self.readout_dim(base),
                tuple(c.cutoffs),
                c.div_value,
                embedding=self.embed if c.tie_weights else None,
            )
        else:
            self.head = nn.Linear(self.readout_dim(base), c.vocab_size)
            if c.tie_weights:
                # N(0, 1) rows would make the logits of a unit-variance readout ~sqrt(d) wide
                nn.init.normal_(self.embed.weight, std=c.d_embed**-0.5)
                nn.init.zeros_(self.head.bias)
                self.head.weight = self.embed.weight
        if c.weight_norm:
            for m in list(self.core_modules()):
                for sub in m.modules():
                    if isinstance(sub, nn.Linear | nn.Conv1d) and "weight" in sub._parameters:
                        weight_norm(sub)

    # --- family hooks (a "size" is whatever fixes a layer's dimensions) ----------------------
    def default_size(self) -> Any:
        return self.config.d_model

    def candidate_sizes(self):
        """Sizes tried when matching the untied stack's parameters to the DEQ's."""
        return range(1, self.config.d_model + 1)

    def make_layer(self, size: Any) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def make_injection(self, size: Any) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dim(self, size: Any) -> int:
        return size

    def readout_dim(self, size: Any) -> int:
        return size

    def readout(self, z: Tensor) -> Tensor:
        return z

    def context_dim(self, size: Any) -> int:
        """Width of one context (memory) position; by default the state width."""
        return self.state_dim(size)

    def context_entry(self, z: Tensor, inj: Tensor, x: Tensor) -> Tensor:
        """What a solved position contributes to the context of later positions, given its state
        ``z``, its injection ``inj`` and its embedding ``x``."""
        return z

    def layer_input(self, f: nn.Module, inj: Tensor, ctx: Tensor) -> Any:
        """The ``x`` of ``f(z, x)`` for a segment with injection ``inj`` and context ``ctx``;
        computed once per solve, so a family can precompute there whatever does not depend on z
        (the Transformer: the memory's keys and values)."""
        return (inj, ctx)

    def context_len(self) -> int:
        """Positions of context the layer needs before a segment (at least)."""
        return 0

    # --- helpers ----------------------------------------------------------------------------
    def core_modules(self):
        if self.core.stacked:
            return [self.stem, self.blocks, self.injections, self.head_in]
        return [self.f, self.inject]

    def non_embedding_parameters(self) -> int:
        """Parameters of injection + core (+ the untied stack's projection), as the papers count
        "non-embedding" (embedding and softmax excluded)."""
        return sum(count_parameters(m) for m in self.core_modules())

    def untied_io(self, size: Any) -> tuple[nn.Module, nn.Module]:
        """The untied stack's input and output projections at layer size ``size``: the stem
        ``z_0 = W_in x`` (embedding -> state: the first layer reads the input, as in an explicit
        network, so its z-path weights learn) and ``head_in`` (readout -> the head's width)."""
        base = self.default_size()
        return (
            nn.Linear(self.config.d_embed, self.state_dim(size)),
            nn.Linear(self.readout_dim(size), self.readout_dim(base)),
        )

    def _untied_io_parameters(self, size: Any) -> int:
        return sum(count_parameters(m) for m in self.untied_io(size))

    def matched_size(self) -> Any:
        """Layer size of the untied L-layer stack whose non-embedding parameters (layers,
        injections, stem and head projection) match the DEQ's (injection + f) within 5%: the
        widest acceptable candidate. Counted on the meta device."""
        base = self.default_size()
        with torch.device("meta"):
            target = count_parameters(self.make_layer(base)) + count_parameters(
                self.make_injection(base)
            )
            best, best_err, widest = None, None, None
            for size in self.candidate_sizes():
                n = self.depth * (
                    count_parameters(self.make_layer(size))
                    + count_parameters(self.make_injection(size))
                )
                n += self._untied_io_parameters(size)  # stem and head projection
                err = abs(n - target) / target
                if best_err is None or err < best_err:
                    best, best_err = size, err
                if err <= 0.05:
                    widest = size  # candidates come in increasing width
        if widest is None:
            raise ValueError(
                f"No untied layer size gives non-embedding parameters within 5% of the DEQ's "
                f"({target}) at depth {self.depth} (closest: {best_err:.1%} at {best}); change "
                f"depth or sizes."
            )
        return widest

    def ffn_matched_sizes(self, widths) -> list[tuple[int, int]]:
        """For each width, the FFN width that makes an untied stack of ``depth`` layers (plus
        its stem and output projection) match the DEQ's injection + layer parameters: parameters are
        linear in the FFN width, so two counts on the meta device solve it. For families whose
        layer size is ``(width, d_ff)``."""
        base = self.default_size()
        with torch.device("meta"):

            def one(size) -> int:
                return count_parameters(self.make_layer(size)) + count_parameters(
                    self.make_injection(size)
                )

            target = one(base)
            out = []
            for width in widths:
                n1 = self.depth * one((width, 1)) + self._untied_io_parameters((width, 1))
                n2 = self.depth * one((width, 2)) + self._untied_io_parameters((width, 2))
                out.append((width, round(1 + (target - n1) / (n2 - n1))))
        return out

    def set_pretraining(self, on: bool) -> None:
        """Shallow-pretraining warm-up: when on, the DEQ core runs as a ``pretrain_depth``-layer
        weight-tied unroll of its own f (seeds: a few thousand steps before equilibrium training)."""
        self.pretraining = bool(on)

    def equilibrium_problem(
        self, batch: int, generator: torch.Generator, length: int = 0, inputs: Tensor | None = None
    ) -> tuple[nn.Module, tuple, Tensor]:
        """``(f, args, z0)`` of the layer's equilibrium on ``inputs`` (tokens ``(B, T)``) or on
        ``batch`` random token sequences of ``length`` drawn from ``generator``; no memory."""
        if self.core.stacked:
            raise ValueError("an untied stack has no single layer f to solve for an equilibrium.")
        tokens = (
            inputs
            if inputs is not None
            else torch.randint(0, self.config.vocab_size, (batch, length), generator=generator)
        )
        B, T = tokens.shape
        x = self.embed(tokens)
        ctx = self.initial_context(B, self.size, x.device, x.dtype)
        inj = self.inject(x, ctx)
        x = self.layer_input(self.f, inj, ctx)
        return self.f, (x,), torch.zeros(B, T, self.state_dim(self.size), device=inj.device)

    # --- forward ----------------------------------------------------------------------------
    def initial_context(self, B: int, size: Any, device, dtype) -> Tensor:
        return torch.zeros(
            B, self.context_len(), self.context_dim(size), device=device, dtype=dtype
        )

    def forward(
        self,
        tokens: Tensor,
        state: Any = None,
        *,
        targets: Tensor | None = None,
        cache_keys: Tensor | None = None,
        z0: Tensor | None = None,
    ) -> tuple[Tensor, Any, list[Solution]]:
        """``(logits, state, solutions)``; with ``targets`` ``(B, T)`` the first element is the
        per-token negative log-likelihood ``(B, T)`` instead (targets -100 ignored, NLL 0): the
        cheap path for adaptive softmax, which never forms the full ``(B, T, V)`` scores.
        ``cache_keys`` ``(B,)``: segment ids for the fixed-point cache ``fp_cache``, if any.
        ``z0`` ``(B, T, state)``: the equilibrium solve's start (default zeros; DEQ core only,
        e.g. the previous position's equilibrium when decoding token by token)."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"tokens must be an int64 tensor (B, T); got {tuple(tokens.shape)} {tokens.dtype}."
            )
        if targets is not None and targets.shape != tokens.shape:
            raise ValueError(
                f"targets must have the shape of tokens {tuple(tokens.shape)}; got {tuple(targets.shape)}."
            )
        z, state, sols = self._core(tokens, state, cache_keys, z0)
        out = self.logits(z) if targets is None else self.nll(z, targets)
        return out, state, sols

    def _core(
        self, tokens: Tensor, state: Any, cache_keys: Tensor | None = None, z0: Tensor | None = None
    ) -> tuple[Tensor, Any, list[Solution]]:
        x = self.emb_drop(self.embed(tokens))  # (B, T, E)
        B, T = x.shape[:2]
        sols: list[Solution] = []
        zeros = torch.zeros(B, T, self.state_dim(self.size), device=x.device, dtype=x.dtype)
        if z0 is not None:
            if z0.shape != zeros.shape:
                raise ValueError(
                    f"z0 must have the shape of the equilibrium {tuple(zeros.shape)}; got "
                    f"{tuple(z0.shape)}."
                )
            start = z0.to(zeros.dtype)
        else:
            start = zeros
        if not self.core.solves or self.pretraining:
            # One memory per layer: the INPUT of that layer at the remembered positions (as in
            # Transformer-XL), so feeding a stream in segments equals one pass over it.
            depth = self.config.pretrain_depth if self.core.solves else self.depth
            ctxs = state if isinstance(state, list) else [state] * depth
            if len(ctxs) != depth:
                raise ValueError(
                    f"state holds {len(ctxs)} layer memories; this model has {depth} layers."
                )
            # the untied stack starts from its stem's projection of the input; the weight-tied
            # unroll from zeros, as the equilibrium solve does
            z, new_state = (self.stem(x) if self.core.stacked else zeros), []
            for layer in range(depth):
                ctx = (
                    ctxs[layer]
                    if ctxs[layer] is not None
                    else self.initial_context(B, self.size, x.device, x.dtype)
                )
                if self.core.stacked:
                    f, inject = self.blocks[layer], self.injections[layer]
                else:
                    f, inject = self.f, self.inject
                inj = inject(x, ctx)
                new_state.append(self.next_context(ctx, self.context_entry(z, inj, x)))
                z = f(z, self.layer_input(f, inj, ctx))
            return z, new_state, sols
        if isinstance(state, list):  # leaving pretraining mode: the last layer's memory
            state = state[-1]
        ctx = state if state is not None else self.initial_context(B, self.size, x.device, x.dtype)
        inj = self.inject(x, ctx)
        if self.config.subseq_len and self.config.subseq_len < T:
            z, sols = self.solve_in_chunks(inj, x, ctx, start, cache_keys)
        else:
            z, sol = self.solve_equilibrium(self.layer_input(self.f, inj, ctx), start, cache_keys)
            sols.append(sol)
        return z, self.next_context(ctx, self.context_entry(z, inj, x)), sols

    def _head_input(self, z: Tensor) -> Tensor:
        h = self.readout(z)
        if self.core.stacked:
            h = self.head_in(h)
        return self.emb_drop(h)

    def logits(self, z: Tensor) -> Tensor:
        """Output head on the core's final state ``(B, T, state) -> (B, T, vocab)`` (normalised
        log-probabilities with the adaptive softmax)."""
        h = self._head_input(z)
        return self.head.log_prob(h) if self.config.adaptive else self.head(h)

    def nll(self, z: Tensor, targets: Tensor) -> Tensor:
        """Per-token negative log-likelihood ``(B, T)``; targets -100 are ignored (0)."""
        h = self._head_input(z)
        if self.config.adaptive:
            return self.head.nll(h, targets)
        logits = self.head(h)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        ).view(targets.shape)

    def head_loss(self, z: Tensor, targets: Tensor) -> Tensor:
        """The training loss of a core state ``z`` (the equilibrium or a supervised iterate of
        fixed-point correction): per-token NLL ``(B, T)``."""
        return self.nll(z, targets)

    @contextlib.contextmanager
    def memory_window(self, positions: int):
        """Within the block the memory carried between calls keeps the last ``positions``
        positions (at least the model's own need) instead of ``mem_len``: token-by-token
        decoding then attends to a whole window of cached equilibria."""
        old = self._memory_window
        self._memory_window = max(int(positions), self.context_len())
        try:
            yield self
        finally:
            self._memory_window = old

    _memory_window: int | None = None

    def next_context(self, ctx: Tensor, entry: Tensor) -> Tensor:
        keep = max(self.config.mem_len, self.context_len())
        if self._memory_window is not None:
            keep = self._memory_window
        return torch.cat([ctx, entry], dim=1)[:, -keep:].detach() if keep else ctx[:, :0]

    def solve_in_chunks(
        self, inj: Tensor, x: Tensor, ctx: Tensor, z0: Tensor, cache_keys: Tensor | None = None
    ) -> tuple[Tensor, list[Solution]]:
        """Subsequence solving: chunk c is solved with the context and the equilibria of chunks
        before it as fixed context. By causality this equals the whole-segment equilibrium (to
        the solver tolerance); gradients flow into earlier chunks through the context (not
        detached), so the backward pass is the full implicit gradient too. ``x``: the segment's
        embeddings (``inj`` was computed from them)."""
        S = self.config.subseq_len
        zs, outs, sols = [], [], []
        chunks = -(-inj.shape[1] // S)
        for c, s in enumerate(range(0, inj.shape[1], S)):
            context = torch.cat([ctx, *zs], dim=1)
            args = self.layer_input(self.f, inj[:, s : s + S], context)
            keys = None if cache_keys is None else cache_keys * chunks + c  # one id per chunk
            z, sol = self.solve_equilibrium(args, z0[:, s : s + S], keys)
            zs.append(self.context_entry(z, inj[:, s : s + S], x[:, s : s + S]))
            outs.append(z)
            sols.append(sol)
        return torch.cat(outs, dim=1), sols
