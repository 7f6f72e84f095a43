"""Solvers against closed forms, per-sample convergence, accounting and failure statuses."""

import math

import pytest
import torch
from problems import DOTTIE, Counting, linear_problem, tanh_mlp_problem

import deepeq
from deepeq import Anderson, Broyden, Picard, Status

TIGHT = dict(atol=1e-11, rtol=0.0)


@pytest.fixture(params=["eager", "lazy"])
def compaction(request):
    """Both compaction policies: at once (CPU default) and in batches (accelerator default)."""
    return request.param


@pytest.fixture(autouse=True)
def _forward_only():
    """These tests are about the forward solve: no autograd, so no extra tracked call of f."""
    with torch.no_grad():
        yield


def solvers_for(rho: float):
    """Each solver with a step budget that the problem's difficulty needs."""
    picard_steps = int(math.log(1e-13) / math.log(rho)) + 20
    return [
        Picard(**TIGHT, max_steps=picard_steps),
        Picard(**TIGHT, max_steps=3 * picard_steps, damping=0.3),
        Anderson(**TIGHT, max_steps=600, history_length=10),
        Broyden(**TIGHT, max_steps=600, history_length=40),
        Broyden(**TIGHT, max_steps=600, history_length=40, line_search=True),
    ]


def assert_meets_tolerance(sol, f, args, solver):
    v = sol.value
    fz = f(v, *args)
    res = (fz - v).flatten(1).norm(dim=1)
    bound = solver.atol + solver.rtol * fz.flatten(1).norm(dim=1)
    assert (res <= bound * (1 + 1e-6) + 1e-13).all(), (res, bound)
    torch.testing.assert_close(sol.stats.abs_residual, res, rtol=1e-6, atol=1e-13)


