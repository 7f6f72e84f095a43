"""Public API contract: names, error messages, result record, dtype/device handling."""

import dataclasses
import re

import pytest
import torch

import deepeq
from deepeq import Anderson, Broyden, Picard, Status


def f_lin(z):
    return 0.5 * z + 1.0


def test_version_and_public_names():
    import types

    assert re.fullmatch(r"\d+\.\d+\.\d+.*", deepeq.__version__)
    public = {
        n
        for n in dir(deepeq)
        if not n.startswith("_") and not isinstance(getattr(deepeq, n), types.ModuleType)
    }
    # the whole public API: adding or removing a name must update this list (and the docs)
    assert public == {
        "AbstractBackward", "AbstractSolver", "Anderson", "BackwardStats", "Broyden", "ConvergenceWarning",
        "DEQ",
        "FixedPointCorrection", "ImplicitBackward", "JacobianSchedule", "PhantomBackward",
        "Picard", "Reversible", "ReversibleBackward", "SOLVERS", "Solution", "Stats", "Status",
        "UnrolledBackward", "fixed_point", "fixed_point_restarts", "path_independence",
        "PathIndependence", "Restarts", "jacobian_penalty", "make_solver", "spectral_norm", "spectral_radius", "unconverged_mask",
        "weight_norm",
    }  # fmt: skip
    for name in public:  # each is documented
        assert getattr(deepeq, name).__doc__, name


def test_solution_fields_shapes_and_types():
    z0 = torch.zeros(5, 3, 2)
    sol = deepeq.fixed_point(f_lin, z0, Anderson(rtol=1e-5), trace=True)
    assert sol.value.shape == z0.shape and sol.value.dtype == z0.dtype
    st = sol.stats
    for name in [
        "abs_residual",
        "rel_residual",
        "num_steps",
        "best_step",
        "converged",
        "nonfinite",
    ]:
        assert getattr(st, name).shape == (5,), name
    assert st.converged.dtype == torch.bool and st.num_steps.dtype == torch.long
    assert isinstance(st.nfe, int) and isinstance(st.sample_evals, int)
    # F, G: (B, m, D); H: (B, m, m); valid: (B, m); eye: (m, m); scale: (B, 1); all float32
    assert st.wall_time > 0
    assert st.buffer_bytes == 2 * 5 * 5 * 6 * 4 + (5 * 5 * 5 + 5 * 5 + 5 * 5 + 5) * 4
    # residuals are float64 whatever the state's dtype: they neither overflow nor underflow
    assert st.abs_residual.dtype == st.rel_residual.dtype == st.trace.dtype == torch.float64
    assert st.trace.shape == st.rel_trace.shape == (5, int(st.num_steps.max()) + 1)
    torch.testing.assert_close(st.rel_residual, st.abs_residual / (2.0 * 6**0.5), rtol=1e-2, atol=0)
    assert not sol.value.requires_grad
    with pytest.raises(dataclasses.FrozenInstanceError):
        sol.status = Status.MAX_STEPS
    no_trace = deepeq.fixed_point(f_lin, z0)
    assert no_trace.stats.trace is None and no_trace.stats.rel_trace is None


def test_status_values_are_explanations():
    for s in Status:
        assert len(s.value) > 20
    assert "max_steps" in Status.MAX_STEPS.value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_and_device_preserved(dtype, device):
    z0 = torch.zeros(4, 7, dtype=dtype, device=device)
    sol = deepeq.fixed_point(f_lin, z0, Broyden(rtol=1e-2))
    assert sol.value.dtype == dtype and sol.value.device == z0.device
    assert sol.stats.abs_residual.device == z0.device
    assert sol.status is Status.CONVERGED
    torch.testing.assert_close(
        sol.value.float(), torch.full((4, 7), 2.0, device=device), rtol=2e-2, atol=0
    )


def test_graph_only_when_something_requires_grad():
    lin = torch.nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.mul_(0.1)
    with torch.no_grad():
        sol = deepeq.fixed_point(lambda z: lin(z), torch.zeros(2, 4))
    assert sol.value.grad_fn is None and sol.backward is None
    sol = deepeq.fixed_point(lambda z: lin(z), torch.zeros(2, 4))
    assert sol.value.requires_grad and sol.backward is not None
    lin.requires_grad_(False)
    sol = deepeq.fixed_point(lambda z: lin(z), torch.zeros(2, 4))
    assert not sol.value.requires_grad and sol.backward is None
    assert sol.fz is not None and sol.z_leaf is not None and sol.z_leaf.requires_grad


# --- bad input gets one clear error -------------------------------------------------------


