"""Test-time compute tools pinned to their meaning: several starts per sample (think wider),
the asymptotic alignment score of path independence, and per-sample adaptive depth."""

import pytest
import torch

import deepeq
from deepeq import Anderson, Picard, fixed_point, fixed_point_restarts, path_independence

F64 = torch.float64


def _contraction(B=6, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=F64)
    W = 0.7 * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(B, D, generator=g, dtype=F64)
    return (lambda z, x: torch.tanh(z @ W.T + x)), x


def _bistable(z, b):
    """Per element z = tanh(3 z + b): two stable fixed points (near -1 and +1) for small b."""
    return torch.tanh(3 * z + b)


@pytest.mark.parametrize("solver", [Picard(rtol=1e-6, max_steps=100), Anderson(rtol=1e-6)],
                         ids=repr)  # fmt: skip
def test_one_start_is_the_plain_solve_bit_for_bit(solver):
    f, x = _contraction()
    z0 = torch.zeros_like(x)
    plain = fixed_point(f, z0, solver, args=(x,))
    r = fixed_point_restarts(f, z0, solver, args=(x,), restarts=1)
    assert torch.equal(r.value, plain.value) and r.index.tolist() == [0] * len(x)
    assert torch.equal(r.rel_residual[0], plain.stats.rel_residual)


def test_restarts_of_a_contraction_agree_and_keep_gradients():
    f, x = _contraction()
    x = x.clone().requires_grad_()
    g = torch.Generator().manual_seed(1)
    r = fixed_point_restarts(f, torch.zeros_like(x), Anderson(rtol=1e-10, max_steps=60),
                             args=(x,), restarts=4, scale=2.0, generator=g)  # fmt: skip
    assert bool(r.converged.all())
    torch.testing.assert_close(r.values, r.values[:1].expand_as(r.values), rtol=1e-8, atol=1e-9)
    # the chosen equilibrium carries the implicit gradient of the plain solve
    r.value.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    fixed_point(f, torch.zeros_like(x2), Anderson(rtol=1e-10, max_steps=60),
                args=(x2,)).value.sum().backward()  # fmt: skip
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-8)


def test_the_restart_with_the_lower_residual_is_chosen():
    b = torch.full((3, 2), 0.05, dtype=F64)
    z0 = torch.zeros_like(b)
    # sample 0's second start sits at the negative fixed point, sample 1's at the positive one,
    # sample 2's far out: within 3 steps the start at 0 is not converged, the others are
    second = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]], dtype=F64)
    r = fixed_point_restarts(_bistable, z0, Picard(max_steps=3), args=(b,), restarts=2,
                             starts=[second])  # fmt: skip
    assert r.index.tolist() == [1, 1, 0]  # sample 2: a tie, the first start is kept
    chosen = r.rel_residual.gather(0, r.index.unsqueeze(0))[0]
    assert bool((chosen <= r.rel_residual.amin(0)).all())
    assert float(r.value[0].mean()) < 0 < float(r.value[1].mean())


def test_restart_errors():
    f, x = _contraction()
    with pytest.raises(ValueError, match="restarts must be an int >= 1"):
        fixed_point_restarts(f, torch.zeros_like(x), args=(x,), restarts=0)
    with pytest.raises(ValueError, match="independent=False"):
        fixed_point_restarts(f, torch.zeros_like(x), args=(x,), restarts=2, independent=False)
    with pytest.raises(ValueError, match="restarts - 1 = 2 states"):
        fixed_point_restarts(f, torch.zeros_like(x), args=(x,), restarts=3,
                             starts=[torch.zeros_like(x)])  # fmt: skip


def test_path_independence_of_a_contraction_is_one():
    f, x = _contraction()
    pi = path_independence(f, torch.zeros_like(x), Anderson(rtol=1e-10, max_steps=60),
                           args=(x,), generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(pi.aa, torch.ones_like(pi.aa), rtol=0, atol=1e-9)
    assert pi.score == pytest.approx(1.0) and float(pi.different.max()) == 0.0
    assert pi.cosine.shape == (4, len(x)) and bool(pi.converged.all())


def test_two_stable_equilibria_lower_the_alignment():
    # from 0 every sample goes to the positive equilibrium (b > 0); random starts of scale 3
    # land in either basin, so some reach the negative one: cosine -1 there
    b = torch.full((16, 4), 0.05, dtype=F64)
    pi = path_independence(_bistable, torch.zeros_like(b), Picard(rtol=1e-10, max_steps=200),
                           args=(b,), random_starts=4, shuffled_starts=2, scale=3.0,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert pi.score < 0.9 and float(pi.different.mean()) > 0.1
    assert float(pi.cosine.min()) < -0.5  # a start reached the other equilibrium
    # shuffled starts begin at another sample's positive equilibrium: they stay aligned
    torch.testing.assert_close(pi.cosine[:2], torch.ones_like(pi.cosine[:2]), rtol=0, atol=1e-9)


def test_adaptive_depth_spends_more_steps_on_harder_samples():
    # per-sample contraction factor a_b: the error falls like a_b^k, so the steps needed grow
    # with a_b (per-sample stopping frees the easy samples)
    a = torch.tensor([[0.1], [0.5], [0.8], [0.95]], dtype=F64)
    sol = fixed_point(lambda z, a: a * z + 1, torch.zeros(4, 3, dtype=F64), Picard(rtol=1e-8,
                      max_steps=1000), args=(a,))  # fmt: skip
    steps = sol.stats.num_steps.tolist()
    assert steps == sorted(steps) and steps[0] < steps[-1] / 10
    assert sol.stats.sample_evals < sol.stats.nfe * 4  # compute fell as samples stopped
    assert deepeq.Status.CONVERGED is sol.status


def test_the_path_independence_study_from_the_command_line(tmp_path, capsys):
    import csv

    from deepeq.__main__ import main

    args = ["analyze", "path-independence", "--batch", "4", "--length", "8", "--out", str(tmp_path)]
    assert main([*args, "--model", "deq_transformer_tiny"]) == 0
    out = capsys.readouterr().out
    assert "path independence over 4 examples: AA " in out
    with (tmp_path / "path_independence.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and all(-1.0 <= float(r["aa"]) <= 1.0 + 1e-9 for r in rows)
    assert (tmp_path / "path_independence.png").stat().st_size > 0
    # an explicit model has no equilibrium to start elsewhere: one line, exit code 2
    assert main([*args, "--model", "lstm_tiny"]) == 2
    assert "needs a DEQ model" in capsys.readouterr().err
