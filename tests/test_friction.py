"""Newcomer friction (issue 34, items 13-16): what a first run prints about its data, the
config reference generated from the dataclasses, convergence advice that fits the run's
settings, and one clear error for wrong feature sizes and a text corpus without a path."""

import dataclasses
import logging
import typing
from pathlib import Path

import pytest
import torch

from deepeq.__main__ import main
from deepeq.train import ConfigError, load_config, train

ROOT = Path(__file__).resolve().parents[1]
TINY_COPY = [
    "--steps=2", "--data.seq_len=10", "--data.n_train=32", "--data.n_test=16", "--batch_size=8",
    "--eval_every=2", "--ckpt_every=2", "--eval_batch_size=16", "--no-progress",
]  # fmt: skip


def _word_corpus(root: Path, distinct: int) -> Path:
    """train/valid/test files whose training split has ``distinct`` different words."""
    root.mkdir()
    words = [f"w{i}" for i in range(distinct)] * 2
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "valid.txt").write_text("w1 w2 w3 w4\nw5 w6\n")
    (root / "test.txt").write_text("w7 w8 w9\n")
    return root


def _lm_args(path: Path, out: Path) -> list[str]:
    return [
        "--data.task=lm", "--data.corpus=text", f"--data.path={path}", "--data.cache_dir=",
        "--data.seq_len=8", "--batch_size=4", "--eval_batch_size=2", "--steps=1",
        "--model.name=deq_transformer_tiny", "--model.overrides.solve.f_max_steps=2",
        "--model.overrides.solve.b_max_steps=2", "--model.overrides.solve.eval_max_steps=2",
        f"--out_dir={out}",
    ]  # fmt: skip


