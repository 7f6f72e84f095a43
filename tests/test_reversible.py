"""Reversible DEQ: the solver's iterations in closed form, the exact gradient of the returned
iterate (against autograd through the same iterations and gradcheck), per-sample and causal
stopping, O(1) saved memory and the reconstruction error it reports."""

import dataclasses
import logging

import pytest
import torch

import deepeq
from deepeq import Anderson, Reversible, ReversibleBackward, UnrolledBackward, fixed_point
from deepeq.analysis import saved_bytes
from deepeq.models import create_model

F64 = torch.float64


def _layer(gen, d=6, norm=0.6, dtype=F64):
    W = torch.randn(d, d, generator=gen, dtype=dtype)
    W = (norm * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    return W, (lambda z, x: torch.tanh(z @ W.T + x))


def _grads(f, z0, solver, args, wrt, backward, weights=None, **kw):
    sol = fixed_point(f, z0, solver, args=args, backward=backward, **kw)
    v = (
        sol.value
        if isinstance(sol.value, torch.Tensor)
        else torch.cat([p.flatten(1) for p in sol.value], 1)
    )
    w = weights if weights is not None else torch.linspace(-1, 2, v[0].numel(), dtype=v.dtype)
    loss = (v.flatten(1) * w).sum() + 0.5 * (v**2).sum()
    return sol, torch.autograd.grad(loss, wrt)


def test_iterations_match_the_scheme_written_out(gen):
    """z_{k+1} = (1-β) z_k + β f(y_k), y_{k+1} = (1-β) y_k + β f(z_{k+1}), y_0 = z_0; the last
    iterate is returned; 2 calls of f per step in all."""
    _, f = _layer(gen)
    x = torch.randn(3, 6, generator=gen, dtype=F64)
    z0 = torch.randn(3, 6, generator=gen, dtype=F64)
    beta, n = 0.7, 9
    z, y = z0.clone(), z0.clone()
    for _ in range(n):
        z = (1 - beta) * z + beta * f(y, x)
        y = (1 - beta) * y + beta * f(z, x)
    sol = fixed_point(f, z0, Reversible(rtol=0.0, max_steps=n, beta=beta), args=(x,))
    torch.testing.assert_close(sol.value, z, rtol=0, atol=1e-14)
    assert sol.stats.nfe == 2 * n and sol.stats.num_steps.tolist() == [n] * 3
    assert sol.stats.best_step.tolist() == [n] * 3  # the last iterate, not the best one


def test_converges_to_the_closed_form_fixed_point(gen):
    A = torch.randn(5, 5, generator=gen, dtype=F64)
    A = 0.5 * A / torch.linalg.matrix_norm(A, 2)
    b = torch.randn(4, 5, generator=gen, dtype=F64)
    exact = torch.linalg.solve(torch.eye(5, dtype=F64) - A, b.T).T
    sol = fixed_point(lambda z, b: z @ A.T + b, torch.zeros_like(b),
                      Reversible(rtol=1e-12, max_steps=500, beta=0.5), args=(b,))  # fmt: skip
    assert sol.status is deepeq.Status.CONVERGED
    torch.testing.assert_close(sol.value, exact, rtol=0, atol=1e-10)


@pytest.mark.parametrize("beta", [0.5, 0.8])
def test_gradient_equals_autograd_through_the_same_iterations(gen, beta):
    """Inputs, parameters and z0, with per-sample stopping (each sample's reversal starts at its
    own step): the same numbers as UnrolledBackward on the same forward iterations (float64,
    in the regime where the reconstruction drift stays small: bench/reversible.py)."""
    W, f = _layer(gen)
    x = torch.randn(5, 6, generator=gen, dtype=F64)
    x = (x * torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0], dtype=F64).unsqueeze(1)).requires_grad_()
    z0 = (0.1 * torch.randn(5, 6, generator=gen, dtype=F64)).requires_grad_()
    solver = Reversible(rtol=1e-5, max_steps=60, beta=beta)
    sol, got = _grads(f, z0, solver, (x,), [x, W, z0], ReversibleBackward())
    ref_sol, ref = _grads(f, z0, solver, (x,), [x, W, z0], UnrolledBackward())
    steps = sol.stats.num_steps
    assert len(set(steps.tolist())) > 1, steps  # samples stop at different steps
    assert torch.equal(steps, ref_sol.stats.num_steps)
    torch.testing.assert_close(sol.value, ref_sol.value, rtol=0, atol=0)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
    b = sol.backward
    assert b.calls == 1 and b.nfe == 2 * int(steps.max())
    assert torch.equal(b.num_steps, steps)
    assert float(b.reconstruction_error.max()) < 1e-4


