"""The engine reports what it computed: scale-safe residual norms (no overflow to a false
"converged", no underflow to a false zero residual), coupled batches that converge only as a
whole, a NaN-free unrolled oracle, solver state outside autocast, checked phantom steps."""

import pytest
import torch

import deepeq
from deepeq import Anderson, Broyden, Picard, fixed_point

SOLVERS = [Picard(), Anderson(), Broyden()]


def test_overflowing_norms_do_not_count_as_converged():
    # 1.2 z + 1 diverges: z reaches ~1e23, whose squared norm overflows float32.
    sol = fixed_point(
        lambda z: 1.2 * z + 1, torch.zeros(1, 4), Picard(max_steps=300), nonfinite="return"
    )
    assert sol.status is deepeq.Status.MAX_STEPS
    assert not bool(sol.stats.converged.any())
    rel = sol.stats.rel_residual
    assert bool(torch.isfinite(rel).all()) and float(rel) > 0.1
    # The returned iterate is the one with the lowest residual ratio, and its residual is true.
    z = sol.value
    true_rel = ((1.2 * z + 1 - z).norm() / (1.2 * z + 1).norm()).item()
    assert true_rel == pytest.approx(float(rel), rel=1e-3)


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
@pytest.mark.parametrize("scale", [1e-25, 1e-30, 1e20, 1e30])
def test_tiny_and_huge_fixed_points_are_found(solver, scale):
    # z* = 2 * scale: float32 squares of 1e-25 underflow and of 1e20 overflow.
    sol = fixed_point(lambda z: 0.5 * z + scale, torch.zeros(2, 4), solver)
    assert sol.status is deepeq.Status.CONVERGED
    assert torch.allclose(sol.value, torch.full((2, 4), 2 * scale), rtol=1e-2, atol=0)
    assert bool((sol.stats.num_steps > 0).all())


def test_float64_norms_are_scale_safe():
    # float64 squares overflow above ~1e154 and underflow below ~1e-162.
    for scale in (1e-200, 1e200):
        sol = fixed_point(
            lambda z, s=scale: 0.5 * z + s,
            torch.zeros(2, 4, dtype=torch.float64),
            Anderson(rtol=1e-8),
        )
        assert sol.status is deepeq.Status.CONVERGED
        assert torch.allclose(sol.value, torch.full_like(sol.value, 2 * scale), rtol=1e-6, atol=0)


@pytest.mark.parametrize("b_solver", SOLVERS, ids=repr)
def test_backward_solve_of_a_tiny_loss_is_not_cut_short(b_solver):
    # z* = a z* + x: dz*/dx = 1 / (1 - a) = 2, whatever the scale of the loss.
    a = 0.5
    x = torch.ones(2, 8, requires_grad=True)
    sol = fixed_point(
        lambda z, x: a * z + x,
        torch.zeros(2, 8),
        Anderson(rtol=1e-6),
        args=(x,),
        backward=deepeq.ImplicitBackward(solver=type(b_solver)(rtol=1e-5, max_steps=50)),
    )
    (sol.value.sum() * 1e-30).backward()
    assert torch.allclose(x.grad, torch.full_like(x, 2e-30), rtol=1e-3, atol=0)
    assert sol.backward.status is deepeq.Status.CONVERGED


def test_coupled_batch_converges_only_as_a_whole():
    x = torch.tensor([[2.0], [0.0]], dtype=torch.float64)

    def f(z, x):
        return torch.tanh(0.5 * z + x - 0.8 * z.mean(0, keepdim=True))

    sol = fixed_point(f, torch.zeros_like(x), Picard(rtol=1e-4, max_steps=200), args=(x,),
                      independent=False)  # fmt: skip
    assert sol.status is deepeq.Status.CONVERGED
    z = sol.value
    true_rel = (f(z, x) - z).norm(dim=1) / f(z, x).norm(dim=1)
    assert bool((true_rel <= 1e-4).all()), true_rel
    # The reported residuals are those of the returned batch.
    assert torch.allclose(sol.stats.rel_residual, true_rel, rtol=1e-6, atol=1e-12)
    # every sample was returned at the same step (one batch iterate)
    assert len(set(sol.stats.best_step.tolist())) == 1


