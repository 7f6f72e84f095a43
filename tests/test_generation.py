"""Text generation: token-by-token decoding with the model's memory as the cache gives the tokens
(and, to the solver tolerance, the scores) of recomputing the whole prefix, for every registered
sequence model; sampling options; prompts; the CLI."""

import logging

import pytest
import torch

from deepeq.__main__ import main
from deepeq.generation import decode_ids, encode_prompt, generate, sample_next
from deepeq.models import create_model, list_models

# every registered sequence model at its tiny size (the larger ones share the code; a fresh
# deq_transformer_small does not converge within 200 steps, so its cached and recomputed scores
# differ by its residual, which is not what this tests)
MODELS = [n for n in list_models() if n.endswith("_tiny") and not n.startswith("mdeq")]


def _recompute(model, seq, start, n):
    """Scores of the last position when the whole prefix is one segment, for each step."""
    model.eval()
    with torch.no_grad():
        return torch.stack([model(seq[: start + i].unsqueeze(0))[0][0, -1] for i in range(n)])


@pytest.mark.parametrize("name", MODELS)
def test_cached_decoding_equals_recomputing_the_prefix(name):
    """At the models' own tolerances (the eval cap raised so that fresh weights converge: a
    solve stopped at its cap leaves both computations off by its residual)."""
    torch.manual_seed(0)
    deq = name.startswith("deq_")
    model = create_model(name, vocab_size=60, **({"solve": {"eval_max_steps": 200}} if deq else {}))
    prompt = torch.randint(0, 60, (6,), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, 8, temperature=0)
    seq = torch.cat([prompt, out.tokens])
    ref = _recompute(model, seq, len(prompt), 8)
    assert torch.equal(ref.argmax(1), out.tokens)  # greedy: the same tokens
    assert out.residual <= 1e-3 or not deq
    # scores: equal for explicit models; for DEQs to the eval solver's tolerance (rtol 1e-3)
    tol = 2e-2 if deq else 1e-5
    assert (ref - out.logits).abs().max() <= tol * ref.abs().max()
    assert (min(out.nfe) > 0) == deq and out.tokens_per_s > 0


@pytest.mark.parametrize("name", ["deq_transformer_tiny", "deq_trellisnet_tiny"])
def test_cached_decoding_is_the_same_equilibrium(name):
    """At a tight tolerance (float64) the cached solves give the recomputed scores to 1e-7:
    the cache changes the computation, not the equilibrium."""
    torch.manual_seed(0)
    model = create_model(name, vocab_size=60, solve=dict(f_rtol=1e-11, eval_max_steps=300)).double()
    prompt = torch.randint(0, 60, (6,), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, 5, temperature=0)
    ref = _recompute(model, torch.cat([prompt, out.tokens]), len(prompt), 5)
    assert (ref.float() - out.logits).abs().max() <= 1e-5 * ref.abs().max()
    assert out.residual < 1e-9


def test_warm_start_saves_calls_of_f():
    torch.manual_seed(0)
    model = create_model("deq_transformer_tiny", vocab_size=60)
    prompt = torch.randint(0, 60, (10,), generator=torch.Generator().manual_seed(1))
    warm = generate(model, prompt, 12, temperature=0)
    cold = generate(model, prompt, 12, temperature=0, warm_start=False)
    assert sum(warm.nfe) < sum(cold.nfe)


def test_seeded_sampling_is_reproducible():
    torch.manual_seed(0)
    model = create_model("transformer_xl_tiny", vocab_size=60)
    prompt = torch.tensor([1, 2, 3])
    a = generate(model, prompt, 20, temperature=1.0, top_k=20, top_p=0.9, seed=7).tokens
    b = generate(model, prompt, 20, temperature=1.0, top_k=20, top_p=0.9, seed=7).tokens
    c = generate(model, prompt, 20, temperature=1.0, top_k=20, top_p=0.9, seed=8).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_next_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=0) == 0
    draws = {sample_next(logits, top_k=2, generator=g) for _ in range(200)}
    assert draws == {0, 1}
    p = torch.softmax(logits, 0)  # 0.64, 0.24, ...: the 0.8 nucleus is {0, 1}
    assert p[0] < 0.8 < p[0] + p[1]
    assert {sample_next(logits, top_p=0.8, generator=g) for _ in range(200)} == {0, 1}
    assert {sample_next(logits, temperature=50, generator=g) for _ in range(300)} == set(range(5))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample_next(logits, temperature=-1)
    with pytest.raises(ValueError, match=r"top_p in \(0, 1\]"):
        sample_next(logits, top_p=0)


def test_prompts(caplog):
    itos = ("<eos>", "the", "cat", "<unk>", "_", "a", "b")
    with caplog.at_level(logging.WARNING, logger="deepeq"):
        ids = encode_prompt("the dog cat\nthe", itos, "word")
    assert ids.tolist() == [1, 3, 2, 0, 1] and "mapped to <unk>: ['dog']" in caplog.text
    assert decode_ids(ids, itos, "word") == "the <unk> cat\nthe"
    chars = encode_prompt("a b", itos, "char")
    assert chars.tolist() == [5, 4, 6] and decode_ids(chars, itos, "char") == "a b"
    with pytest.raises(ValueError, match="the prompt is empty"):
        encode_prompt("  \n ", itos, "word")
    with pytest.raises(ValueError, match="not in the vocabulary, which has no <unk>"):
        encode_prompt("dog", ("<eos>", "the"), "word")
    model = create_model("lstm_tiny", vocab_size=10)
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate(model, torch.tensor([], dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"prompt ids must be in \[0, 10\)"):
        generate(model, torch.tensor([12]), 3)
    with pytest.raises(TypeError, match="generate needs a sequence"):
        generate(torch.nn.Linear(2, 2), torch.tensor([1]), 3)


SMALL = ["--steps=2", "--batch_size=4", "--eval_every=2", "--ckpt_every=1", "--no-progress"]


def test_cli(tmp_path, capsys):
    lm = tmp_path / "lm"
    args = [*SMALL, "--data.seq_len=12", "--data.eval_limit=200", "--eval_batch_size=4"]
    assert main(["train", "configs/ptb_quick.toml", *args, f"--out_dir={lm}"]) == 0
    capsys.readouterr()
    assert (
        main(["generate", str(lm), "--prompt", "the company said", "--tokens", "6", "--seed", "1"])
        == 0
    )
    out = capsys.readouterr()
    assert out.out.startswith("the company said ") and len(out.out.split()) == 3 + 6
    assert "tokens/s" in out.err and "forward NFE" in out.err
    copy = tmp_path / "copy"
    small_copy = [*SMALL, "--data.seq_len=10", "--data.n_train=16", "--data.n_test=8"]
    assert main(["train", "configs/copy_memory_tiny.toml", *small_copy, f"--out_dir={copy}"]) == 0
    capsys.readouterr()
    assert main(["generate", str(copy), "--prompt", "1 2"]) == 2
    assert "needs a language-model run" in capsys.readouterr().err
    assert main(["generate", str(lm), "--prompt", " "]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
