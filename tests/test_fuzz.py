"""Hypothesis fuzz: random contractive, expansive and NaN-producing maps never crash the engine,
never return silent NaNs, and the status and statistics always tell the truth."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deepeq
from deepeq import Status

SOLVERS = st.sampled_from(["picard", "anderson", "broyden", "broyden_ls"])


def _make(name, max_steps, atol, rtol, param):
    if name == "broyden_ls":
        return deepeq.Broyden(
            atol=atol, rtol=rtol, max_steps=max_steps, line_search=True, history_length=param
        )
    if name == "broyden":
        return deepeq.Broyden(atol=atol, rtol=rtol, max_steps=max_steps, history_length=param)
    if name == "anderson":
        return deepeq.Anderson(atol=atol, rtol=rtol, max_steps=max_steps, history_length=param)
    return deepeq.Picard(atol=atol, rtol=rtol, max_steps=max_steps, damping=(param - 1) / 10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 5),
    dim=st.integers(1, 8),
    scale=st.floats(0.0, 3.0),
    kind=st.sampled_from(["linear", "tanh", "cubic"]),
    nan_bound=st.one_of(st.none(), st.floats(0.5, 50.0)),
    solver=SOLVERS,
    param=st.integers(1, 8),
    max_steps=st.integers(1, 40),
    atol=st.sampled_from([0.0, 1e-8, 1e-4]),
    rtol=st.sampled_from([0.0, 1e-6, 1e-3]),
    mode=st.sampled_from(["raise", "return"]),
    lazy=st.booleans(),
)
def test_random_maps_are_handled_honestly(
    seed, batch, dim, scale, kind, nan_bound, solver, param, max_steps, atol, rtol, mode, lazy
):
    g = torch.Generator().manual_seed(seed)
    W = scale * torch.randn(dim, dim, generator=g, dtype=torch.float64) / max(dim, 1) ** 0.5
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)

    def f(z, x):
        h = z @ W.T + x
        out = {"linear": h, "tanh": torch.tanh(h), "cubic": h + 0.1 * h**3}[kind]
        if nan_bound is not None:
            out = torch.where(out.abs() > nan_bound, torch.full_like(out, float("nan")), out)
        return out

    s = _make(solver, max_steps, atol, rtol, param)
    z0 = torch.zeros_like(x)
    try:
        sol = deepeq.fixed_point(
            f, z0, s, args=(x,), nonfinite=mode, compaction="lazy" if lazy else "eager"
        )
    except FloatingPointError as e:
        assert mode == "raise" and "non-finite" in str(e)
        return
    st_ = sol.stats
    assert torch.isfinite(sol.value).all(), "silent NaN in the returned value"
    assert st_.nonfinite.any() == (sol.status is Status.NONFINITE)
    assert (st_.num_steps <= max_steps).all() and (st_.best_step <= st_.num_steps).all()
    # Re-evaluate f at the returned value: the reported residuals and flags are the truth.
    fz = f(sol.value, x)
    ok = ~st_.nonfinite
    res = (fz - sol.value).norm(dim=1)
    torch.testing.assert_close(st_.abs_residual[ok], res[ok], rtol=1e-6, atol=1e-12)
    conv = st_.abs_residual <= atol + rtol * fz.norm(dim=1)
    assert torch.equal(st_.converged[ok], conv[ok])
    if sol.status is Status.CONVERGED:
        assert st_.converged.all()
    elif sol.status is Status.MAX_STEPS:
        assert not st_.converged.all() and (st_.num_steps[~st_.converged] == max_steps).all()


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden", "broyden_ls"])
def test_float32_smoke(solver):
    g = torch.Generator().manual_seed(0)
    W = 0.5 * torch.randn(32, 32, generator=g) / 32**0.5
    x = torch.randn(16, 32, generator=g)
    sol = deepeq.fixed_point(
        lambda z, x: torch.tanh(z @ W.T + x),
        torch.zeros_like(x),
        _make(solver, 50, 0.0, 1e-5, 5),
        args=(x,),
    )
    assert sol.status is Status.CONVERGED and sol.value.dtype == torch.float32