# --- 13: corpus and vocabulary sizes, a vocabulary far above the model's size --------------------
def test_a_huge_vocabulary_is_reported_and_warned_about(tmp_path, caplog):
    corpus = _word_corpus(tmp_path / "c", 5000)
    caplog.set_level(logging.INFO, logger="deepeq")
    train(load_config(None, _lm_args(corpus, tmp_path / "a")), progress=False)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    line = next(m for m in info if m.startswith("data:"))
    n_train = 2 * 5000 + 2 * 5000 // 12 + 1  # words + one <eos> per line
    assert f"{n_train:,} train" in line and "vocabulary 5,001" in line, line  # + <eos>
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "5,001 tokens" in warn[0], warn
    assert "data.max_vocab" in warn[0] and "data.bpe_vocab" in warn[0], warn[0]
    # capped by data.max_vocab: the sizes are still reported, no warning
    caplog.clear()
    train(
        load_config(None, [*_lm_args(corpus, tmp_path / "b"), "--data.max_vocab=500"]),
        progress=False,
    )
    assert any("vocabulary 500" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_cli_shows_the_data_sizes(tmp_path, capsys):
    corpus = _word_corpus(tmp_path / "c", 200)
    assert main(["train", str(ROOT / "configs/ptb_quick.toml"), *_lm_args(corpus, tmp_path / "r"),
                 "--no-progress"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "data: text corpus" in err and "vocabulary 201" in err, err


def test_max_vocab_outside_a_text_corpus_is_refused():
    with pytest.raises(ConfigError, match=r"data.max_vocab = 5000 .* data.corpus = 'text'"):
        load_config(None, ["--data.task=lm", "--data.corpus=ptb", "--data.max_vocab=5000"])
    with pytest.raises(ConfigError, match=r"data.max_vocab must be an int >= 0"):
        load_config(None, ["--data.max_vocab=-3"])


# --- 14: deepeq train --help-config --------------------------------------------------------------
def test_every_config_key_has_a_description():
    from deepeq.models import list_models, model_config
    from deepeq.models._solve import SolveSpec
    from deepeq.train.config import TrainConfig
    from deepeq.train.config_help import describe_fields

    classes = [TrainConfig, SolveSpec, *{type(model_config(n)) for n in list_models()}]
    seen = set()
    while classes:
        cls = classes.pop()
        if cls in seen:
            continue
        seen.add(cls)
        docs = describe_fields(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), f"{cls.__name__}.{f.name} has no description"
            if dataclasses.is_dataclass(hints[f.name]):
                classes.append(hints[f.name])


def test_help_config_prints_every_key_with_type_default_and_meaning(capsys):
    from deepeq.train.config import TrainConfig

    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for section in ("data", "optim", "jac", "model"):
        sub = getattr(TrainConfig(), section)
        for f in dataclasses.fields(sub):
            assert f"  {section}.{f.name}: " in out, f"{section}.{f.name}"
    assert "threads: int = 0" in out and "torch.set_num_threads" in out
    assert "data.max_vocab: int = 0" in out and "most frequent words" in out
    # one section; the model's own keys (here the default model's), the solve spec's included
    assert main(["train", "--help-config", "optim"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr: float = 0.001" in out and "data." not in out
    assert main(["train", "--help-config", "model", "--model.name=lstm_tiny"]) == 0
    out = capsys.readouterr().out
    assert "model.overrides.hidden: int = 50" in out and "solve" not in out, out
    assert main(["train", "--help-config", "model"]) == 0
    out = capsys.readouterr().out
    assert "model.overrides.solve.f_rtol: float = 0.001" in out
    assert "model.overrides.d_model: int" in out
    # a config file selects the model (and its defaults)
    assert main(["train", str(ROOT / "configs/ptb_quick.toml"), "--help-config", "model"]) == 0
    out = capsys.readouterr().out
    assert "deq_transformer_small" in out
    assert main(["train", "--help-config", "optimizer"]) == 2
    assert "optimizer" in capsys.readouterr().err
    assert main(["train"]) == 2  # no config and no --help-config: one line
    assert "needs a config file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --help lists the keys by section and points here
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "threads" in out and "--data.KEY:" in out and "max_vocab" in out
    assert "--help-config" in out


def test_training_guide_documents_threads_and_help_config():
    text = (ROOT / "docs/guide/training.md").read_text()
    assert "--threads" in text and "--help-config" in text
    assert "data.max_vocab" in (ROOT / "docs/guide/data.md").read_text()


# --- 15: convergence advice that fits the run's settings ----------------------------------------
def test_convergence_warning_fits_the_jacobian_settings(tmp_path, capsys):
    cfg = str(ROOT / "configs/copy_memory_tiny.toml")
    args = [*TINY_COPY, "--model.overrides.solve.f_max_steps=1", "--jac.weight=0.5"]
    assert main(["train", cfg, *args, f"--out_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    warning = out[out.index("warning: in the last epoch") :]
    assert "add Jacobian regularisation" not in warning, warning
    assert "jac.weight = 0.5" in warning and "solve.f_max_steps = 1" in warning, warning
    assert f"deepeq eval {tmp_path} --max-steps 20,40,80" in warning, warning  # eval cap 20
    # without JR the advice is to add it
    from deepeq.train.convergence import convergence_line

    final = {"fwd_converged_steps": 0.0, "fwd_converged_steps_by_epoch": [0.0]}
    warning = convergence_line(final, load_config(cfg, [f"--out_dir={tmp_path}"]))
    assert "add Jacobian regularisation (jac.weight" in warning, warning
    assert f"deepeq eval {tmp_path} --max-steps" in warning, warning


def test_a_ramp_ending_after_the_last_step_is_warned_about_at_load(caplog):
    caplog.set_level(logging.WARNING, logger="deepeq")
    args = ["--steps=100", "--jac.weight=1", "--jac.final_weight=3", "--jac.ramp_end=400"]
    load_config(None, args)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "jac.ramp_end = 400" in msgs[0] and "steps = 100" in msgs[0], msgs
    caplog.clear()
    load_config(None, [*args[:3], "--jac.ramp_end=100"])  # reaches its final weight: fine
    load_config(None, ["--steps=100", "--jac.weight=1", "--jac.ramp_end=400"])  # no ramp
    assert not caplog.records


# --- 16: one clear error ---------------------------------------------------------------------------
class _Layer(torch.nn.Module):
    def __init__(self, fail_at: int = 0, error: type = RuntimeError):
        super().__init__()
        self.lin, self.calls, self.fail_at, self.error = torch.nn.Linear(8, 8), 0, fail_at, error

    def forward(self, z, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error("a bug inside f")
        return torch.tanh(0.5 * self.lin(z) + x)


def test_wrong_feature_sizes_into_deq_name_the_shapes():
    import deepeq

    deq = deepeq.DEQ(_Layer())
    with pytest.raises(RuntimeError) as info:
        deq(torch.randn(4, 16))
    msg = str(info.value)
    assert "first call" in msg and "(4, 16)" in msg and "z0" in msg, msg
    assert "mat1 and mat2" in msg  # the original message is kept ...
    assert "mat1 and mat2" in str(info.value.__cause__)  # ... and chained


def test_failures_that_are_not_about_the_first_call_are_left_alone():
    import deepeq

    picard = deepeq.Picard(max_steps=10, rtol=1e-9)
    with pytest.raises(RuntimeError) as info:  # a later call: f's own failure
        deepeq.DEQ(_Layer(fail_at=3), solver=picard)(torch.randn(4, 8))
    assert str(info.value) == "a bug inside f"
    with pytest.raises(AttributeError) as info:  # a bug, not a shape: its own message
        deepeq.DEQ(_Layer(fail_at=1, error=AttributeError), solver=picard)(torch.randn(4, 8))
    assert str(info.value) == "a bug inside f"
    with pytest.raises(ValueError) as info:  # refused before f is called
        deepeq.DEQ(_Layer())(torch.randn(4, 8), z0=torch.full((4, 8), float("nan")))
    assert "first call" not in str(info.value)
    # a first call that fails on a shape-like error: wrapped, same type, original chained
    with pytest.raises(RuntimeError, match=r"failed on its first call.*a bug inside f") as info:
        deepeq.DEQ(_Layer(fail_at=1), solver=picard)(torch.randn(4, 8))
    assert str(info.value.__cause__) == "a bug inside f"


@pytest.mark.parametrize("corpus", ["text", "wikitext103", "wikitext2"])
def test_a_local_corpus_without_a_path_fails_at_load(corpus, tmp_path, capsys):
    with pytest.raises(
        ConfigError, match=rf"data.corpus = '{corpus}' reads local files.*data.path"
    ):
        load_config(None, ["--data.task=lm", f"--data.corpus={corpus}"])
    rc = main(["train", str(ROOT / "configs/ptb_quick.toml"), f"--data.corpus={corpus}",
               f"--out_dir={tmp_path / 'r'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "data.path" in err, err
    assert not (tmp_path / "r").exists()
