"""Corners where a solve or a gradient used to report success it had not earned: coupled batches
with a line search, low-precision iterations, causal solves with an absolute tolerance, maps
without a fixed point (a relative rule met only because the iterate ran away), non-finite
upstream gradients and backward solves that stop at their cap."""

import warnings

import pytest
import torch

import deepeq
from deepeq import Anderson, Broyden, Picard, fixed_point


def _coupled_map(seed: int, B: int = 6, D: int = 5):
    """``tanh(W z_i + x_i + 0.5 mean_j z_j)``: every sample's output depends on the batch."""
    g = torch.Generator().manual_seed(seed)
    scale = (0.6, 1.0, 1.5, 2.5)[seed % 4]  # from contractive to strongly non-contractive
    W = scale * torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
    x = torch.randn(B, D, generator=g, dtype=torch.float64)

    def f(z):
        return torch.tanh(z @ W.T + x + 0.5 * z.mean(0, keepdim=True))

    return f, x


def test_coupled_line_search_reports_the_residual_of_the_returned_batch():
    # The backtrack used to re-evaluate only the failing rows, so the other rows kept an f(z)
    # computed while the failing rows were at untried values (~80% of the samples reported a
    # residual that was not the one of the returned batch).
    rtol, mismatched, false_converged, n = 1e-6, 0, 0, 0
    for seed in range(60):
        f, x = _coupled_map(seed)
        solver = Broyden(rtol=rtol, max_steps=40, line_search=True)
        sol = fixed_point(f, torch.zeros_like(x), solver, independent=False)
        fz = f(sol.value)
        res, fnorm = (fz - sol.value).norm(dim=1), fz.norm(dim=1)
        n += len(res)
        mismatched += int((~torch.isclose(sol.stats.abs_residual, res, rtol=1e-6)).sum())
        false_converged += int((sol.stats.converged & (res > rtol * fnorm * (1 + 1e-9))).sum())
        if sol.status is deepeq.Status.CONVERGED:
            assert bool((res <= rtol * fnorm * (1 + 1e-9)).all())
    assert mismatched == 0, f"{mismatched} of {n} samples report another batch's residual"
    assert false_converged == 0


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 1e-4), (torch.float16, 1e-4),
                                        (torch.bfloat16, 1e-2)])  # fmt: skip
def test_low_precision_iterations_are_judged_at_full_precision(dtype, rtol):
    # In bf16, Picard reaches z = f(z) exactly in the low precision (reported residual 0.0)
    # while the float32 residual is ~1e-3: converged must mean converged for the float32 map.
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 32, generator=g)
    W = 0.7 * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(64, 32, generator=g)

    def f(z, x):
        return torch.tanh(z @ W.T + x)

    sol = fixed_point(f, torch.zeros_like(x), Picard(rtol=rtol, max_steps=200), args=(x,),
                      solve_dtype=dtype)  # fmt: skip
    fz = f(sol.value, x)
    res, fnorm = (fz - sol.value).double().norm(dim=1), fz.double().norm(dim=1)
    torch.testing.assert_close(sol.stats.abs_residual, res, rtol=1e-4, atol=1e-12)
    assert bool((res[sol.stats.converged] <= rtol * fnorm[sol.stats.converged] * 1.0001).all())
    assert sol.status is deepeq.Status.CONVERGED  # it finishes at full precision when it must
    if rtol == 1e-2:  # loose tolerances are reached in the low precision: no extra iterations
        assert int(sol.stats.num_steps.max()) <= 12


def _causal_map(d: int = 6):
    g = torch.Generator().manual_seed(0)
    W = 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    U = 0.9 * torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5

    def f(z, x):
        T = z.shape[1]
        mean = z.cumsum(1) / torch.arange(1, T + 1, dtype=z.dtype).view(1, T, 1)
        return torch.tanh(z @ W.T + mean @ U.T + x)

    return f


