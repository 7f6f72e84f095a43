"""The training loop's parts: the run guards' state as one record (and checkpoints written before
it still resuming exactly), typed modes (skip reasons, throughput, prompt codecs, analysis
studies), each config rule checked once where the config is created, functions of readable
size."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from test_train import _nan_model

from deepeq.train import ConfigError, checkpoint, load_config, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/copy_memory_tiny.toml"
SMALL = ["--data.seq_len=10", "--data.n_train=32", "--data.n_test=16", "--batch_size=8",
         "--eval_batch_size=16", "--threads=1", "--model.overrides.dropout=0.1"]  # fmt: skip


def _old_layout(ck: dict) -> dict:
    """A checkpoint as deepeq wrote it before the guard record: its fields flat at top level."""
    old = {k: v for k, v in ck.items() if k not in ("format", "guard")}
    g = ck["guard"]
    old.update(skipped_in_row=g["skipped_in_row"], skipped_total=g["skipped_total"],
               loss_start=g["loss_start"], loss_recent=g["loss_recent"],
               loss_exploded_at=g["loss_exploded_at"])  # fmt: skip
    return old


def test_guard_state_is_one_record_and_old_checkpoints_resume_exactly(tmp_path):
    args = [*SMALL, "--steps=12", "--eval_every=6", "--ckpt_every=6", "--max_loss_ratio=1e-3"]
    a = load_config(TINY, [*args, f"--out_dir={tmp_path / 'a'}"])
    b = load_config(TINY, [*args, f"--out_dir={tmp_path / 'b'}"])
    final_a = train(a, progress=False)
    assert final_a["loss_exploded_at"] == 11  # ratio 1e-3: at the first full window of 10
    train(b, progress=False, until_step=6)
    latest = tmp_path / "b/checkpoints/latest.pt"
    ck = checkpoint.load(latest)
    # one nested record, no flat copies of its fields
    assert set(ck["guard"]) == {"skipped_in_row", "skipped_total", "loss_start", "loss_recent",
                                "loss_exploded_at"}  # fmt: skip
    assert not {"skipped_in_row", "skipped_total", "loss_start", "loss_recent"} & set(ck)
    assert ck["guard"]["loss_start"] > 0 and len(ck["guard"]["loss_recent"]) == 5
    # the layout written before the record resumes bit-identically (converted when loaded)
    checkpoint.save(_old_layout(ck), latest)
    final_b = train(b, progress=False, resume=True)
    for k, v in torch.load(tmp_path / "a/checkpoints/latest.pt", weights_only=True)[
        "model"
    ].items():
        assert torch.equal(v, checkpoint.load(latest)["model"][k]), k
    rows = lambda run: (tmp_path / run / "metrics.csv").read_text().splitlines()  # noqa: E731
    assert [r.split(",")[1] for r in rows("a")] == [r.split(",")[1] for r in rows("b")]
    assert len(rows("a")) == 13
    assert final_b["loss_exploded_at"] == final_a["loss_exploded_at"]
    # the old record's values are the ones resumed (a skip count and an explosion at step 2)
    c = load_config(TINY, [*args, f"--out_dir={tmp_path / 'c'}"])
    train(c, progress=False, until_step=6)
    latest = tmp_path / "c/checkpoints/latest.pt"
    old = _old_layout(checkpoint.load(latest))
    old.update(skipped_total=1, loss_exploded_at=2)
    checkpoint.save(old, latest)
    final_c = train(c, progress=False, resume=True)
    assert final_c["skipped"] == 1 and final_c["loss_exploded_at"] == 2


def test_skip_reason_is_a_typed_value():
    from deepeq.train.step import Skip, train_step
    from deepeq.train.tasks import make_task

    cfg = load_config(TINY, SMALL)
    task, model = make_task(cfg), _nan_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result, _ = train_step(cfg, model, model, task, opt, task.train_batch(0, 0, 1), None,
                           step=0, jac_weight=0.0)  # fmt: skip
    assert result.skipped is Skip.NONFINITE and not result.applied
    assert str(result.skipped) == "non-finite loss or solve"  # the log's words
    assert str(Skip.NONFINITE_GRADIENT) == "non-finite gradient (finite loss)"


def test_throughput_is_a_typed_value():
    from deepeq.train.tasks import CopyMemoryTask, ImageTask, LanguageModelTask

    x = torch.zeros(4, 7, 3)
    assert CopyMemoryTask.throughput.column == "tokens_per_s"
    assert LanguageModelTask.throughput.items(x) == 84  # every token
    assert ImageTask.throughput.column == "images_per_s"
    assert ImageTask.throughput.items(x) == 4  # one per image


def test_config_rules_are_checked_where_the_config_is_created(tmp_path):
    """Jacobian regularisation needs the implicit backward, fp_cache an equilibrium model: a
    config built in Python fails as a loaded one does (one message), before any data is read."""
    cfg = load_config(TINY, ["--jac.weight=1", f"--out_dir={tmp_path}"])
    phantom = dataclasses.replace(cfg.model, overrides={"solve": {"backward": "phantom"}})
    with pytest.raises(ConfigError, match=r"jac.weight = 1 / .* differentiate f\(z\*\) .* is "
                       r"'phantom'"):  # fmt: skip
        dataclasses.replace(cfg, model=phantom)
    lstm = dataclasses.replace(cfg.model, name="lstm_tiny", overrides={})
    with pytest.raises(ConfigError, match="fp_cache = true needs an equilibrium model"):
        dataclasses.replace(cfg, model=lstm, fp_cache=True)
    with pytest.raises(ConfigError, match="fp_cache = true needs an equilibrium model"):
        load_config(TINY, ["--fp_cache=true", "--model.name=transformer_tied_tiny"])
    for name in ("mdeq_tiny", "deq_llama_tiny", "deq_trellisnet_tiny"):  # equilibrium models
        assert dataclasses.replace(cfg, model=dataclasses.replace(lstm, name=name), fp_cache=True)


def test_analysis_studies_and_prompt_codecs_are_tables():
    from deepeq import __main__ as cli

    parser = cli.build_parser()
    analyze = next(a for a in parser._subparsers._group_actions[0].choices.items()
                   if a[0] == "analyze")[1]  # fmt: skip
    studies = analyze._subparsers._group_actions[0].choices
    assert set(cli.STUDIES) == set(studies)  # every study the parser offers has its runner

    class Corpus:
        itos = ("<eos>", "<unk>", "the", "cat")

        def __init__(self, level):
            self.level = level

        def encode(self, text):
            return torch.tensor([len(w) for w in text.split()])

        def decode(self, ids):
            return "|".join(str(i) for i in ids.tolist())

    word, char, bpe = (cli.prompt_codec(Corpus(v)) for v in ("word", "char", "bpe"))
    assert word.encode("the cat").tolist() == [2, 3]
    assert word.text(torch.tensor([2]), torch.tensor([3])) == "the cat"
    assert char.text(torch.tensor([2]), torch.tensor([3])) == "thecat"
    assert bpe.encode("ab c").tolist() == [2, 1]
    assert bpe.text(torch.tensor([2]), torch.tensor([5])) == "2|5"
    with pytest.raises(ValueError, match="the prompt is empty"):
        bpe.encode("  ")


@pytest.mark.parametrize("module", ["deepeq/train/loop.py", "deepeq/__main__.py"])
def test_functions_have_a_readable_size(module):
    """The training loop and the CLI's commands in pieces of readable size (the parser's
    declaration, ``build_parser``, is one long list of arguments and is left out)."""
    tree = ast.parse((ROOT / module).read_text())
    long = {
        f.name: f.end_lineno - f.lineno + 1
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef) and f.name != "build_parser"
        and f.end_lineno - f.lineno + 1 > 40
    }  # fmt: skip
    assert not long, long