@pytest.mark.parametrize("rho", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("which", range(5))
def test_linear_closed_form(rho, which, gen):
    solver = solvers_for(rho)[which]
    f, b, z_star = linear_problem(rho, dim=16, batch=4, gen=gen)
    sol = deepeq.fixed_point(f, torch.zeros_like(b), solver, args=(b,))
    assert sol.status is Status.CONVERGED, sol.stats
    assert_meets_tolerance(sol, f, (b,), solver)
    # ||z - z*|| <= ||(I-A)^-1|| * residual = residual / (1 - rho)
    err = (sol.value - z_star).norm(dim=1)
    assert (err <= sol.stats.abs_residual / (1 - rho) + 1e-12).all()
    assert sol.stats.converged.all()


@pytest.mark.parametrize("which", range(5))
def test_cos(which):
    solver = solvers_for(0.7)[which]
    z0 = torch.linspace(-1.0, 3.0, 6, dtype=torch.float64).reshape(6, 1)
    sol = deepeq.fixed_point(lambda z: torch.cos(z), z0, solver)
    assert sol.status is Status.CONVERGED
    torch.testing.assert_close(sol.value, torch.full_like(z0, DOTTIE), atol=1e-10, rtol=0)


@pytest.mark.parametrize("which", range(5))
def test_tanh_mlp(which, gen):
    solver = solvers_for(0.8)[which]
    f, x, z_star = tanh_mlp_problem(dim=12, batch=5, gen=gen)
    sol = deepeq.fixed_point(f, torch.zeros_like(x), solver, args=(x,))
    assert sol.status is Status.CONVERGED
    assert_meets_tolerance(sol, f, (x,), solver)
    torch.testing.assert_close(sol.value, z_star, atol=1e-9, rtol=0)


@pytest.mark.parametrize("which", range(5))
@pytest.mark.parametrize("container", [tuple, list])
def test_tuple_state_equals_flat(which, container, gen):
    solver = solvers_for(0.8)[which]
    f, x, _ = tanh_mlp_problem(dim=3 * 4 + 5, batch=3, gen=gen)

    def f_tuple(z, x):
        flat = torch.cat([z[0].flatten(1), z[1]], dim=1)
        out = f(flat, x)
        return container([out[:, :12].reshape(-1, 3, 4), out[:, 12:]])

    z0 = container(
        [torch.zeros(3, 3, 4, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.float64)]
    )
    sol_t = deepeq.fixed_point(f_tuple, z0, solver, args=(x,))
    sol_f = deepeq.fixed_point(f, torch.zeros_like(x), solver, args=(x,))
    assert isinstance(sol_t.value, container) and sol_t.value[0].shape == (3, 3, 4)
    flat = torch.cat([sol_t.value[0].flatten(1), sol_t.value[1]], dim=1)
    torch.testing.assert_close(flat, sol_f.value, atol=1e-13, rtol=0)
    assert sol_t.stats.nfe == sol_f.stats.nfe
    assert torch.equal(sol_t.stats.num_steps, sol_f.stats.num_steps)


ALL = [
    Picard(atol=1e-9, rtol=0.0, max_steps=300),
    Anderson(atol=1e-9, rtol=0.0, max_steps=200),
    Broyden(atol=1e-9, rtol=0.0, max_steps=200),
    Broyden(atol=1e-9, rtol=0.0, max_steps=200, line_search=True),
    Anderson(rtol=1e-6, max_steps=200),
]


def _scaled_problem(gen, batch=6, dim=10):
    """f(z, x, s) = tanh(s * z Wᵀ + x): per-sample contraction factor s (easy ... hard)."""
    W = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    W = W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    s = torch.linspace(0.05, 0.95, batch, dtype=torch.float64).reshape(batch, 1)

    def f(z, x, s):
        return torch.tanh(s * (z @ W.T) + x)

    return f, x, s


@pytest.mark.parametrize("solver", ALL, ids=repr)
def test_per_sample_independence(solver, gen, compaction):
    f, x, s = _scaled_problem(gen)
    batch = deepeq.fixed_point(f, torch.zeros_like(x), solver, args=(x, s), compaction=compaction)
    for i in range(x.shape[0]):
        one = deepeq.fixed_point(
            f,
            torch.zeros_like(x[i : i + 1]),
            solver,
            args=(x[i : i + 1], s[i : i + 1]),
            compaction=compaction,
        )
        torch.testing.assert_close(batch.value[i : i + 1], one.value, atol=1e-12, rtol=0)
        assert batch.stats.num_steps[i] == one.stats.num_steps[0]
        assert batch.stats.best_step[i] == one.stats.best_step[0]
    # Reversing the batch order changes nothing either.
    rev = deepeq.fixed_point(
        f, torch.zeros_like(x), solver, args=(x.flip(0), s.flip(0)), compaction=compaction
    )
    torch.testing.assert_close(rev.value.flip(0), batch.value, atol=1e-12, rtol=0)


@pytest.mark.parametrize("solver", ALL, ids=repr)
def test_easy_samples_stop_early_and_stay_frozen(solver, gen, compaction):
    f, x, s = _scaled_problem(gen)
    counting = Counting(f)
    sol = deepeq.fixed_point(
        counting, torch.zeros_like(x), solver, args=(x, s), trace=True, compaction=compaction
    )
    st = sol.stats
    assert sol.status is Status.CONVERGED
    assert st.num_steps[0] < st.num_steps[-1]  # s=0.05 needs fewer steps than s=0.95
    # Compute falls as samples converge: fewer per-sample evaluations than nfe * B.
    assert st.sample_evals < st.nfe * x.shape[0]
    # The driver's accounting matches an independent counter.
    assert st.nfe == counting.calls and st.sample_evals == counting.rows
    # Frozen: after a sample stops, its trace stays constant.
    for i in range(x.shape[0]):
        n = int(st.num_steps[i])
        assert (st.trace[i, n:] == st.trace[i, n]).all()
    assert st.trace.shape == (x.shape[0], int(st.num_steps.max()) + 1)


def test_nfe_accounting_full_batch(gen):
    f, b, _ = linear_problem(0.5, dim=8, batch=3, gen=gen)
    counting = Counting(f)
    sol = deepeq.fixed_point(
        counting, torch.zeros_like(b), Picard(max_steps=7, rtol=0.0), args=(b,)
    )
    assert sol.status is Status.MAX_STEPS
    assert sol.stats.nfe == counting.calls == 8  # f(z0) plus one per step
    assert sol.stats.sample_evals == counting.rows == 8 * 3
    assert (sol.stats.num_steps == 7).all()


@pytest.mark.parametrize("solver", [Picard(), Anderson(), Broyden()], ids=repr)
def test_max_steps_status_and_throw(solver, gen):
    f, b, _ = linear_problem(0.99, dim=8, batch=3, gen=gen)
    tight = type(solver)(atol=1e-12, rtol=0.0, max_steps=3)
    sol = deepeq.fixed_point(f, torch.zeros_like(b), tight, args=(b,))
    assert sol.status is Status.MAX_STEPS
    assert not sol.stats.converged.any()
    assert (sol.stats.num_steps == 3).all()
    with pytest.raises(RuntimeError, match="MAX_STEPS"):
        sol.raise_for_status()
    with pytest.raises(RuntimeError, match="max_steps"):
        deepeq.fixed_point(f, torch.zeros_like(b), tight, args=(b,), throw=True)


@pytest.mark.parametrize("solver", ALL, ids=repr)
def test_best_iterate_is_lowest_residual(solver, gen, compaction):
    # Oscillating map (eigenvalues near -1): residuals are not monotone.
    f, b, _ = linear_problem(0.97, dim=8, batch=4, gen=gen)
    sol = deepeq.fixed_point(
        f,
        torch.zeros_like(b),
        type(solver)(atol=0.0, rtol=0.0, max_steps=15),
        args=(b,),
        trace=True,
        compaction=compaction,
    )
    st = sol.stats
    torch.testing.assert_close(st.abs_residual, st.trace.min(dim=1).values, rtol=0, atol=0)
    assert (st.abs_residual <= st.trace[:, -1]).all()
    picked = st.trace.gather(1, st.best_step.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(picked, st.abs_residual, rtol=0, atol=0)


def _nan_beyond(threshold):
    """f(z, x, c) = c z + x, NaN once |f| exceeds the threshold. With c = 1, x = 1 there is no
    fixed point and iterates drift to the NaN region; c = 0.5 is a contraction."""

    def f(z, x, c):
        out = c * z + x
        return torch.where(out.abs() > threshold, torch.full_like(out, float("nan")), out)

    return f


NAN_X = torch.tensor([[0.5], [1.0], [-0.5]], dtype=torch.float64)
NAN_C = torch.tensor([[0.5], [1.0], [0.5]], dtype=torch.float64)  # sample 1 has no fixed point


def test_nonfinite_raises_with_step_and_sample():
    with pytest.raises(FloatingPointError, match=r"step 20 for sample\(s\) \[1\]"):
        deepeq.fixed_point(
            _nan_beyond(20.5), torch.zeros_like(NAN_X), Picard(max_steps=50), args=(NAN_X, NAN_C)
        )


@pytest.mark.parametrize("solver", ALL, ids=repr)
def test_nonfinite_return_mode(solver, compaction):
    x, f = NAN_X, _nan_beyond(20.5)
    sol = deepeq.fixed_point(
        f, torch.zeros_like(x), solver, args=(x, NAN_C), nonfinite="return", compaction=compaction
    )
    if getattr(solver, "line_search", False):
        # Backtracking never accepts a step (||g|| is constant), so sample 1 creeps and never
        # reaches the NaN region: the honest answer is MAX_STEPS.
        assert sol.status is Status.MAX_STEPS
        assert sol.stats.converged.tolist() == [True, False, True]
        return
    assert sol.status is Status.NONFINITE
    assert sol.stats.nonfinite.tolist() == [False, True, False]
    assert sol.stats.converged.tolist() == [True, False, True]
    assert torch.isfinite(sol.value).all()
    assert torch.isfinite(sol.stats.abs_residual).all()
    assert sol.stats.abs_residual[1] > 0
    # throw=True does not override an explicit nonfinite="return".
    deepeq.fixed_point(
        f,
        torch.zeros_like(x),
        solver,
        args=(x, NAN_C),
        nonfinite="return",
        throw=True,
        compaction=compaction,
    )


def test_picard_damping_definition(gen):
    z = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    fz = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    solver = Picard(damping=0.3)
    z_next, _, _ = solver.step(lambda v: v, z, fz, solver.init(None, z, fz))
    torch.testing.assert_close(z_next, 0.7 * fz + 0.3 * z)


def test_anderson_safeguard_singular_history():
    # f(z) = z + 1 has no fixed point and constant residuals: the mixing system is exactly
    # singular with ridge=0. The safeguard must fall back to Picard steps, never crash.
    z0 = torch.zeros(3, 4, dtype=torch.float64)
    sol = deepeq.fixed_point(lambda z: z + 1, z0, Anderson(ridge=0.0, max_steps=12))
    assert sol.status is Status.MAX_STEPS
    assert torch.isfinite(sol.value).all()


def test_anderson_ridge_does_not_stall(gen):
    # The relative ridge lets Anderson reach residuals far below an absolute ridge of 1e-4.
    f, x, _ = tanh_mlp_problem(dim=32, batch=4, gen=gen, norm=0.9)
    sol = deepeq.fixed_point(
        f, torch.zeros_like(x), Anderson(atol=1e-12, rtol=0.0, max_steps=100), args=(x,)
    )
    assert sol.status is Status.CONVERGED
    picard = deepeq.fixed_point(
        f, torch.zeros_like(x), Picard(atol=1e-12, rtol=0.0, max_steps=1000), args=(x,)
    )
    assert sol.stats.nfe < picard.stats.nfe


def test_broyden_nan_safe_update():
    # Constant residual: y = 0 makes every Broyden denominator 0; updates must be skipped.
    z0 = torch.zeros(3, 4, dtype=torch.float64)
    sol = deepeq.fixed_point(lambda z: z + 1, z0, Broyden(max_steps=6))
    assert sol.status is Status.MAX_STEPS
    assert torch.isfinite(sol.value).all()


def test_broyden_history_restarts_when_full(gen):
    f, b, z_star = linear_problem(0.9, dim=16, batch=3, gen=gen)
    sol = deepeq.fixed_point(
        f,
        torch.zeros_like(b),
        Broyden(atol=1e-10, rtol=0.0, max_steps=400, history_length=3),
        args=(b,),
    )
    assert sol.status is Status.CONVERGED
    torch.testing.assert_close(sol.value, z_star, atol=1e-8, rtol=0)
    assert sol.stats.buffer_bytes == 2 * 3 * 3 * 16 * 8


def test_broyden_line_search_backtracks_only_failing_samples(gen):
    # A strongly nonlinear map where full quasi-Newton steps overshoot for some samples.
    dim = 6
    W = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    W = 2.5 * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(8, dim, generator=gen, dtype=torch.float64)

    def f(z, x):
        return torch.tanh(z @ W.T + x)

    counting = Counting(f)
    solver = Broyden(atol=1e-9, rtol=0.0, max_steps=100, line_search=True)
    sol = deepeq.fixed_point(counting, torch.zeros_like(x), solver, args=(x,), nonfinite="return")
    st = sol.stats
    assert st.nfe == counting.calls and st.sample_evals == counting.rows
    # Trial evaluations happened (more calls than steps) on a subset only.
    assert st.nfe > int(st.num_steps.max()) + 1
    assert st.sample_evals < st.nfe * x.shape[0]
    assert sol.status is Status.CONVERGED
    assert_meets_tolerance(sol, f, (x,), solver)


def test_independent_false_mixes_samples(gen):
    # f couples samples through the batch mean: it must run on the full batch.
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)

    def f(z, x):
        return 0.5 * torch.tanh(z - z.mean(0, keepdim=True)) + x

    counting = Counting(f)
    sol = deepeq.fixed_point(
        counting,
        torch.zeros_like(x),
        Anderson(atol=1e-11, rtol=0.0, max_steps=100),
        args=(x,),
        independent=False,
    )
    assert sol.status is Status.CONVERGED
    v = sol.value
    torch.testing.assert_close(f(v, x), v, atol=1e-9, rtol=0)
    assert counting.rows == counting.calls * 5


def test_closure_over_per_sample_tensor_gets_clear_error(gen):
    f, x, s = _scaled_problem(gen)
    with pytest.raises(RuntimeError, match="args="):
        deepeq.fixed_point(lambda z: f(z, x, s), torch.zeros_like(x), Picard(max_steps=200))
    # ... and works with independent=False (the batch then converges as a whole: every sample
    # meets the tolerance at the returned batch iterate).
    sol = deepeq.fixed_point(
        lambda z: f(z, x, s), torch.zeros_like(x), Picard(max_steps=200), independent=False
    )
    assert sol.status is Status.CONVERGED
    v = sol.value
    assert bool(((f(v, x, s) - v).norm(dim=1) <= 1e-3 * f(v, x, s).norm(dim=1)).all())
    ref = deepeq.fixed_point(
        f, torch.zeros_like(x), Picard(rtol=1e-12, max_steps=2000), args=(x, s)
    )
    torch.testing.assert_close(
        sol.value, ref.value, atol=0.05 * float(ref.value.abs().max()), rtol=0
    )


def test_nested_and_non_tensor_args(gen):
    f, x, s = _scaled_problem(gen)

    def g(z, pair, scale):
        return f(z, pair[0], pair[1]) * scale

    sol = deepeq.fixed_point(g, torch.zeros_like(x), Anderson(rtol=1e-9), args=((x, s), 1.0))
    ref = deepeq.fixed_point(f, torch.zeros_like(x), Anderson(rtol=1e-9), args=(x, s))
    torch.testing.assert_close(sol.value, ref.value)


def test_rtol_only_stopping_rule(gen):
    f, x, _ = tanh_mlp_problem(dim=8, batch=3, gen=gen)
    solver = Anderson(rtol=1e-3)
    sol = deepeq.fixed_point(f, torch.zeros_like(x), solver, args=(x,))
    assert sol.status is Status.CONVERGED
    assert (sol.stats.rel_residual <= 1e-3).all()
    assert_meets_tolerance(sol, f, (x,), solver)


def test_already_converged_z0(gen):
    f, b, z_star = linear_problem(0.5, dim=4, batch=2, gen=gen)
    sol = deepeq.fixed_point(f, z_star, Broyden(atol=1e-8, rtol=0.0), args=(b,))
    assert sol.status is Status.CONVERGED
    assert sol.stats.nfe == 1 and (sol.stats.num_steps == 0).all()
    assert torch.equal(sol.value, z_star)


@pytest.mark.parametrize("which", ["picard", "anderson", "broyden"])
def test_zero_fixed_point_with_rtol_only_converges_at_once(which):
    # f(0) = 0: the relative residual is 0/0; it must count as converged (found by an MDEQ whose
    # injection was zeroed at initialisation), not as NaN that never meets the tolerance.
    solver = {"picard": Picard, "anderson": Anderson, "broyden": Broyden}[which](rtol=1e-3)
    sol = deepeq.fixed_point(lambda z: 0.5 * z, torch.zeros(3, 4), solver)
    assert sol.status is Status.CONVERGED
    assert sol.stats.nfe == 1 and (sol.stats.num_steps == 0).all()


@pytest.mark.parametrize("small", [True, False])
def test_history_products_agree_on_both_cpu_paths(small, monkeypatch, gen):
    # bmv/bvm switch between multiply-and-sum and bmm by size; both paths must give the products.
    from deepeq.solvers import _base

    monkeypatch.setattr(_base, "_SMALL_BMV", 1 << 40 if small else 0)
    monkeypatch.setattr(_base, "_SMALL_BVM", 1 << 40 if small else 0)
    A = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(_base.bmv(A, x), torch.einsum("bnd,bd->bn", A, x))
    torch.testing.assert_close(_base.bvm(w, A), torch.einsum("bn,bnd->bd", w, A))


@pytest.mark.parametrize("solver", ALL, ids=repr)
def test_compaction_changes_the_cost_not_the_result(solver, gen):
    f, x, s = _scaled_problem(gen)
    eager, lazy = (
        deepeq.fixed_point(f, torch.zeros_like(x), solver, args=(x, s), compaction=c)
        for c in ("eager", "lazy")
    )
    # the same solve up to float rounding (a matrix product over fewer rows may round otherwise)
    torch.testing.assert_close(eager.value, lazy.value, atol=1e-12, rtol=0)
    assert torch.equal(eager.stats.num_steps, lazy.stats.num_steps)
    assert eager.stats.sample_evals < lazy.stats.sample_evals or bool(
        (eager.stats.num_steps == eager.stats.num_steps[0]).all()
    )  # eager drops stopped samples at once: fewer sample evaluations of f
    with pytest.raises(ValueError, match="compaction must be 'auto', 'eager' or 'lazy'"):
        deepeq.fixed_point(f, torch.zeros_like(x), solver, args=(x, s), compaction="never")
