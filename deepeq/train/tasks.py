"""Tasks: what the training loop feeds a model, how it scores it, and how it evaluates it.

Every task exposes the same small surface, so ``train(cfg)`` is one loop for all of them:

* ``model_kwargs()``: what the registry needs to size the model (vocabulary, classes, channels);
* ``train_batch(step, rank, world)`` -> ``(inputs, targets, fresh)``: a pure function of the step
  (exact resume without a data-loader state); ``fresh`` says the model's memory starts anew;
* ``loss(net, inputs, targets, state)`` -> ``(mean loss, new state, solutions)``;
* ``evaluate(model, splits)`` -> metrics named ``<split>_<metric>`` (``eval_fields`` lists them),
  and for equilibrium models the convergence of the evaluation solves (``SOLVE_FIELDS``);
* ``select``: the metric minimised for the best checkpoint; ``final_splits``: evaluated at the end.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import TrainConfig

logger = logging.getLogger("deepeq")

#: A language-model run warns when the parameters of its vocabulary (embedding and softmax: the
#: model's parameters outside ``non_embedding_parameters()``) exceed this multiple of the others.
#: The README job (PTB, 10k words, DEQ-Transformer small) has 4.9x, every shipped config <= 6.5x;
#: a 111k-word vocabulary on the same model 54x (about 4x the time per step).
VOCAB_PARAMETER_RATIO = 20.0


def batch_indices(cfg: TrainConfig, n: int, step: int) -> Tensor:
    """The samples of ``step``: epoch-wise permutations seeded by (seed, epoch), so any step's batch
    is a pure function of the step (exact resume without saving a data-loader state)."""
    per_epoch = max(1, n // cfg.batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
    return perm[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]


#: Per split, the evaluation solves of an equilibrium model: the share of solved samples that met
#: the evaluation tolerance (a sequence sample: every position of a segment; an image: the
#: whole multi-resolution state), the largest relative residual and the mean NFE per batch.
SOLVE_FIELDS = ("fwd_converged", "fwd_res_max", "fwd_nfe")


class SolveTally:
    """Accumulates the forward solves of an evaluation pass (``add(sols)`` per model call)."""

    def __init__(self):
        self.samples = self.converged = self.calls = self.nfe = 0
        self.res_max = 0.0

    def add(self, sols) -> None:
        if not sols:
            return
        self.calls += 1
        for s in sols:
            st = s.stats
            self.samples += st.converged.numel()
            self.converged += int(st.converged.sum())
            self.res_max = max(self.res_max, float(st.rel_residual.max()))
            self.nfe += st.nfe

    def metrics(self, split: str) -> dict:
        """``<split>_fwd_converged`` / ``_fwd_res_max`` / ``_fwd_nfe``; empty without solves."""
        if not self.samples:
            return {}
        return {
            f"{split}_fwd_converged": self.converged / self.samples,
            f"{split}_fwd_res_max": self.res_max,
            f"{split}_fwd_nfe": self.nfe / self.calls,
        }


def solve_fields(splits: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{s}_{m}" for s in splits for m in SOLVE_FIELDS)


@dataclass(frozen=True)
class Throughput:
    """What a task's throughput counts: its ``metrics.csv`` column and the items of a batch of
    inputs (``per_element``: every element, e.g. tokens; else every row, e.g. images)."""

    column: str
    per_element: bool

    def items(self, inputs: Tensor) -> int:
        return inputs.numel() if self.per_element else inputs.shape[0]


TOKENS = Throughput("tokens_per_s", per_element=True)
IMAGES = Throughput("images_per_s", per_element=False)


class Task:
    throughput: Throughput = TOKENS
    eval_fields: tuple[str, ...] = ()
    periodic_splits: tuple[str, ...] = ("test",)  # evaluated every eval_every steps
    final_splits: tuple[str, ...] = ("test",)  # evaluated at the last step
    select = "test_loss"
    metric = "test_acc"  # the headline metric (analysis: metric vs NFE)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    @property
    def steps_per_epoch(self) -> int:
        """Training steps per pass over the training data (the epoch of batch_indices)."""
        return max(1, self.xtr.shape[0] // self.cfg.batch_size)

    def model_kwargs(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def report(self, model) -> None:
        """Log what the run trains (called once, by the process that logs, before training)."""
        logger.info("model: %s", _size(model))

    def train_batch(self, step: int, rank: int, world: int) -> tuple[Tensor, Tensor, bool]:
        raise NotImplementedError  # pragma: no cover

    def batch_keys(self, step: int, rank: int, world: int) -> Tensor:
        """Example ids of this process's training batch (for the fixed-point cache): dataset
        indices, aligned with ``train_batch``."""
        return batch_indices(self.cfg, self.xtr.shape[0], step)[rank::world]

    def loss(self, net, x: Tensor, y: Tensor, state: Any, keys: Tensor | None = None):
        kw = {} if keys is None else {"cache_keys": keys}
        logits, state, sols = net(x, **kw)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), state, sols

    def evaluate(self, model, splits: tuple[str, ...] | None = None) -> dict:
        """Metrics of ``model`` on ``splits`` (default: the task's final splits), in eval mode
        without autograd; the model's mode is restored afterwards."""
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self._evaluate(model, self.final_splits if splits is None else splits)
        finally:
            model.train(was)

    def _evaluate(self, model, splits: tuple[str, ...]) -> dict:
        raise NotImplementedError  # pragma: no cover

    def analysis_inputs(self, n: int) -> Tensor | None:
        """``n`` inputs of the test split ready for the model, for the analysis studies; None
        where the studies draw their own (sequence tasks: random tokens)."""
        return None


class CopyMemoryTask(Task):
    """Copy memory (Bai et al. 2019, appendix F); test loss over all positions, accuracy on the
    last 10."""

    eval_fields = ("test_loss", "test_acc", *solve_fields(("test",)))

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        from ..data.copy_memory import VOCAB, copy_memory

        d = cfg.data
        self.vocab = VOCAB
        self.xtr, self.ytr = copy_memory(d.n_train, d.seq_len, seed=d.seed)
        self.xte, self.yte = copy_memory(d.n_test, d.seq_len, seed=d.seed + 1)

    def model_kwargs(self) -> dict:
        return {"vocab_size": self.vocab}

    def train_batch(self, step, rank, world):
        idx = batch_indices(self.cfg, self.xtr.shape[0], step)[rank::world]
        return self.xtr[idx], self.ytr[idx], True

    def _evaluate(self, model, splits) -> dict:
        cfg, (x, y) = self.cfg, (self.xte, self.yte)
        total, correct, count, tally = 0.0, 0, 0, SolveTally()
        for i in range(0, x.shape[0], cfg.eval_batch_size):
            xb = x[i : i + cfg.eval_batch_size].to(cfg.device)
            yb = y[i : i + cfg.eval_batch_size].to(cfg.device)
            logits, _, sols = model(xb)
            tally.add(sols)
            total += F.cross_entropy(
                logits.reshape(-1, self.vocab), yb.reshape(-1), reduction="sum"
            ).item()
            correct += (logits[:, -10:].argmax(-1) == yb[:, -10:]).sum().item()
            count += yb.numel()
        out = {"test_loss": total / count, "test_acc": correct / (x.shape[0] * 10)}
        return {**out, **tally.metrics("test")}


class LanguageModelTask(Task):
    """Language modelling on contiguous streams (PTB, WikiText, any corpus).

    Training: the train stream is cut into ``batch_size`` rows; step ``s`` reads segment
    ``s mod n_segments`` of every row (``seq_len`` tokens, targets shifted by one), carrying the
    model's memory across segments and resetting it at each epoch start. Evaluation: the whole
    valid/test stream, every token predicted once (``eval_batch_size`` rows, segments of
    ``eval_seq_len``), memory carried; loss in nats/token, perplexity, and bits per character at
    character level."""

    periodic_splits = ("valid",)
    final_splits = ("valid", "test")
    select = "valid_loss"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        from ..data.text import batchify, load_corpus

        d = cfg.data
        cache = None if d.cache_dir == "~" else d.cache_dir
        self.corpus = load_corpus(
            d.corpus,
            d.path,
            level=d.level,
            max_vocab=d.max_vocab,
            valid_fraction=d.valid_fraction,
            test_fraction=d.test_fraction,
            cache_dir=cache,
            bpe_vocab=d.bpe_vocab,
        )
        self.char = self.corpus.level == "char"
        self.bpe = self.corpus.level == "bpe"
        self.metric = "test_bpc" if self.char else "test_ppl"
        units = ("bpc",) if self.char else ("ppl", "word_ppl", "bpc") if self.bpe else ("ppl",)
        self.eval_fields = tuple(f"{s}_{m}" for s in ("valid", "test") for m in ("loss", *units))
        self.eval_fields += solve_fields(("valid", "test"))
        self.rows = batchify(self.corpus.train, cfg.batch_size)
        self.segments = (self.rows.shape[1] - 1) // d.seq_len
        if self.segments < 1:
            raise ValueError(
                f"data.seq_len={d.seq_len} is longer than a training row "
                f"({self.rows.shape[1] - 1} tokens at batch_size={cfg.batch_size}); lower one of them."
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.segments

    def model_kwargs(self) -> dict:
        return {"vocab_size": self.corpus.vocab_size}

    def report(self, model) -> None:
        """Log the corpus and vocabulary sizes and the model's; warn when the vocabulary's
        parameters dominate the model (``VOCAB_PARAMETER_RATIO``)."""
        c, d = self.corpus, self.cfg.data
        n = [c.split(s).numel() for s in ("train", "valid", "test")]
        rule = ""
        if c.level == "word" and d.corpus == "text":
            rule = f" (data.max_vocab = {d.max_vocab}" + (
                ": every word of the training split)" if not d.max_vocab else ")"
            )
        logger.info(
            "data: %s corpus %r (%s level): %s train / %s valid / %s test tokens, vocabulary %s%s",
            d.corpus, c.name, c.level, *(f"{k:,}" for k in n), f"{c.vocab_size:,}", rule,
        )  # fmt: skip
        super().report(model)
        warning = vocabulary_warning(model, c.vocab_size, d.corpus, c.level)
        if warning:
            logger.warning(warning)

    def train_batch(self, step, rank, world):
        T = self.cfg.data.seq_len
        k = step % self.segments
        rows = self.rows[rank::world]
        return rows[:, k * T : (k + 1) * T], rows[:, k * T + 1 : (k + 1) * T + 1], k == 0

    def batch_keys(self, step, rank, world):
        """(row, segment) ids: ``row * segments + segment`` for this process's rows."""
        rows = torch.arange(self.rows.shape[0])[rank::world]
        return rows * self.segments + step % self.segments

    def loss(self, net, x, y, state, keys=None):
        kw = {} if keys is None else {"cache_keys": keys}
        nll, state, sols = net(x, state, targets=y, **kw)
        return nll.mean(), state, sols

    def _evaluate(self, model, splits) -> dict:
        from ..data.text import eval_rows

        cfg = self.cfg
        T = cfg.data.eval_seq_len or cfg.data.seq_len
        out = {}
        for split in splits:
            stream = self.corpus.split(split)
            if cfg.data.eval_limit:
                stream = stream[: cfg.data.eval_limit]
            x, y = eval_rows(stream, cfg.eval_batch_size)
            total, count, state, tally = 0.0, 0, None, SolveTally()
            for s in range(0, x.shape[1], T):
                xb = x[:, s : s + T].to(cfg.device)
                yb = y[:, s : s + T].to(cfg.device)
                nll, state, sols = model(xb, state, targets=yb)
                tally.add(sols)
                total += nll.double().sum().item()
                count += int((yb != -100).sum())
            loss = total / count
            out[f"{split}_loss"] = loss
            if self.char:
                out[f"{split}_bpc"] = loss / math.log(2)
            else:
                out[f"{split}_ppl"] = math.exp(min(loss, 700.0))
            out[f"{split}_tokens"] = count
            out.update(tally.metrics(split))
            words, chars = self.corpus.counts(split)
            if self.bpe and words:
                # the split's words / characters predicted, in proportion (eval_limit: a prefix)
                frac = count / max(1, self.corpus.split(split).numel() - 1)
                nats = total
                out[f"{split}_word_ppl"] = math.exp(min(nats / (words * frac), 700.0))
                out[f"{split}_bpc"] = nats / (chars * frac) / math.log(2)
        return out


class ImageTask(Task):
    """Image classification (MNIST, CIFAR-10, ImageFolder, idx files): cross-entropy on the logits,
    accuracy; a training batch is a pure function of the step (indices and augmentation draws)."""

    throughput = IMAGES

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        from ..data import images as im

        d = cfg.data
        data = im.load_images(d.dataset, d.path, d.image_size)
        xtr, ytr, xte, yte = data.train_x, data.train_y, data.test_x, data.test_y
        if d.image_size:
            xtr, xte = im.pad_to(xtr, d.image_size), im.pad_to(xte, d.image_size)
        if d.n_valid:
            if not 0 < d.n_valid < xtr.shape[0]:
                raise ValueError(
                    f"data.n_valid={d.n_valid} must be in (0, {xtr.shape[0]}) (training images)."
                )
            xtr, ytr, self.xva, self.yva = (
                xtr[: -d.n_valid],
                ytr[: -d.n_valid],
                xtr[-d.n_valid :],
                ytr[-d.n_valid :],
            )
        if d.limit_train:
            xtr, ytr = xtr[: d.limit_train], ytr[: d.limit_train]
        if d.limit_test:
            xte, yte = xte[: d.limit_test], yte[: d.limit_test]
        self.data, self.xtr, self.ytr, self.xte, self.yte = data, xtr, ytr, xte, yte
        self.mean, self.std = im.channel_stats(xtr)
        self.flip = d.dataset not in ("mnist", "idx")  # digits are not mirror-symmetric
        self.periodic_splits = ("valid", "test") if d.n_valid else ("test",)
        self.final_splits = self.periodic_splits
        self.select = "valid_loss" if d.n_valid else "test_loss"
        self.eval_fields = tuple(f"{s}_{m}" for s in self.periodic_splits for m in ("loss", "acc"))
        self.eval_fields += solve_fields(self.periodic_splits)

    def model_kwargs(self) -> dict:
        return {
            "in_channels": self.xtr.shape[1],
            "num_classes": self.data.num_classes,
            "image_size": self.xtr.shape[-1],
        }

    def prepare(self, x: Tensor) -> Tensor:
        from ..data.images import normalise

        return normalise(x, self.mean, self.std)

    def train_batch(self, step, rank, world):
        from ..data.images import augment

        idx = batch_indices(self.cfg, self.xtr.shape[0], step)
        x, y = self.xtr[idx], self.ytr[idx]
        if self.cfg.data.augment:  # draws seeded by (seed, step): exact resume
            g = torch.Generator().manual_seed(self.cfg.seed * 7_000_003 + step)
            x = augment(x, g, pad=4 if x.shape[-1] >= 32 else 2, flip=self.flip)
        return self.prepare(x[rank::world]), y[rank::world], True

    def _evaluate(self, model, splits) -> dict:
        cfg = self.cfg
        out = {}
        for split in splits:
            x, y = (self.xva, self.yva) if split == "valid" else (self.xte, self.yte)
            total, correct, tally = 0.0, 0, SolveTally()
            for i in range(0, x.shape[0], cfg.eval_batch_size):
                xb = self.prepare(x[i : i + cfg.eval_batch_size]).to(cfg.device)
                yb = y[i : i + cfg.eval_batch_size].to(cfg.device)
                logits, _, sols = model(xb)
                tally.add(sols)
                total += F.cross_entropy(logits, yb, reduction="sum").item()
                correct += (logits.argmax(-1) == yb).sum().item()
            out[f"{split}_loss"], out[f"{split}_acc"] = total / x.shape[0], correct / x.shape[0]
            out.update(tally.metrics(split))
        return out

    def analysis_inputs(self, n: int) -> Tensor:
        return self.prepare(self.xte[:n])


def _size(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    text = f"{type(model).__name__}, {total:,} parameters"
    count = getattr(model, "non_embedding_parameters", None)
    return text + (f" ({count():,} non-embedding)" if callable(count) else "")


def vocabulary_warning(model, vocab_size: int, corpus: str, level: str) -> str | None:
    """A warning when the vocabulary's parameters (embedding and softmax: those outside the
    model's ``non_embedding_parameters()``) exceed ``VOCAB_PARAMETER_RATIO`` times the others,
    naming the keys that shrink it; None otherwise (or for models that do not count them)."""
    count = getattr(model, "non_embedding_parameters", None)
    if not callable(count) or (body := count()) <= 0:
        return None
    vocab = sum(p.numel() for p in model.parameters()) - body
    ratio = vocab / body
    if ratio <= VOCAB_PARAMETER_RATIO:
        return None
    # the vocabulary whose parameters would be 5x the others' (the README job's proportion)
    target = float(f"{5 * body * vocab_size / vocab:.2g}")
    keys = []
    if corpus == "text" and level == "word":
        keys.append(f"data.max_vocab (e.g. {int(target):,}: rarer words become <unk>)")
    if level != "bpe" or int(target) < vocab_size:
        keys.append(f"data.level = 'bpe' with data.bpe_vocab (e.g. {max(300, int(target)):,})")
    keys.append("an adaptive softmax (model.overrides.adaptive = true, model.overrides.cutoffs)")
    return (
        f"the vocabulary has {vocab_size:,} tokens: its embedding and softmax hold {vocab:,} "
        f"parameters, {ratio:.0f}x the model's {body:,} others (warned above "
        f"{VOCAB_PARAMETER_RATIO:g}x), so they dominate the time per step and the memory. To "
        f"shrink it use " + ", or ".join(keys) + "."
    )


TASKS = {"copy_memory": CopyMemoryTask, "lm": LanguageModelTask, "image": ImageTask}


def make_task(cfg: TrainConfig) -> Task:
    try:
        cls = TASKS[cfg.data.task]
    except KeyError:
        raise ValueError(
            f"Unknown data.task {cfg.data.task!r}; available: {sorted(TASKS)}."
        ) from None
    return cls(cfg)
