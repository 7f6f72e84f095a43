"""Gradients through the equilibrium: three oracles (finite differences, unrolled autograd,
closed form), phantom steps, fallback, double backward and O(1) memory."""

import logging

import pytest
import torch

import deepeq
from deepeq import Broyden, ImplicitBackward, PhantomBackward, Picard, UnrolledBackward
from deepeq.analysis import saved_bytes

F64 = torch.float64
EXACT = dict(atol=1e-13, rtol=0.0, max_steps=300)
IMPLICIT = ImplicitBackward(solver=Broyden(**EXACT))


def tanh_layer(W):
    def f(z, x):
        return torch.tanh(z @ W.T + x)

    return f


def _contraction(gen, dim, norm=0.5):
    W = torch.randn(dim, dim, generator=gen, dtype=F64)
    return norm * W / torch.linalg.matrix_norm(W, 2)


def test_gradcheck_inputs_and_parameters(gen):
    W = _contraction(gen, 4).requires_grad_()
    x = torch.randn(3, 4, generator=gen, dtype=F64, requires_grad=True)

    def fn(x, W):
        return deepeq.fixed_point(
            tanh_layer(W),
            torch.zeros(3, 4, dtype=F64),
            Broyden(**EXACT),
            args=(x,),
            backward=IMPLICIT,
        ).value

    assert torch.autograd.gradcheck(fn, (x, W), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradcheck_tuple_state(gen):
    W = _contraction(gen, 5).requires_grad_()
    x = torch.randn(2, 5, generator=gen, dtype=F64, requires_grad=True)

    def f(z, x):
        out = torch.tanh(torch.cat([z[0], z[1]], 1) @ W.T + x)
        return (out[:, :2], out[:, 2:])

    def fn(x, W):
        z0 = (torch.zeros(2, 2, dtype=F64), torch.zeros(2, 3, dtype=F64))
        v = deepeq.fixed_point(f, z0, Broyden(**EXACT), args=(x,), backward=IMPLICIT).value
        return v[0].sum(1) + 2 * v[1].sum(1)

    assert torch.autograd.gradcheck(fn, (x, W), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize(
    "solver",
    [Broyden(**EXACT), deepeq.Anderson(**EXACT, history_length=8), Picard(**EXACT)],
    ids=repr,
)
def test_implicit_matches_unrolled(solver, gen):
    W = _contraction(gen, 6).requires_grad_()
    x = torch.randn(4, 6, generator=gen, dtype=F64, requires_grad=True)
    c = torch.randn(4, 6, generator=gen, dtype=F64)
    grads, values = [], []
    for backward, fwd in [
        (ImplicitBackward(solver=solver), solver),
        (UnrolledBackward(), Picard(**EXACT)),
    ]:
        sol = deepeq.fixed_point(
            tanh_layer(W), torch.zeros(4, 6, dtype=F64), fwd, args=(x,), backward=backward
        )
        grads.append(torch.autograd.grad((sol.value * c).sum(), (x, W)))
        values.append(sol.value.detach())
    for gi, gu in zip(*grads, strict=True):
        assert ((gi - gu).norm() / gu.norm()).item() <= 1e-8
    torch.testing.assert_close(values[0], values[1], atol=1e-12, rtol=0)


def test_closed_form_linear(gen):
    D, P = 5, 3
    A = _contraction(gen, D, norm=0.8)
    Bm = torch.randn(D, P, generator=gen, dtype=F64)
    x = torch.randn(4, P, generator=gen, dtype=F64, requires_grad=True)
    c = torch.randn(4, D, generator=gen, dtype=F64)
    sol = deepeq.fixed_point(
        lambda z, x: z @ A.T + x @ Bm.T,
        torch.zeros(4, D, dtype=F64),
        Broyden(**EXACT),
        args=(x,),
        backward=IMPLICIT,
    )
    (sol.value * c).sum().backward()
    # dl/dx = Bᵀ (I - A)^-ᵀ dl/dz*, row by row: c (I - A)^-1 Bm
    expected = torch.linalg.solve((torch.eye(D, dtype=F64) - A).T, c.T).T @ Bm
    torch.testing.assert_close(x.grad, expected, atol=1e-11, rtol=1e-10)
    z_star = torch.linalg.solve(torch.eye(D, dtype=F64) - A, (x @ Bm.T).T).T
    torch.testing.assert_close(sol.value, z_star, atol=1e-11, rtol=0)


@pytest.mark.parametrize(("steps", "damping"), [(1, 0.0), (3, 0.0), (4, 0.3)])
def test_phantom_equals_autograd_through_k_steps(steps, damping, gen):
    W = _contraction(gen, 6).requires_grad_()
    x = torch.randn(3, 6, generator=gen, dtype=F64, requires_grad=True)
    f = tanh_layer(W)
    solver = Picard(atol=1e-6, rtol=0.0)
    sol = deepeq.fixed_point(
        f,
        torch.zeros(3, 6, dtype=F64),
        solver,
        args=(x,),
        backward=PhantomBackward(steps=steps, damping=damping),
    )
    g_ph = torch.autograd.grad(sol.value.sum(), (x, W))
    with torch.no_grad():
        z = deepeq.fixed_point(f, torch.zeros(3, 6, dtype=F64), solver, args=(x,)).value
    for _ in range(steps):
        z = (1 - damping) * f(z, x) + damping * z
    g_ref = torch.autograd.grad(z.sum(), (x, W))
    torch.testing.assert_close(sol.value, z, atol=1e-14, rtol=0)
    for a, b in zip(g_ph, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-12)


def test_phantom_approaches_implicit(gen):
    W = _contraction(gen, 6).requires_grad_()
    x = torch.randn(3, 6, generator=gen, dtype=F64, requires_grad=True)
    ref = torch.autograd.grad(
        deepeq.fixed_point(
            tanh_layer(W),
            torch.zeros(3, 6, dtype=F64),
            Broyden(**EXACT),
            args=(x,),
            backward=IMPLICIT,
        ).value.sum(),
        x,
    )[0]
    errs = []
    for k in (1, 5, 30):
        sol = deepeq.fixed_point(
            tanh_layer(W),
            torch.zeros(3, 6, dtype=F64),
            Broyden(**EXACT),
            args=(x,),
            backward=PhantomBackward(steps=k),
        )
        errs.append((torch.autograd.grad(sol.value.sum(), x)[0] - ref).norm().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-8


def test_values_do_not_depend_on_backward_rule(gen):
    W = _contraction(gen, 6).requires_grad_()
    x = torch.randn(3, 6, generator=gen, dtype=F64)
    solver = deepeq.Anderson(atol=1e-9, rtol=0.0)
    with torch.no_grad():
        ref = deepeq.fixed_point(
            tanh_layer(W), torch.zeros(3, 6, dtype=F64), solver, args=(x,)
        ).value
    for backward in (ImplicitBackward(), UnrolledBackward()):
        v = deepeq.fixed_point(
            tanh_layer(W), torch.zeros(3, 6, dtype=F64), solver, args=(x,), backward=backward
        ).value
        assert v.requires_grad
        torch.testing.assert_close(v.detach(), ref, atol=0, rtol=0)


def test_unrolled_through_every_solver_is_differentiable(gen):
    # Anderson and Broyden keep histories in buffers; in autograd mode they must not be
    # modified in place after being saved.
    W = _contraction(gen, 5).requires_grad_()
    x = torch.randn(3, 5, generator=gen, dtype=F64, requires_grad=True)
    for solver in (
        deepeq.Anderson(atol=1e-10, rtol=0.0),
        Broyden(atol=1e-10, rtol=0.0, line_search=True),
    ):
        sol = deepeq.fixed_point(
            tanh_layer(W),
            torch.zeros(3, 5, dtype=F64),
            solver,
            args=(x,),
            backward=UnrolledBackward(),
        )
        gx, gW = torch.autograd.grad(sol.value.sum(), (x, W))
        ref = torch.autograd.grad(
            deepeq.fixed_point(
                tanh_layer(W), torch.zeros(3, 5, dtype=F64), solver, args=(x,), backward=IMPLICIT
            ).value.sum(),
            (x, W),
        )
        torch.testing.assert_close(gx, ref[0], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(gW, ref[1], atol=1e-7, rtol=1e-6)


def test_gradients_reach_args_closures_and_parameters(gen):
    lin = torch.nn.Linear(4, 4).double()
    with torch.no_grad():
        lin.weight.mul_(0.3)
    scale = torch.tensor(0.5, dtype=F64, requires_grad=True)  # closed over
    x = torch.randn(2, 4, generator=gen, dtype=F64, requires_grad=True)  # in args
    sol = deepeq.fixed_point(
        lambda z, x: torch.tanh(scale * lin(z) + x), torch.zeros(2, 4, dtype=F64), args=(x,)
    )
    sol.value.sum().backward()
    for t in (x, scale, lin.weight, lin.bias):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_backward_stats_after_backward(gen):
    W = _contraction(gen, 6).requires_grad_()
    x = torch.randn(3, 6, generator=gen, dtype=F64)
    sol = deepeq.fixed_point(tanh_layer(W), torch.zeros(3, 6, dtype=F64), args=(x,))
    b = sol.backward
    assert b.calls == 0 and b.status is None
    sol.value.sum().backward()
    assert b.calls == 1 and b.status is deepeq.Status.CONVERGED and b.nfe > 1
    assert b.abs_residual.shape == (3,) and not b.fallback.any() and b.wall_time > 0
    assert (b.rel_residual <= 1e-4).all()


def test_backward_max_steps_is_counted_not_fallback(gen):
    W = _contraction(gen, 6, norm=0.9).requires_grad_()
    x = torch.randn(3, 6, generator=gen, dtype=F64)
    backward = ImplicitBackward(solver=Picard(atol=1e-14, rtol=0.0, max_steps=2))
    sol = deepeq.fixed_point(
        tanh_layer(W), torch.zeros(3, 6, dtype=F64), args=(x,), backward=backward
    )
    sol.value.sum().backward()
    assert sol.backward.status is deepeq.Status.MAX_STEPS
    assert not sol.backward.fallback.any()


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_backward_solve_starts_at_v_no_wasted_vjp(steps, gen):
    # Linear f(z) = A z + x: the backward fixed point is g = Aᵀ g + v. Started at g = v, the
    # initial evaluation and k Picard steps use k + 1 vjps and return the iterate g_k, the
    # k + 1-term Neumann sum Σ_{i<=k} (Aᵀ)^i v; a start at g = 0 would spend the first vjp on
    # Aᵀ0 = 0 and be one term short.
    A = _contraction(gen, 5, norm=0.8)
    x = torch.randn(2, 5, generator=gen, dtype=F64, requires_grad=True)
    v = torch.randn(2, 5, generator=gen, dtype=F64)
    backward = ImplicitBackward(solver=Picard(atol=0.0, rtol=0.0, max_steps=steps))
    sol = deepeq.fixed_point(
        lambda z, x: z @ A.T + x, torch.zeros(2, 5, dtype=F64), Broyden(**EXACT), args=(x,),
        backward=backward,
    )  # fmt: skip
    (sol.value * v).sum().backward()
    term, expected = v, v
    for _ in range(steps):
        term = term @ A  # (Aᵀ)^i v, row-wise
        expected = expected + term
    # dL/dx = gᵀ ∂f/∂x = g; the driver returns the last iterate g_k (its residual is the lowest)
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)
    assert sol.backward.nfe == steps + 1


def test_backward_of_a_z_independent_f_takes_one_vjp(gen):
    x = torch.randn(3, 4, generator=gen, dtype=F64, requires_grad=True)
    sol = deepeq.fixed_point(lambda z, x: 0 * z + 2 * x, torch.zeros(3, 4, dtype=F64), args=(x,))
    sol.value.sum().backward()
    assert sol.backward.status is deepeq.Status.CONVERGED and sol.backward.nfe == 1
    torch.testing.assert_close(x.grad, 2 * torch.ones_like(x))


def test_shine_is_exact_for_scalar_linear_maps():
    """f(z) = a z + x per sample (D = 1): Broyden is the secant method, its inverse estimate is
    exactly (a - 1)⁻¹ after one update, so SHINE with no backward iteration gives the implicit
    gradient 1/(1-a). The a = 0 sample stops one step earlier than the others (recorded at its
    own stop), and the Jacobian-free gradient (init "v") gives 1 instead."""
    a = torch.tensor([[0.3], [0.7], [-0.5], [0.9], [0.0]], dtype=F64)
    grads = {}
    for init in ("v", "shine"):
        x = torch.tensor([[-1.0], [0.5], [0.25], [2.0], [1.5]], dtype=F64, requires_grad=True)
        sol = deepeq.fixed_point(
            lambda z, x, a: a * z + x,
            torch.zeros(5, 1, dtype=F64),
            Broyden(**EXACT),
            args=(x, a),
            backward=ImplicitBackward(solver=None, init=init),
        )
        sol.value.sum().backward()
        assert sol.backward.nfe == 0 and sol.backward.rel_residual is None
        grads[init] = x.grad
        steps = sol.stats.num_steps
    assert steps[4] < steps[0]  # the samples stopped at different steps
    torch.testing.assert_close(grads["shine"], 1 / (1 - a), rtol=1e-12, atol=0)
    torch.testing.assert_close(grads["v"], torch.ones_like(a))


def test_recorded_inverse_estimate_has_only_the_used_slots():
    from deepeq._driver import DriverOptions, solve
    from deepeq._flatten import layout_of

    a = torch.tensor([[0.3], [0.0]], dtype=F64)
    x = torch.tensor([[1.0], [2.0]], dtype=F64)
    z0 = torch.zeros(2, 1, dtype=F64)
    solver = Broyden(**EXACT)
    r = solve(lambda z, x, a: a * z + x, z0, solver, layout_of(z0), (x, a),
              DriverOptions(state=True))  # fmt: skip
    assert r.stats.num_steps.tolist() == [2, 1]
    # 2 slots used (of history_length=20); the sample that stopped after 1 update has a zero 2nd
    U, V = solver.inverse_estimate(r.final.state)
    assert U.shape == (2, 2, 1) and V.shape == (2, 2, 1)
    assert U[1, 1].item() == 0.0 and V[1, 1].item() == 0.0
    # I - Σ u v = (1 - a)⁻¹ for these scalar maps
    est = 1 - (U * V).sum((1, 2))
    torch.testing.assert_close(est, 1 / (1 - a.squeeze(1)), rtol=1e-12, atol=0)
    # a solver that keeps no estimate hands out no state and has no estimate
    solver = deepeq.Anderson(**EXACT)
    r = solve(lambda z, x, a: a * z + x, z0, solver, layout_of(z0), (x, a),
              DriverOptions(state=True))  # fmt: skip
    assert r.final.state is None
    assert solver.inverse_estimate(()) is None


def test_shine_start_is_refined_to_the_implicit_gradient(gen):
    W = _contraction(gen, 6, norm=0.8).requires_grad_()
    x = torch.randn(3, 6, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(3, 6, generator=gen, dtype=F64)
    out = {}
    for init in ("v", "shine"):
        sol = deepeq.fixed_point(
            tanh_layer(W),
            torch.zeros(3, 6, dtype=F64),
            Broyden(**EXACT),
            args=(x,),
            backward=ImplicitBackward(solver=deepeq.Anderson(**EXACT), init=init),
        )
        out[init] = torch.autograd.grad((sol.value * w).sum(), (x, W))
        assert sol.backward.status is deepeq.Status.CONVERGED
    for a, b in zip(out["v"], out["shine"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # and without refinement SHINE is an approximation that differs from the exact gradient
    sol = deepeq.fixed_point(
        tanh_layer(W), torch.zeros(3, 6, dtype=F64), Broyden(**EXACT), args=(x,),
        backward=ImplicitBackward(solver=None, init="shine"),
    )  # fmt: skip
    approx = torch.autograd.grad((sol.value * w).sum(), x)[0]
    assert (approx - out["v"][0]).abs().max() > 1e-4


def test_backward_without_iterations_is_the_jacobian_free_gradient(gen):
    W = _contraction(gen, 4)
    x = torch.randn(3, 4, generator=gen, dtype=F64, requires_grad=True)
    grads = []
    for rule in (ImplicitBackward(solver=None), PhantomBackward(steps=1)):
        sol = deepeq.fixed_point(
            tanh_layer(W), torch.zeros(3, 4, dtype=F64), Broyden(**EXACT), args=(x,), backward=rule
        )
        grads.append(torch.autograd.grad(sol.value.sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_shine_needs_a_forward_solver_with_an_inverse_estimate():
    x = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"Anderson does not keep.*Broyden"):
        deepeq.fixed_point(
            lambda z, x: 0.5 * z + x,
            torch.zeros(2, 3),
            deepeq.Anderson(),
            args=(x,),
            backward=ImplicitBackward(init="shine"),
        )
    with pytest.raises(ValueError, match=r"Anderson does not keep"):  # at construction already
        deepeq.DEQ(
            torch.nn.Linear(3, 3), solver=deepeq.Anderson(), backward=ImplicitBackward(init="shine")
        )
    deepeq.DEQ(torch.nn.Linear(3, 3), solver=Broyden(), backward=ImplicitBackward(init="shine"))
    with pytest.raises(ValueError, match="'v' or 'shine'"):
        ImplicitBackward(init="broyden")


def _expansive(x):
    # f(z) = 2 z - x: fixed point z* = x (Broyden finds it), but J = 2I, so the backward
    # fixed point g = 2g + v diverges under Picard iteration.
    return deepeq.fixed_point(
        lambda z, x: 2 * z - x,
        torch.zeros_like(x),
        Broyden(**EXACT),
        args=(x,),
        backward=ImplicitBackward(solver=Picard(max_steps=20)),
    )


def test_fallback_on_divergent_backward(gen, caplog):
    x = torch.randn(3, 4, generator=gen, dtype=F64, requires_grad=True)
    sol = _expansive(x)
    torch.testing.assert_close(sol.value, x)
    with caplog.at_level(logging.INFO, logger="deepeq"):
        sol.value.sum().backward()
    assert sol.backward.fallback.all()
    assert "diverged for 3 of 3" in caplog.text
    # The phantom fallback (k=1) is the Jacobian-free gradient g = v: dL/dx = vᵀ ∂f/∂x = -1.
    torch.testing.assert_close(x.grad, -torch.ones_like(x))


def test_fallback_raise(gen):
    x = torch.randn(3, 4, generator=gen, dtype=F64, requires_grad=True)
    sol = deepeq.fixed_point(
        lambda z, x: 2 * z - x,
        torch.zeros_like(x),
        Broyden(**EXACT),
        args=(x,),
        backward=ImplicitBackward(solver=Picard(max_steps=20), fallback="raise"),
    )
    with pytest.raises(FloatingPointError, match="diverged for 3 of 3"):
        sol.value.sum().backward()


def test_double_backward_raises(gen):
    W = _contraction(gen, 4).requires_grad_()
    x = torch.randn(2, 4, generator=gen, dtype=F64, requires_grad=True)
    sol = deepeq.fixed_point(tanh_layer(W), torch.zeros(2, 4, dtype=F64), args=(x,))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(sol.value.sum(), x, create_graph=True)


def test_bad_backward_arguments():
    with pytest.raises(TypeError, match="ImplicitBackward"):
        deepeq.fixed_point(torch.cos, torch.zeros(1, 1), backward="implicit")
    with pytest.raises(TypeError, match="solver object"):
        ImplicitBackward(solver="anderson")
    with pytest.raises(ValueError, match="'phantom' or 'raise'"):
        ImplicitBackward(fallback="zero")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        PhantomBackward(steps=0)
    with pytest.raises(ValueError, match=r"PhantomBackward.damping must be in \[0, 1\)"):
        PhantomBackward(damping=1.5)
    with pytest.raises(TypeError, match=r"ImplicitBackward.fallback_damping must be a float"):
        ImplicitBackward(fallback_damping="0.5")


@pytest.mark.parametrize("solver_cls", [Picard, deepeq.Anderson, Broyden])
def test_memory_constant_in_depth(solver_cls, gen):
    lin = torch.nn.Linear(32, 32)
    with torch.no_grad():
        lin.weight.mul_(0.2)
    x = torch.randn(8, 32, generator=gen)

    noise = torch.Generator().manual_seed(0)

    def f(z, x):  # fresh noise on every call: no exact fixed point, so every step runs
        return torch.tanh(lin(z) + x) + 1e-3 * torch.randn(z.shape, generator=noise)

    def run(steps, backward):
        solver = solver_cls(atol=0.0, rtol=0.0, max_steps=steps)
        return deepeq.fixed_point(f, torch.zeros(8, 32), solver, args=(x,), backward=backward)

    imp10, s10 = saved_bytes(lambda: run(10, ImplicitBackward()))
    imp100, s100 = saved_bytes(lambda: run(100, ImplicitBackward()))
    assert (s10.stats.num_steps == 10).all() and (s100.stats.num_steps == 100).all()
    assert imp10 == imp100 > 0
    unr10, _ = saved_bytes(lambda: run(10, UnrolledBackward()))
    unr55, _ = saved_bytes(lambda: run(55, UnrolledBackward()))
    unr100, _ = saved_bytes(lambda: run(100, UnrolledBackward()))
    assert unr10 > imp10 and unr100 > 5 * unr10
    # Linear growth: equal increments for equal numbers of extra steps (within 10%).
    assert abs((unr100 - unr55) - (unr55 - unr10)) <= 0.1 * (unr55 - unr10)
    # One layer of an explicit deep network (its input requires grad, as inside a stack).
    one_layer, _ = saved_bytes(lambda: torch.tanh(lin(torch.zeros(8, 32, requires_grad=True)) + x))
    assert imp10 <= 1.5 * one_layer
