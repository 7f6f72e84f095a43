"""The solve specification (``config.solve``): one value builds each model's DEQ; variants are
twins from ``with_solve`` that share the weights and leave the model unchanged; runs written
before the spec are read into it; the DEQ-model protocol."""

import dataclasses

import pytest
import torch

import deepeq
from deepeq.models import SolveSpec, create_model, list_models, model_config
from deepeq.models._protocol import equilibrium_layer
from deepeq.train import load_config
from deepeq.train.config import ConfigError, load_run_config

DEQS = [n for n in list_models() if n.startswith(("deq_", "mdeq_")) and "tied" not in n]


def test_build_follows_every_field():
    spec = SolveSpec(
        solver="broyden", f_max_steps=7, f_rtol=2e-3, eval_max_steps=9, eval_rtol=1e-4,
        b_solver="picard", b_max_steps=5, b_rtol=3e-4, b_init="shine", dtype="bfloat16",
        correction_steps=2, correction_gamma=0.5, correction_positions=0.5,
    )  # fmt: skip
    deq = spec.build(torch.nn.Identity())
    assert deq.solver == deepeq.Broyden(rtol=2e-3, max_steps=7)
    assert deq.eval_solver == deepeq.Broyden(rtol=1e-4, max_steps=9)
    rule = deq.backward_rule
    assert isinstance(rule, deepeq.ImplicitBackward) and rule.init == "shine"
    assert rule.solver == deepeq.Picard(rtol=3e-4, max_steps=5)
    assert deq.solve_dtype == "bfloat16" and deq.causal is False
    assert deq.correction == deepeq.FixedPointCorrection(steps=2, gamma=0.5, positions=0.5)
    assert SolveSpec(b_max_steps=0).build(torch.nn.Identity()).backward_rule.solver is None
    phantom = SolveSpec(backward="phantom", phantom_steps=3).build(torch.nn.Identity())
    assert phantom.backward_rule == deepeq.PhantomBackward(steps=3)
    rev = SolveSpec(solver="reversible", backward="reversible", beta=0.7).build(torch.nn.Identity())
    assert rev.solver.beta == 0.7 and isinstance(rev.backward_rule, deepeq.ReversibleBackward)
    assert SolveSpec().build(torch.nn.Identity()).correction is None


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(f_max_steps=0), r"solve \(f_max_steps / f_rtol\): Anderson.max_steps must be >= 1"),
        (dict(eval_rtol=-1.0), r"solve \(eval_max_steps / eval_rtol\): Anderson.rtol"),
        (dict(b_max_steps=-1), r"solve.b_max_steps must be an int >= 0"),
        (dict(phantom_steps=0), r"solve.phantom_steps must be an int >= 1"),
        (dict(beta=1.0), r"solve.beta must be in \(0, 1\)"),
        (dict(backward="reversible"), r"solve.backward = 'reversible' undoes"),
        (dict(b_init="shine"), r"which Anderson does not keep"),
        (
            dict(correction_positions=0.0),
            r"solve \(correction_\*\): FixedPointCorrection.positions",
        ),
    ],
)
def test_bad_specs_fail_when_made(changes, match):
    with pytest.raises(ValueError, match=match):
        SolveSpec(**changes)
    with pytest.raises(ValueError, match=match):  # replace re-checks
        dataclasses.replace(SolveSpec(), **changes)


@pytest.mark.parametrize("name", DEQS)
def test_every_deq_model_is_built_from_its_spec(name):
    with torch.device("meta"):
        m = create_model(name)
    built = m.config.solve.build(m.f)
    assert m.equilibrium is m.config.solve.policy == built.policy
    # a dict merges into the model's own spec; a SolveSpec replaces it
    c = model_config(name, solve=dict(f_rtol=0.05))
    assert c.solve == dataclasses.replace(m.config.solve, f_rtol=0.05)
    assert model_config(name, solve=SolveSpec(causal=False)).solve == SolveSpec(causal=False)


@pytest.mark.parametrize("name", ["deq_transformer_tiny", "mdeq_tiny"])
def test_with_solve_is_a_twin_that_leaves_the_model_alone(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    solver, spec = model.equilibrium.eval_solver, model.config.solve
    twin = model.with_solve(dataclasses.replace(spec, eval_max_steps=3))
    assert model.equilibrium.eval_solver is solver and model.config.solve is spec  # unchanged
    assert twin.equilibrium.eval_solver.max_steps == 3 and twin.config.solve.eval_max_steps == 3
    assert {id(p) for p in twin.parameters()} == {id(p) for p in model.parameters()}
    # the twin computes what a model built with that spec and these weights computes
    ref = create_model(name, solve=dict(eval_max_steps=3)).eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 28, 28) if name.startswith("mdeq") else torch.randint(0, 10, (2, 9))
    with torch.no_grad():
        out, _, sols = twin(x)
        want, _, _ = ref(x)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert int(sols[0].stats.num_steps.max()) <= 3
    with pytest.raises(TypeError, match="SolveSpec"):
        model.with_solve({"eval_max_steps": 3})


def test_the_protocol_names_the_equilibrium_layer():
    with torch.device("meta"):
        for name in ("deq_transformer_tiny", "mdeq_tiny"):
            m = create_model(name)
            assert equilibrium_layer(m) is m.config.solve.policy is not None
        for name in ("transformer_tied_tiny", "transformer_xl_tiny", "mdeq_tied_tiny", "lstm_tiny"):
            assert equilibrium_layer(create_model(name)) is None, name
        with pytest.raises(ValueError, match="no equilibrium layer"):
            create_model("transformer_tied_tiny").with_solve(SolveSpec())


def test_runs_written_before_the_spec_are_read_into_it(tmp_path):
    run = tmp_path / "old_run"
    run.mkdir()
    (run / "config.toml").write_text(
        '[model]\nname = "deq_transformer_tiny"\n\n[model.overrides]\nmem_len = 0\n'
        'f_max_steps = 7\nsolve_dtype = "bfloat16"\ncausal_solve = false\n'
    )
    cfg = load_run_config(run)
    assert cfg.model.overrides == {
        "mem_len": 0,
        "solve": {"f_max_steps": 7, "dtype": "bfloat16", "causal": False},
    }
    # a config file or command line with the old spelling is refused, naming the new one
    with pytest.raises(
        ConfigError,
        match=r"causal_solve, f_max_steps, solve_dtype: the solver settings .* write "
        r"solve\.causal, solve\.f_max_steps, solve\.dtype",
    ):
        load_config(run / "config.toml")
    with pytest.raises(ConfigError, match=r"Did you mean 'solve.f_rtol'\?"):
        load_config(None, ["--model.overrides.f_rtl=1e-2"])
