"""The same numerics on every available device (CPU always; CUDA when present)."""

import pytest
import torch

import deepeq
from deepeq import Anderson, Broyden, Picard, Status

SOLVERS = [
    Picard(atol=1e-10, rtol=0.0, max_steps=300),
    Anderson(atol=1e-10, rtol=0.0, max_steps=100),
    Broyden(atol=1e-10, rtol=0.0, max_steps=100, line_search=True),
]


def _problem(device):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 16, generator=g, dtype=torch.float64)
    W = 0.8 * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(6, 16, generator=g, dtype=torch.float64)
    s = torch.linspace(0.1, 1.0, 6, dtype=torch.float64).unsqueeze(1)  # mixed difficulty
    return W.to(device), x.to(device), s.to(device)


def _f(W):
    def f(z, x, s):
        return torch.tanh(s * (z @ W.T) + x)

    return f


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
def test_solution_and_gradient_match_cpu(solver, device):
    W, x, s = _problem(device)
    Wc, xc, sc = _problem("cpu")
    results = []
    for W_, x_, s_ in ((W, x, s), (Wc, xc, sc)):
        W_ = W_.clone().requires_grad_()
        sol = deepeq.fixed_point(
            _f(W_),
            torch.zeros_like(x_),
            solver,
            args=(x_, s_),
            backward=deepeq.ImplicitBackward(solver=Broyden(atol=1e-12, rtol=0.0, max_steps=200)),
        )
        assert sol.status is Status.CONVERGED
        assert sol.value.device == x_.device and sol.stats.num_steps.device == x_.device
        (gW,) = torch.autograd.grad(sol.value.sum(), W_)
        results.append((sol.value.cpu(), gW.cpu(), sol.stats.num_steps.cpu()))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-9, rtol=0)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-8, rtol=1e-7)
    assert (results[0][2][0] < results[0][2][-1]).item()  # easy sample stopped earlier


def test_nonfinite_and_tuple_state_on_device(device):
    x = torch.tensor([[0.5], [1.0]], device=device)
    c = torch.tensor([[0.5], [1.0]], device=device)

    def f(z, x, c):
        out = c * z + x
        return torch.where(out.abs() > 5, torch.full_like(out, float("nan")), out)

    sol = deepeq.fixed_point(
        f, torch.zeros_like(x), Anderson(max_steps=50), args=(x, c), nonfinite="return"
    )
    assert sol.status is Status.NONFINITE and sol.stats.nonfinite.tolist() == [False, True]
    z0 = (torch.zeros(2, 3, device=device), torch.zeros(2, 2, 2, device=device))
    sol = deepeq.fixed_point(lambda z: (0.5 * z[0] + 1, 0.5 * z[1] - 1), z0, Broyden(rtol=1e-6))
    assert sol.value[1].device == z0[1].device
    torch.testing.assert_close(
        sol.value[0], torch.full((2, 3), 2.0, device=device), rtol=1e-5, atol=0
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_bf16():
    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh()).cuda()
    with torch.no_grad():
        f[0].weight.mul_(0.3)
    x = torch.randn(8, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sol = deepeq.fixed_point(
            lambda z, x: f(z + x), torch.zeros_like(x), Anderson(rtol=1e-2), args=(x,)
        )
    assert sol.value.dtype == torch.float32 and sol.status is Status.CONVERGED
    sol.value.sum().backward()
    assert torch.isfinite(f[0].weight.grad).all()
