"""Text generation from a trained sequence model: token-by-token decoding with the model's memory
as the cache (each new position is one equilibrium solve against the cached equilibria of the
positions before it), temperature / top-k / top-p sampling, NFE and tokens/s."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

logger = logging.getLogger("deepeq")


@dataclass(frozen=True)
class Generated:
    """What ``generate`` returns.

    Attributes:
        tokens: ``(N,)`` the generated token ids (the prompt excluded).
        logits: ``(N, vocab)`` the scores each token was drawn from (float32, before
            temperature / filtering); with ``keep_logits=False`` empty.
        nfe: calls of the equilibrium function f per generated token (0 for explicit models).
        residual: the largest relative residual of the equilibrium solves.
        seconds: wall time of the decoding loop (the prompt's solve excluded).
        prompt_seconds: wall time of the prompt's solve.
    """

    tokens: Tensor
    logits: Tensor = field(repr=False)
    nfe: list[int]
    residual: float
    seconds: float
    prompt_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from scores ``(vocab,)``: greedy when ``temperature == 0``; else softmax of
    ``logits / temperature`` restricted to the ``top_k`` most likely tokens (0: all) and to the
    smallest set whose probability reaches ``top_p`` (nucleus sampling; 1: all)."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"temperature must be >= 0 (0: greedy), top_k >= 0 (0: off), top_p in (0, 1]; got "
            f"temperature={temperature}, top_k={top_k}, top_p={top_p}."
        )
    logits = logits.float()
    if temperature == 0:
        return int(logits.argmax())
    scores = logits / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1:
        p, order = probs.sort(descending=True)
        drop = p.cumsum(0) - p >= top_p  # tokens after the nucleus is full
        probs = probs.scatter(0, order, p.masked_fill(drop, 0.0))
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: Tensor,
    tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    window: int | None = None,
    warm_start: bool = True,
    keep_logits: bool = True,
) -> Generated:
    """Decode ``tokens`` tokens after ``prompt`` ``(P,)`` (int64 ids, P >= 1), one at a time.

    The prompt is solved as one segment; then each new token is one call of the model on a
    1-token segment whose memory holds the last ``window`` positions (default: the model's
    ``mem_len``, at least 64) — for a DEQ the cached equilibria, so a new position is one
    equilibrium solve against them, warm-started (``warm_start``) from the previous position's
    equilibrium. By causality this gives the tokens (and, to the solver tolerance, the scores)
    of recomputing the whole prefix at every step, while the prefix fits in the window. The
    model is put in eval mode (its eval solver) for the call and restored afterwards.

    Raises:
        ValueError: an empty prompt, a prompt id outside the vocabulary, bad sampling options.
        TypeError: a model that is not a registered sequence (language) model.
    """
    if not hasattr(model, "config") or not hasattr(model.config, "vocab_size"):
        raise TypeError(
            f"generate needs a sequence (language) model from deepeq.models (deq_*, transformer_*, "
            f"trellisnet_*, lstm/gru/tcn); got {type(model).__name__}."
        )
    prompt = torch.as_tensor(prompt, dtype=torch.long).flatten()
    V = model.config.vocab_size
    if prompt.numel() == 0:
        raise ValueError("the prompt is empty: give at least one token to start from.")
    if int(prompt.min()) < 0 or int(prompt.max()) >= V:
        raise ValueError(f"prompt ids must be in [0, {V}); got {prompt.min()}..{prompt.max()}.")
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0; got {tokens}.")
    sample_next(torch.zeros(2), temperature=temperature, top_k=top_k, top_p=top_p)  # checks
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if window is None:
        window = max(getattr(model.config, "mem_len", 0), 64)
    from .models import SequenceModel, equilibrium_layer

    scope = (
        model.memory_window(window)
        if isinstance(model, SequenceModel)
        else contextlib.nullcontext()
    )
    deq_core = equilibrium_layer(model) is not None
    out, scores, nfe, residual = [], [], [], 0.0
    try:
        with scope:
            t0 = time.perf_counter()
            logits, state, sols = model(prompt.to(device).unsqueeze(0))
            prompt_s = time.perf_counter() - t0
            residual = max([residual] + [float(s.stats.rel_residual.max()) for s in sols])
            last = logits[0, -1]
            z_prev = sols[-1].value[:, -1:] if (deq_core and sols) else None
            t0 = time.perf_counter()
            for _ in range(tokens):
                tok = sample_next(
                    last, temperature=temperature, top_k=top_k, top_p=top_p, generator=g
                )
                out.append(tok)
                if keep_logits:
                    scores.append(last.float().cpu())
                x = torch.tensor([[tok]], device=device)
                kw = {"z0": z_prev} if (warm_start and z_prev is not None) else {}
                logits, state, sols = model(x, state, **kw)
                last = logits[0, -1]
                nfe.append(sum(s.stats.nfe for s in sols))
                if sols:
                    residual = max(residual, float(sols[-1].stats.rel_residual.max()))
                    if deq_core:
                        z_prev = sols[-1].value[:, -1:]
            seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
    logits_out = torch.stack(scores) if scores else torch.empty(0, V)
    return Generated(
        tokens=torch.tensor(out, dtype=torch.long),
        logits=logits_out,
        nfe=nfe,
        residual=residual,
        seconds=seconds,
        prompt_seconds=prompt_s,
    )


def encode_prompt(text: str, itos: tuple[str, ...], level: str) -> Tensor:
    """A prompt string -> ids with a run's vocabulary: words (whitespace-separated) or, at char
    level, characters with spaces as ``_`` (the corpus's convention); a line break ends a line
    (``<eos>``). Words not in the vocabulary become ``<unk>`` with a warning."""
    from .data.text import EOS, UNK

    lines = text.split("\n")
    toks: list[str] = []
    for i, line in enumerate(lines):
        words = line.split()
        toks += list("_".join(words)) if level == "char" else words
        if i < len(lines) - 1:
            toks.append(EOS)
    if all(t == EOS for t in toks):
        raise ValueError(
            "the prompt is empty: give at least one word (or character) to start from."
        )
    stoi = {t: i for i, t in enumerate(itos)}
    unknown = sorted({t for t in toks if t not in stoi})
    if unknown:
        if UNK not in stoi:
            raise ValueError(
                f"prompt tokens {unknown[:10]} are not in the vocabulary, which has no {UNK}."
            )
        logger.warning(
            "prompt: %d token(s) not in the vocabulary mapped to %s: %s",
            len(unknown), UNK, unknown[:10],
        )  # fmt: skip
    return torch.tensor([stoi.get(t, stoi.get(UNK, 0)) for t in toks], dtype=torch.long)


def decode_ids(ids: Tensor, itos: tuple[str, ...], level: str) -> str:
    """Ids -> text: words joined by spaces (char level: characters, ``_`` as a space);
    ``<eos>`` as a line break."""
    from .data.text import EOS

    toks = [itos[i] for i in ids.tolist()]
    if level == "char":
        return "".join("\n" if t == EOS else (" " if t == "_" else t) for t in toks)
    return " ".join(toks).replace(f" {EOS} ", "\n").replace(EOS, "\n")