@pytest.mark.parametrize(
    "solver",
    [Broyden(rtol=0.0, atol=0.0, max_steps=40), Anderson(ridge=0.0, rtol=1e-12, max_steps=20)],
    ids=repr,
)
def test_unrolled_oracle_has_no_nan_gradients(solver):
    # Broyden iterating past its stall (zero tolerances) meets denominators of exactly 0;
    # Anderson without a ridge on a state with equal components meets singular histories. The
    # discarded branch of the safeguard must not poison the gradient.
    torch.manual_seed(0)
    W = (0.3 * torch.randn(8, 8, dtype=torch.float64)).requires_grad_()
    x = torch.randn(4, 1, dtype=torch.float64).expand(4, 8).contiguous()
    if isinstance(solver, Broyden):
        x = torch.randn(4, 8, dtype=torch.float64)
    else:
        W = torch.full((8, 8), 0.3 / 8, dtype=torch.float64, requires_grad=True)

    def f(z, x):
        return torch.tanh(z @ W.T + x)

    sol = fixed_point(f, torch.zeros_like(x), solver, args=(x,), backward=deepeq.UnrolledBackward())
    assert bool(torch.isfinite(sol.value).all())
    sol.value.sum().backward()
    assert bool(torch.isfinite(W.grad).all()), W.grad
    g_unrolled = W.grad.clone()
    W.grad = None
    sol = fixed_point(f, torch.zeros_like(x), Broyden(rtol=1e-12, max_steps=60), args=(x,),
                      backward=deepeq.ImplicitBackward(solver=Broyden(rtol=1e-12, max_steps=60)))  # fmt: skip
    sol.value.sum().backward()
    assert torch.allclose(g_unrolled, W.grad, atol=1e-6)


def test_unrolled_oracle_differentiates_a_sample_that_converged_at_z0():
    # Sample 0 starts at its fixed point; the oracle still makes one tracked step for it.
    a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    z0 = torch.tensor([[2.0], [0.0]], dtype=torch.float64)  # z* = x / (1 - a) = (2, 6)
    sol = fixed_point(lambda z, x: a * z + x, z0, Picard(rtol=1e-9, max_steps=100), args=(x,),
                      backward=deepeq.UnrolledBackward())  # fmt: skip
    assert sol.stats.num_steps[0] >= 1
    sol.value[0].sum().backward()
    assert a.grad is not None and float(a.grad) == pytest.approx(2.0)  # d(a z0 + x)/da = z0
    # B = 1, converged at z0: no "does not require grad" error
    a.grad = None
    sol = fixed_point(lambda z, x: a * z + x, z0[:1], Picard(rtol=1e-9), args=(x[:1],),
                      backward=deepeq.UnrolledBackward())  # fmt: skip
    sol.value.sum().backward()
    assert float(a.grad) == pytest.approx(2.0)


def test_unrolled_oracle_reaches_a_tracked_z0():
    x = torch.tensor([[1.0]], dtype=torch.float64)
    z0 = torch.tensor([[0.0]], dtype=torch.float64, requires_grad=True)
    sol = fixed_point(lambda z, x: 0.5 * z + x, z0, Picard(rtol=1e-3, max_steps=4), args=(x,),
                      backward=deepeq.UnrolledBackward())  # fmt: skip
    sol.value.sum().backward()
    assert float(z0.grad) == pytest.approx(0.5**4)


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
def test_solver_state_stays_float32_under_autocast(solver):
    # B * m * D > 2^15 used to crash Anderson (bf16 products written into fp32 buffers) and ran
    # Broyden's low-rank products in bf16.
    lin = torch.nn.Linear(256, 256)
    torch.nn.init.normal_(lin.weight, std=0.02)
    x = torch.randn(64, 256)
    seen = []

    def f(z, x):
        seen.append(z.dtype)
        return torch.tanh(lin(z)) + x

    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = fixed_point(f, torch.zeros(64, 256), solver, args=(x,))
    assert sol.value.dtype == torch.float32
    assert set(seen) == {torch.float32}  # the solver hands f float32 iterates
    with torch.no_grad():
        ref = fixed_point(
            f, torch.zeros(64, 256), type(solver)(rtol=1e-6, max_steps=100), args=(x,)
        )
    # the only bf16 error is f's own (~0.4%), not the solver's arithmetic
    assert (sol.value - ref.value).norm() / ref.value.norm() < 2e-2


def test_phantom_steps_are_checked_for_nonfinite_values():
    calls = {"n": 0}
    x = torch.ones(2, 3, requires_grad=True)

    def f(z, x):
        calls["n"] += 1
        out = 0.5 * z + x
        # finite during the solve (no grad), inf in the phantom step (grad recording)
        return out * float("inf") if torch.is_grad_enabled() else out

    with pytest.raises(FloatingPointError, match="phantom"):
        fixed_point(f, torch.zeros(2, 3), Picard(), args=(x,),
                    backward=deepeq.PhantomBackward(steps=2))  # fmt: skip
    sol = fixed_point(f, torch.zeros(2, 3), Picard(), args=(x,), nonfinite="return",
                      backward=deepeq.PhantomBackward(steps=2))  # fmt: skip
    assert sol.status is deepeq.Status.NONFINITE and bool(sol.stats.nonfinite.all())