@pytest.mark.parametrize(
    ("z0", "exc", "match"),
    [
        (torch.zeros(3, 4, dtype=torch.long), TypeError, r"floating-point.*int64"),
        (torch.tensor(1.0), ValueError, r"batch dimension.*unsqueeze"),
        (torch.zeros(0, 4), ValueError, r"non-empty leading batch"),
        ([1.0, 2.0], TypeError, r"z0 must be a tensor"),
        ((), TypeError, r"z0 must be a tensor"),
        ((torch.zeros(2, 3), torch.zeros(3, 3)), ValueError, r"share batch size"),
        (torch.tensor([[float("nan")], [0.0]]), ValueError, r"non-finite.*\[0\]"),
    ],
)
def test_bad_z0(z0, exc, match):
    with pytest.raises(exc, match=match):
        deepeq.fixed_point(f_lin, z0)


@pytest.mark.parametrize(
    ("f", "exc", "match"),
    [
        (
            lambda z: z.sum(1),
            ValueError,
            r"same shape as z; expected Tensor\(shape=\(3, 4\).*got Tensor\(shape=\(3,\)",
        ),
        (lambda z: 1.0, TypeError, r"same structure.*got float"),
        (lambda z: (z, z), TypeError, r"same structure"),
        (lambda z: z.double(), TypeError, r"dtype of z0 \(torch.float32\).*float64"),
        (lambda z: z.to("meta"), ValueError, r"device of z0"),
    ],
)
def test_bad_f_output(f, exc, match):
    with pytest.raises(exc, match=match):
        deepeq.fixed_point(f, torch.zeros(3, 4))


def test_bad_tuple_output():
    z0 = (torch.zeros(2, 3), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"shapes \[\(2, 3\), \(2, 5\)\]"):
        deepeq.fixed_point(lambda z: (z[0], z[0]), z0)


def test_f_not_callable_and_bad_solver():
    with pytest.raises(TypeError, match="callable"):
        deepeq.fixed_point("tanh", torch.zeros(2, 2))
    with pytest.raises(TypeError, match="make_solver"):
        deepeq.fixed_point(f_lin, torch.zeros(2, 2), "anderson")
    with pytest.raises(ValueError, match="'raise' or 'return'"):
        deepeq.fixed_point(f_lin, torch.zeros(2, 2), nonfinite="ignore")


def test_args_batch_mismatch():
    with pytest.raises(
        ValueError, match=r"args\[1\] must be batched.*batch size 3.*shape \(2, 4\)"
    ):
        deepeq.fixed_point(
            lambda z, a, b: z * 0.5 + a + b,
            torch.zeros(3, 4),
            args=(torch.zeros(3, 4), torch.zeros(2, 4)),
        )
    with pytest.raises(ValueError, match=r"args\[0\] must be batched.*shape \(\)"):
        deepeq.fixed_point(lambda z, a: z * a, torch.zeros(3, 4), args=(torch.tensor(0.5),))


@pytest.mark.parametrize("cls", [Picard, Anderson, Broyden])
@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"max_steps": 0}, ValueError, r"max_steps must be >= 1; got 0"),
        ({"max_steps": 2.5}, TypeError, r"max_steps must be an int"),
        ({"max_steps": True}, TypeError, r"max_steps must be an int"),
        ({"atol": -1e-3}, ValueError, r"atol must be finite and >= 0"),
        ({"rtol": float("nan")}, ValueError, r"rtol must be finite"),
        ({"rtol": "1e-3"}, TypeError, r"rtol must be a float"),
        ({"tol": 1e-3}, TypeError, r"tol"),
    ],
)
def test_bad_solver_hyperparameters(cls, kw, exc, match):
    with pytest.raises(exc, match=match):
        cls(**kw)


@pytest.mark.parametrize(
    ("cls", "kw", "match"),
    [
        (Picard, {"damping": 1.0}, r"damping must be in \[0, 1\)"),
        (Anderson, {"damping": -0.1}, r"damping must be in \[0, 1\)"),
        (Anderson, {"history_length": 0}, r"history_length must be >= 1"),
        (Anderson, {"ridge": -1.0}, r"ridge must be >= 0"),
        (Broyden, {"history_length": 0}, r"history_length must be >= 1"),
        (Broyden, {"backtracks": -1}, r"backtracks must be >= 0"),
    ],
)
def test_bad_solver_specific(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(**kw)


def test_solvers_are_frozen_and_positional_free():
    s = Anderson()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_steps = 3
    with pytest.raises(TypeError):
        Anderson(1e-3)  # keyword-only


def test_make_solver():
    s = deepeq.make_solver("broyden", max_steps=7, line_search=True)
    assert s == Broyden(max_steps=7, line_search=True)
    with pytest.raises(
        ValueError,
        match=r"Unknown solver 'andersen'; expected one of \['anderson', 'broyden', 'picard', 'reversible'\]",
    ):
        deepeq.make_solver("andersen")
    with pytest.raises(
        TypeError,
        match=r"Unknown hyper-parameter\(s\) \['m'\] for solver 'anderson'; valid ones are \[.*history_length",
    ):
        deepeq.make_solver("anderson", m=5)
    assert set(deepeq.SOLVERS) == {"picard", "anderson", "broyden", "reversible"}
