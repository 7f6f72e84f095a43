"""Every config key is validated when a training config is loaded: unknown keys, wrong types,
choices outside their options and model overrides fail in load_config with a ConfigError that
names the key and the valid choices, before any data is read or any file is written."""

import pytest

from deepeq.__main__ import main
from deepeq.models import list_models, model_config
from deepeq.train import ConfigError, load_config


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.overrides.f_max_stepz=3", r"Unknown config field\(s\) \['f_max_stepz'\].*Did you mean 'solve.f_max_steps'\?"),
        ("--model.overrides.solve.solver=andersn", r"solver: expected one of 'picard', 'anderson', 'broyden', 'reversible'; got 'andersn'"),
        ("--model.overrides.solve.f_max_steps=0", r"solve \(f_max_steps / f_rtol\): Anderson.max_steps must be >= 1; got 0"),
        ("--model.overrides.weight_norm=yes", r"weight_norm: expected true or false"),
        ("--model.overrides.solve.backward=reversible", r"solve.backward = 'reversible' undoes the iterations of solve.solver = 'reversible'"),
        ("--model.overrides.solve.solver=broyden", r"Broyden's inverse-Jacobian estimate does not split by position"),
        ("--model.name=deq_transformr_tiny", r"unknown model 'deq_transformr_tiny'; registered models: \[.*'deq_transformer_tiny'"),
        ("--optim.schedule=cosin", r"optim.schedule: expected one of 'cosine', 'constant'; got 'cosin'"),
        ("--optim.name=adan", r"optim.name: expected one of 'adam', 'adamw', 'radam', 'sgd'"),
        ("--data.task=lmm", r"data.task: expected one of 'copy_memory', 'lm', 'image'"),
        ("--data.corpus=ptbb", r"data.corpus: expected one of 'ptb', 'ptb_char', 'wikitext103'"),
        ("--data.level=bytes", r"data.level: expected one of 'word', 'char'"),
        ("--fp_cache_dtype=bfloat16", r"fp_cache_dtype: expected one of 'float32', 'float16'"),
        ("--optim.nope=1", r"Unknown config key 'optim.nope'; valid keys at optim: \[.*'optim.lr'"),
        ("--steps=ten", r"steps: cannot parse 'ten' as int"),
    ],
)  # fmt: skip
def test_load_config_refuses(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/ptb_quick.toml", [override])


def test_malformed_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = \n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        load_config(bad)


def test_jacobian_regularisation_needs_the_implicit_backward():
    with pytest.raises(
        ConfigError, match=r"jac.weight = 0.5 .* model.overrides.solve.backward is 'phantom'"
    ):
        load_config(None, ["--jac.weight=0.5", "--model.overrides.solve.backward=phantom"])
    load_config(None, ["--jac.weight=0.5"])  # implicit (default): fine


def test_model_config_builds_only_the_config_for_every_registered_model():
    for name in list_models():
        c = model_config(name)
        assert type(c).__name__.endswith("Config"), name
    assert model_config("mdeq_tiny", solve=dict(f_max_steps=3)).solve.f_max_steps == 3


def test_cli_prints_config_errors_in_one_line_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "configs/ptb_quick.toml",
            "--model.overrides.solve.solver=andersn",
            f"--out_dir={out}",
        ]
    )
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "got 'andersn'" in err


def test_cli_keeps_the_traceback_of_internal_errors(monkeypatch):
    import deepeq.__main__ as cli

    def broken(argv):
        raise TypeError("an internal bug")

    monkeypatch.setattr(cli, "_train", broken)
    with pytest.raises(TypeError, match="an internal bug"):
        cli.main(["train", "configs/ptb_quick.toml"])