def test_gradient_is_not_the_implicit_one_when_the_solve_is_inexact(gen):
    """At a cap far from convergence the exact gradient of z_N differs from the implicit
    gradient at z_N (what a reversal that silently fell back to the IFT would return)."""
    W, f = _layer(gen, norm=0.9)
    x = torch.randn(3, 6, generator=gen, dtype=F64, requires_grad=True)
    solver = Reversible(rtol=0.0, max_steps=3, beta=0.5)
    _, (rev,) = _grads(f, torch.zeros_like(x), solver, (x,), [W], ReversibleBackward())
    _, (unr,) = _grads(f, torch.zeros_like(x), solver, (x,), [W], UnrolledBackward())
    imp_rule = deepeq.ImplicitBackward(solver=Anderson(rtol=1e-12, max_steps=200))
    _, (imp,) = _grads(f, torch.zeros_like(x), solver, (x,), [W], imp_rule)
    torch.testing.assert_close(rev, unr, rtol=0, atol=1e-12)
    assert (rev - imp).abs().max() > 1e-2


def test_tuple_state(gen):
    W = torch.randn(5, 5, generator=gen, dtype=F64)
    W = (0.6 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    x = torch.randn(4, 5, generator=gen, dtype=F64, requires_grad=True)

    def f(z, x):
        out = torch.tanh(torch.cat([z[0], z[1]], 1) @ W.T + x)
        return (out[:, :2], out[:, 2:])

    z0 = (torch.zeros(4, 2, dtype=F64), torch.zeros(4, 3, dtype=F64))
    solver = Reversible(rtol=1e-6, max_steps=40, beta=0.6)
    _, got = _grads(f, z0, solver, (x,), [x, W], ReversibleBackward())
    _, ref = _grads(f, z0, solver, (x,), [x, W], UnrolledBackward())
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


def test_coupled_batch_and_closed_over_non_leaf(gen):
    """f mixing samples (independent=False) and an injection computed outside f and captured
    in a closure (not a leaf): both get the gradient of the computed iterate."""
    W, _ = _layer(gen)
    enc = torch.randn(6, 6, generator=gen, dtype=F64, requires_grad=True)
    x = torch.randn(4, 6, generator=gen, dtype=F64)
    inj = torch.tanh(x @ enc)  # non-leaf, requires grad through enc

    def f(z):
        return torch.tanh(z @ W.T + inj + 0.3 * z.mean(0, keepdim=True))

    solver = Reversible(rtol=1e-4, max_steps=40, beta=0.8)
    z0 = torch.zeros(4, 6, dtype=F64)
    sol, got = _grads(f, z0, solver, (), [W, enc], ReversibleBackward(), independent=False)
    _, ref = _grads(f, z0, solver, (), [W, enc], UnrolledBackward(), independent=False)
    assert len(set(sol.stats.num_steps.tolist())) == 1  # coupled: the batch stops together
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


def _causal_map(d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (0.3 * torch.randn(d, d, generator=g, dtype=F64) / d**0.5).requires_grad_()
    U = (0.4 * torch.randn(d, d, generator=g, dtype=F64) / d**0.5).requires_grad_()

    def f(z, x):
        T = z.shape[1]
        mean = z.cumsum(1) / torch.arange(1, T + 1, dtype=z.dtype).view(1, T, 1)
        return torch.tanh(z @ W.T + mean @ U.T + x)

    return f, (W, U)


def test_causal_solving_gradient_and_causality(gen):
    """Per-(sample, position) stopping with frozen prefixes: the reversal holds a frozen position
    at its returned value, as the forward did; gradients match the unrolled oracle and outputs
    before t do not depend on inputs after t."""
    f, (W, U) = _causal_map()
    x = torch.randn(2, 12, 5, generator=gen, dtype=F64)
    x[:, :4] *= 0.05  # early positions converge first
    x.requires_grad_()
    solver = Reversible(rtol=1e-4, max_steps=30, beta=0.5)
    kw = dict(causal=True)
    sol, got = _grads(f, torch.zeros_like(x), solver, (x,), [x, W, U], ReversibleBackward(), **kw)
    _, ref = _grads(f, torch.zeros_like(x), solver, (x,), [x, W, U], UnrolledBackward(), **kw)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
    # positions froze at different steps (else the solve to the same cap without a tolerance
    # would give the same values)
    n = int(sol.stats.num_steps.max())
    plain = fixed_point(
        f, torch.zeros_like(x), Reversible(rtol=0.0, max_steps=n, beta=0.5), args=(x,), causal=True
    )
    assert (plain.value - sol.value).abs().max() > 1e-8
    # a later token's loss never reaches an earlier input
    t = 6
    sol = fixed_point(
        f, torch.zeros_like(x), solver, args=(x,), backward=ReversibleBackward(), causal=True
    )
    (gx,) = torch.autograd.grad(sol.value[:, :t].sum(), [x])
    assert gx[:, t:].abs().max() == 0 and gx[:, :t].abs().max() > 0


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_long_solves_stop_the_reversal_below_round_off(gen, dtype):
    """Far past convergence the reconstruction drift (~(1/(1-β))^m ε) would overflow (float32:
    NaN gradients); each sample's reversal stops once its adjoint is below round-off and the
    gradient still equals the unrolled one."""
    W, f = _layer(gen, d=16, dtype=dtype)
    x = torch.randn(4, 16, generator=gen, dtype=dtype)
    x = (x * torch.tensor([0.2, 1.0, 2.0, 4.0], dtype=dtype).unsqueeze(1)).requires_grad_()
    solver = Reversible(rtol=0.0, max_steps=200, beta=0.5)
    w = torch.linspace(-1, 1, 16, dtype=dtype)
    sol, got = _grads(f, torch.zeros_like(x), solver, (x,), [W, x], ReversibleBackward(), w)
    _, ref = _grads(f, torch.zeros_like(x), solver, (x,), [W, x], UnrolledBackward(), w)
    b = sol.backward
    assert bool((b.num_steps < sol.stats.num_steps).all())  # stopped early ...
    assert torch.isnan(b.reconstruction_error).all()  # ... so z_0 was not reconstructed
    tol = 1e-7 if dtype == F64 else 1e-3  # the drift floor (bench/reversible.py)
    for g, r in zip(got, ref, strict=True):
        assert torch.isfinite(g).all()
        assert (g - r).abs().max() <= tol * r.abs().max()


def test_gradcheck(gen):
    W = torch.randn(3, 3, generator=gen, dtype=F64)
    W = (0.5 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    x = torch.randn(2, 3, generator=gen, dtype=F64, requires_grad=True)

    def fn(x, W):
        return fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros(2, 3, dtype=F64),
                           Reversible(rtol=0.0, max_steps=8, beta=0.6), args=(x,),
                           backward=ReversibleBackward()).value  # fmt: skip

    assert torch.autograd.gradcheck(fn, (x, W), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_saved_bytes_are_flat_in_the_number_of_steps(gen):
    """Pure reversal (checkpoint_every=None): the same bytes for 10 and 100 steps; the default
    stores exactly one pair of chains (float64) and its row ids per 10 steps."""
    _, f = _layer(gen, d=32, norm=0.95)
    B, D = 8, 32
    x = torch.randn(B, D, generator=gen, dtype=F64, requires_grad=True)

    def run(n, backward):
        solver = Reversible(rtol=0.0, max_steps=n)
        return saved_bytes(lambda: fixed_point(f, torch.zeros_like(x), solver, args=(x,), backward=backward))  # fmt: skip

    pure = ReversibleBackward(checkpoint_every=None)
    b10, _ = run(10, pure)
    b100, sol100 = run(100, pure)
    assert sol100.stats.num_steps.tolist() == [100] * B
    assert b10 == b100 > 0
    c10, _ = run(10, ReversibleBackward())
    c100, _ = run(100, ReversibleBackward())
    assert c100 - c10 == 9 * (B * 8 + 2 * B * D * 8)  # rows (int64) + y, z (float64)
    u10, _ = run(10, UnrolledBackward())
    assert run(100, UnrolledBackward())[0] > 5 * u10 > 5 * b10  # what storing the iterates costs


def test_reconstruction_error_float32_chains_drift_float64_chains_do_not(gen, caplog):
    """Chains in the state's dtype (float32, the papers' scheme) drift by ~(1/(1-β))^m ε; the
    default float64 chains with β = 0.5 retrace the float32 iterates exactly."""
    _, f = _layer(gen, d=16, norm=0.5, dtype=torch.float32)
    x = torch.randn(4, 16, generator=gen, requires_grad=True)

    def err(n, **kw):
        sol = fixed_point(f, torch.zeros_like(x), Reversible(rtol=0.0, max_steps=n, **kw),
                          args=(x,), backward=ReversibleBackward(warn_error=1e-2))  # fmt: skip
        with caplog.at_level(logging.INFO, logger="deepeq"):
            sol.value.sum().backward()
        return float(sol.backward.reconstruction_error.max())

    assert 0 < err(4, beta=0.8, chain_dtype=None) < 1e-3 < err(12, beta=0.8, chain_dtype=None)
    assert "reconstruction error" in caplog.text
    assert err(20) < 1e-12


def test_nonfinite_samples_get_no_gradient(gen):
    W, _ = _layer(gen)
    x = torch.randn(3, 6, generator=gen, dtype=F64, requires_grad=True)

    def f(z, x):
        return torch.tanh(z @ W.T + x).masked_fill(x[:, :1] > 100, float("inf"))

    with torch.no_grad():
        x[1, 0] = 1000.0
    sol = fixed_point(f, torch.zeros_like(x), Reversible(rtol=1e-8, max_steps=30),
                      args=(x,), backward=ReversibleBackward(), nonfinite="return")  # fmt: skip
    assert sol.status is deepeq.Status.NONFINITE and sol.stats.nonfinite.tolist() == [
        False,
        True,
        False,
    ]
    gx, gW = torch.autograd.grad(sol.value.sum(), [x, W])
    assert torch.isfinite(gx).all() and torch.isfinite(gW).all()
    assert gx[1].abs().max() == 0 and gx[0].abs().max() > 0


def test_errors():
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)"):
        Reversible(beta=1.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        Reversible(beta=0.0)
    with pytest.raises(
        TypeError, match=r"ReversibleBackward undoes the iterations of deepeq\.Reversible"
    ):
        fixed_point(lambda z: 0.5 * z, torch.ones(1, 1, requires_grad=True), Anderson(),
                    backward=ReversibleBackward())  # fmt: skip
    with pytest.raises(TypeError, match="ReversibleBackward undoes"):
        deepeq.DEQ(torch.nn.Linear(2, 2), solver=Anderson(), backward=ReversibleBackward())
    with pytest.raises(
        ValueError,
        match=r"solve\.backward = 'reversible' undoes the iterations of solve\.solver = 'reversible'",
    ):
        create_model("deq_transformer_tiny", solve=dict(backward="reversible"))
    assert deepeq.make_solver("reversible", beta=0.5) == Reversible(beta=0.5)


@pytest.mark.parametrize(
    "name,dtype",
    [("deq_transformer_tiny", torch.float32), ("deq_transformer_tiny", F64), ("mdeq_tiny", F64)],
)
def test_models_at_their_settings_with_solver_reversible(name, dtype):
    """A registered model with solver = backward = 'reversible' (its own caps, tolerances and
    default β): every parameter's gradient equals the unrolled oracle's on the same iterations.
    In float32 the Transformer's attention uses a fused kernel only without autograd, so the
    reversal must recompute its values without grad (else it drifts: 5% gradient error)."""
    torch.manual_seed(0)
    model = create_model(name, solve=dict(solver="reversible", backward="reversible")).to(dtype)
    assert isinstance(model.equilibrium.solver, Reversible) and model.equilibrium.solver.beta == 0.5
    g = torch.Generator().manual_seed(0)
    if name.startswith("mdeq"):
        inp = torch.randn(2, 1, 28, 28, generator=g, dtype=dtype)
    else:
        inp = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)

    def grads():
        torch.manual_seed(1)
        out, _, sols = model(inp)
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.autograd.grad(out.square().mean(), params, allow_unused=True), sols[0]

    got, sol = grads()
    assert sol.stats.num_steps.min() >= 5
    unrolled = dataclasses.replace(model.equilibrium, backward=UnrolledBackward())
    model.solve_equilibrium = lambda x, z0, keys=None: unrolled.solve(model.f, x, z0, training=True)
    ref, _ = grads()
    live = 0
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for a, b in zip(got, ref, strict=True):
        if b is None:
            assert a is None
            continue
        assert (a - b).abs().max() <= tol * b.abs().max()
        live += bool(b.abs().max() > 0)
    assert live > 0.8 * len(ref)
