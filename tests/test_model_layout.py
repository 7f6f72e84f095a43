"""Models as f + a solve policy (issue 33): no tensor held twice, checkpoints of the older layout
(``deq.f.*`` copies) load, configs read from registered data without building a model, the core
chosen once as an object, and the solve spec built and checked once."""

import dataclasses
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from deepeq.models import (
    SolveSpec,
    _registry,
    create_model,
    list_models,
    migrate_state_dict,
    model_config,
    register_model,
)
from deepeq.models import _solve as solve_module
from deepeq.models._core import EQUILIBRIUM, TIED, UNTIED, make_core
from deepeq.models.deq_transformer import DEQTransformer, DEQTransformerConfig

ROOT = Path(__file__).resolve().parents[1]


def _shared_groups(model: torch.nn.Module) -> list[list[str]]:
    """Keys of the state_dict that hold the same tensor, grouped (groups of 2 or more)."""
    groups = defaultdict(list)
    for key, value in model.state_dict(keep_vars=True).items():
        groups[id(value)].append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


@pytest.mark.parametrize("name", list_models())
def test_no_registered_model_holds_a_tensor_under_two_keys(name):
    """A model holds each tensor once; the only sharing is the declared tie of the embedding
    and the output head (``tie_weights``), as in any language model with tied weights."""
    with torch.device("meta"):
        model = create_model(name)
    tied = getattr(model.config, "tie_weights", False)
    for keys in _shared_groups(model):
        declared = tied and all(k.startswith(("embed.", "head.")) for k in keys)
        assert declared, f"{name}: one tensor under {keys}"


@pytest.mark.parametrize("name", ["deq_transformer_tiny", "transformer_tied_tiny", "mdeq_tiny"])
def test_checkpoints_of_the_older_layout_load(name, tmp_path):
    """Before the solve was a policy value, models saved their layer twice (``f.*`` and the
    equilibrium module's ``deq.f.*``): such a checkpoint loads, through ``checkpoint.load``,
    into the current model (strict), with the same weights."""
    from deepeq.train import checkpoint

    torch.manual_seed(0)
    model = create_model(name)
    state = model.state_dict()
    old = {**state, **{f"deq.{k}": v.clone() for k, v in state.items() if k.startswith("f.")}}
    assert len(old) > len(state)
    path = tmp_path / "old.pt"
    torch.save({"format": checkpoint.FORMAT, "model": old, "step": 3}, path)
    fresh = create_model(name)
    fresh.load_state_dict(checkpoint.load(path)["model"])  # strict: no unexpected deq.f.* key
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
    # a deq.f.* key without its f.* twin is renamed, and a current state passes unchanged
    assert migrate_state_dict({"deq.f.w": 1, "head.b": 2}) == {"f.w": 1, "head.b": 2}
    assert migrate_state_dict(state).keys() == state.keys()


def test_model_config_reads_registered_data_without_building(monkeypatch):
    monkeypatch.setattr(_registry, "_MODELS", dict(_registry._MODELS))  # this test's registry
    built = []

    def build(config):
        built.append(config)
        return DEQTransformer(config)

    defaults = dict(d_model=16, d_ff=32, solve=dict(f_max_steps=5))
    register_model("probe_tiny", DEQTransformerConfig, defaults, build, "a probe")
    c = model_config("probe_tiny", n_heads=2, solve=dict(f_rtol=0.01))
    assert (c.d_model, c.d_ff, c.n_heads) == (16, 32, 2)
    # a dict merges into the registered defaults, which merged into the class's spec
    assert (c.solve.f_max_steps, c.solve.f_rtol, c.solve.causal) == (5, 0.01, True)
    assert built == []  # nothing was built
    with pytest.raises(ValueError, match="core must be 'deq', 'tied' or 'untied'; got 'x'"):
        DEQTransformerConfig(core="x")  # a config is checked when it is made
    m = create_model("probe_tiny", n_heads=2, solve=dict(f_rtol=0.01))
    assert built == [c] and m.config == c
    assert "probe_tiny" in list_models()
    text = (ROOT / "deepeq/models/_registry.py").read_text()
    assert "ContextVar" not in text and "_ConfigBuilt" not in text


def test_the_core_is_chosen_once_from_its_word():
    assert make_core("deq") is EQUILIBRIUM and make_core("untied") is UNTIED
    with pytest.raises(ValueError, match=r"core must be 'deq' or 'tied'; got 'untied'"):
        make_core("untied", (EQUILIBRIUM, TIED))
    with torch.device("meta"):
        assert create_model("transformer_xl_tiny").core is UNTIED
        assert create_model("mdeq_tied_tiny").core is TIED
    # the word is compared in the factory only
    pattern = re.compile(r"\bcore\s*(==|!=|\bin\b|\bnot in\b)\s*[(\"']")
    sites = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sorted((ROOT / "deepeq").rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert sites == [], sites


def test_a_spec_builds_its_objects_once_and_checks_causality_when_made(monkeypatch):
    calls = []
    real = solve_module.make_solver
    monkeypatch.setattr(
        solve_module, "make_solver", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    config = model_config("deq_transformer_tiny")
    calls.clear()
    model = DEQTransformer(config)
    model(torch.randint(0, 10, (2, 5)))
    assert calls == []  # the model and its solve use the policy the spec built when made
    assert model.equilibrium is config.solve.policy
    twin = model.with_solve(dataclasses.replace(config.solve, eval_max_steps=3))
    assert len(calls) == 3  # forward, evaluation and backward solvers of the new spec, once
    assert twin.equilibrium.eval_solver.max_steps == 3
    # a causal Broyden spec fails when it is made, with the solver check's own message
    with pytest.raises(ValueError, match="Broyden's inverse-Jacobian estimate does not split"):
        SolveSpec(causal=True, solver="broyden")
    assert not hasattr(SolveSpec, "check_causal")


def test_the_models_state_holds_no_equilibrium_module():
    """The layer is the model's ``f``; a twin with another spec shares it and holds no copy."""
    torch.manual_seed(0)
    model = create_model("deq_transformer_tiny")
    assert not any(k.startswith("deq.") for k in model.state_dict())
    twin = model.with_solve(dataclasses.replace(model.config.solve, eval_max_steps=3))
    assert twin.f is model.f and twin.state_dict().keys() == model.state_dict().keys()