@pytest.mark.parametrize("atol,rtol", [(1e-3, 1e-3), (1e-2, 0.0), (0.0, 1e-3)])
def test_causal_statistics_follow_the_per_position_rule(atol, rtol):
    # Each position t meets res_t <= atol + rtol ||f_t||; the whole-sequence norm of the
    # residuals could exceed atol + rtol ||f|| for a converged sample (sqrt(T) atol).
    f = _causal_map()
    x = torch.randn(4, 24, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sol = fixed_point(f, torch.zeros_like(x), Anderson(atol=atol, rtol=rtol, max_steps=40),
                      args=(x,), causal=True, trace=True)  # fmt: skip
    fz = f(sol.value, x)
    res_t, f_t = (fz - sol.value).norm(dim=2), fz.norm(dim=2)
    assert sol.status is deepeq.Status.CONVERGED
    assert bool((res_t <= atol + rtol * f_t).all())  # what converged means, per position
    # reported: the worst position's residuals, so converged <=> within the tolerance
    torch.testing.assert_close(sol.stats.abs_residual, res_t.amax(1), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(sol.stats.rel_residual, (res_t / f_t).amax(1), rtol=1e-9, atol=0)
    assert bool((sol.stats.abs_residual <= atol + rtol * f_t.amax(1)).all())
    torch.testing.assert_close(sol.stats.trace[:, -1], res_t.amax(1), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize(
    "solver",
    [Broyden(), Broyden(line_search=True), Anderson(), Picard(rtol=1e-2, max_steps=200),
     Picard(rtol=1e-3, max_steps=2000, damping=0.5)],
    ids=repr,
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_map_without_fixed_point_is_never_converged(solver, dtype):
    # f(z) = z + c: the residual never falls. Broyden used to jump to |z| ~ 4e16, where z + c
    # rounds to z, and Picard's relative residual 1/k fell below rtol as the iterate grew.
    c = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    sol = fixed_point(lambda z, c: z + c, torch.zeros_like(c), solver, args=(c,))
    assert sol.status is deepeq.Status.MAX_STEPS
    assert not bool(sol.stats.converged.any())
    assert bool((sol.stats.abs_residual > 0.5 * c.double().norm(dim=1)).all())


@pytest.mark.parametrize(
    "solver", [Broyden(rtol=1e-7), Anderson(rtol=1e-7), Picard(rtol=1e-7, max_steps=3000)], ids=repr
)
def test_growing_iterates_still_converge_when_the_residual_falls(solver):
    # The guard against runaway iterates must not reject a real fixed point far from z0:
    # z* = 1e-3 / (1 - 0.99) = 0.1, a hundred times ||f(z0)||.
    x = torch.full((2, 4), 1e-3, dtype=torch.float64)
    sol = fixed_point(lambda z, x: 0.99 * z + x, torch.zeros_like(x), solver, args=(x,))
    assert sol.status is deepeq.Status.CONVERGED
    torch.testing.assert_close(sol.value, torch.full_like(x, 0.1), rtol=1e-4, atol=0)
    # a sample that starts at its fixed point stays converged, also with a minimum step count
    z0 = torch.full_like(x, 0.1)
    sol = fixed_point(lambda z, x: 0.99 * z + x, z0, solver, args=(x,),
                      backward=deepeq.UnrolledBackward())  # fmt: skip
    assert sol.status is deepeq.Status.CONVERGED


class _Map(torch.nn.Module):
    """``a * z + b * tanh(lin(z)) + x`` with parameters a, b and a linear layer."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.b = torch.nn.Parameter(torch.tensor(b))

    def forward(self, z, x):
        return self.a * z + self.b * torch.tanh(self.lin(z)) + x


def test_a_nonfinite_upstream_gradient_passes_through_the_backward_solve():
    # loss = sqrt(z - z.detach()) has an infinite gradient: the backward solve used to raise
    # "z0 contains non-finite values" before the training loop's guard could skip the step.
    f = _Map(0.0, 1.0)
    deq = deepeq.DEQ(f)
    x = torch.randn(3, 4, requires_grad=True)
    z, sol = deq(x)
    torch.sqrt(z - z.detach()).sum().backward()
    assert not bool(torch.isfinite(f.lin.weight.grad).all())  # the guard sees it
    assert sol.backward.status is deepeq.Status.NONFINITE
    # only the samples whose upstream gradient is non-finite: the others get their gradient
    x = torch.randn(3, 4, requires_grad=True)
    z, sol = deq(x)
    (torch.sqrt(z[:1] - z[:1].detach()).sum() + z[1:].sum()).backward()
    assert not bool(torch.isfinite(x.grad[0]).all())
    x_ref = x.detach()[1:].clone().requires_grad_()
    z_ref, _ = deq(x_ref)
    z_ref.sum().backward()
    torch.testing.assert_close(x.grad[1:], x_ref.grad, rtol=1e-4, atol=1e-5)
    assert sol.backward.converged.tolist() == [False, True, True]


def test_a_backward_solve_at_its_cap_warns_once():
    # z -> z + 1: forward and backward end at max_steps without diverging; the gradient is
    # meaningless and used to be applied without a word.
    x = torch.zeros(2, 4, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            z, sol = deepeq.DEQ(_Map(1.0, 0.0))(x + 1)
            z.sum().backward()
    assert sol.backward.status is deepeq.Status.MAX_STEPS
    msgs = [w for w in caught if issubclass(w.category, deepeq.ConvergenceWarning)]
    assert len(msgs) == 1, [str(w.message) for w in caught]
    assert "backward" in str(msgs[0].message) and "max_steps" in str(msgs[0].message)
    # a backward solve that converges says nothing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        z, sol = deepeq.DEQ(_Map(0.5, 0.0))(x + 1)
        z.sum().backward()
    assert sol.backward.status is deepeq.Status.CONVERGED
    assert not [w for w in caught if issubclass(w.category, deepeq.ConvergenceWarning)]


def test_training_runs_report_capped_backward_solves_in_their_records_not_as_warnings(
    tmp_path, capsys
):
    # deepeq train: the capped backward solves are in metrics.csv (bwd_converged) and the
    # summary; the library's warning is not repeated on the console
    from pathlib import Path

    from deepeq.__main__ import main

    cfg = Path(__file__).resolve().parents[1] / "configs/copy_memory_tiny.toml"
    args = ["--steps=2", "--data.seq_len=10", "--data.n_train=32", "--data.n_test=16",
            "--batch_size=8", "--eval_every=2", "--model.overrides.solve.b_max_steps=1",
            "--model.overrides.solve.b_rtol=1e-12", f"--out_dir={tmp_path}", "--no-progress"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", str(cfg), *args]) == 0
    assert not [w for w in caught if issubclass(w.category, deepeq.ConvergenceWarning)]
    assert "backward 0%" in capsys.readouterr().out  # the summary says it instead
