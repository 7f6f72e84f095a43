"""Subword tokenisation (data.level = "bpe"): a byte-level BPE trained on the training split,
exact round trips, cached beside the token streams (reused, invalidated), and metrics per token,
per word and per character that agree with each other."""

import math
import random

import pytest
import torch

from deepeq.data import text as T
from deepeq.models import create_model
from deepeq.train import load_config
from deepeq.train.tasks import make_task

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "naïve", "café", "x-ray", "N"]


def _corpus_dir(tmp_path, seed=0):
    rng = random.Random(seed)
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    texts = {}
    for split, n in (("train", 300), ("valid", 40), ("test", 40)):
        lines = []
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
            sep = rng.choice([" ", "  "])  # runs of spaces must survive the round trip
            lines.append(rng.choice(["", " "]) + sep.join(words))
        texts[split] = "\n".join(lines)
        (d / f"{split}.txt").write_text(texts[split] + "\n", encoding="utf-8")
    return d, texts


def test_round_trip_and_counts(tmp_path):
    d, texts = _corpus_dir(tmp_path)
    c = T.text_corpus(d, level="bpe", max_vocab=400, cache_dir="")
    assert c.level == "bpe" and c.vocab_size <= 400 and "<eos>" in c.itos
    for split in ("train", "valid", "test"):
        assert c.decode(c.split(split)) == texts[split] + "\n"  # exact, spaces included
        lines = texts[split].split("\n")
        words = sum(len(ln.split()) + 1 for ln in lines)
        chars = sum(len(" ".join(ln.split())) + 1 for ln in lines)
        assert c.counts(split) == (words, chars)
    s = "the naïve  dog\nran"
    assert c.decode(c.encode(s)) == s
    assert c.split("train").numel() < sum(len(ln.split()) for ln in texts["train"].split("\n")) * 3
    word = T.text_corpus(d, level="word", cache_dir="")
    assert word.counts("valid") == c.counts("valid")  # the same words, whatever the tokeniser


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    d, _ = _corpus_dir(tmp_path)
    cache = tmp_path / "cache"
    builds = []
    real = T._bpe_sources
    monkeypatch.setattr(T, "_bpe_sources", lambda *a: builds.append(a[2]) or real(*a))
    a = T.text_corpus(d, level="bpe", max_vocab=400, cache_dir=cache)
    b = T.text_corpus(d, level="bpe", max_vocab=400, cache_dir=cache)
    assert builds == [400] and torch.equal(a.train, b.train) and a.tokenizer == b.tokenizer
    assert b.decode(b.valid) == a.decode(a.valid)
    T.text_corpus(d, level="bpe", max_vocab=500, cache_dir=cache)  # another vocabulary size
    assert builds == [400, 500]
    (d / "valid.txt").write_text("the cat\n", encoding="utf-8")  # the files changed
    c = T.text_corpus(d, level="bpe", max_vocab=400, cache_dir=cache)
    assert builds == [400, 500, 400] and c.decode(c.valid) == "the cat\n"


def test_metrics_per_token_word_and_character(tmp_path):
    d, _ = _corpus_dir(tmp_path)
    cfg = load_config(
        "configs/ptb_quick.toml",
        [
            "--data.corpus=text", f"--data.path={d}", "--data.level=bpe", "--data.bpe_vocab=400",
            "--data.cache_dir=", "--data.seq_len=16", "--batch_size=4", "--eval_batch_size=4",
        ],
    )  # fmt: skip
    task = make_task(cfg)
    model = create_model("lstm_tiny", **task.model_kwargs())
    m = task.evaluate(model, ("valid",))
    assert {"valid_loss", "valid_ppl", "valid_word_ppl", "valid_bpc"} <= set(m)
    words, chars = task.corpus.counts("valid")
    nats = m["valid_loss"] * m["valid_tokens"]  # the split's total NLL
    assert math.isclose(math.log(m["valid_word_ppl"]), nats / words, rel_tol=1e-9)
    assert math.isclose(m["valid_bpc"], nats / chars / math.log(2), rel_tol=1e-9)
    assert math.isclose(math.log(m["valid_ppl"]), m["valid_loss"], rel_tol=1e-9)
    # more tokens than words here (subwords): per-word perplexity is the larger
    assert m["valid_tokens"] > words and m["valid_word_ppl"] > m["valid_ppl"]


def test_training_and_generation_on_bpe(tmp_path, capsys):
    from deepeq.__main__ import main

    d, _ = _corpus_dir(tmp_path)
    run = tmp_path / "run"
    args = ["--data.corpus=text", f"--data.path={d}", "--data.level=bpe", "--data.bpe_vocab=400",
            "--data.cache_dir=", "--data.seq_len=16", "--batch_size=4", "--eval_batch_size=4",
            "--steps=2", "--eval_every=2", "--no-progress", f"--out_dir={run}"]  # fmt: skip
    assert main(["train", "configs/ptb_quick.toml", *args]) == 0
    capsys.readouterr()
    assert (
        main(["generate", str(run), "--prompt", "the naïve", "--tokens", "5", "--seed", "0"]) == 0
    )
    assert capsys.readouterr().out.startswith("the naïve")


def test_errors(tmp_path, monkeypatch):
    d, _ = _corpus_dir(tmp_path)
    with pytest.raises(ValueError, match=r"data\.bpe_vocab must be >= 300"):
        T.text_corpus(d, level="bpe", max_vocab=100, cache_dir="")
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"pip install 'deepeq\[bpe\]'"):
        T.text_corpus(d, level="bpe", max_vocab=400, cache_dir="")
    with pytest.raises(ValueError, match=r"Corpus\.encode is for level .bpe."):
        T.text_corpus(d, level="word", cache_dir="").encode("the")
