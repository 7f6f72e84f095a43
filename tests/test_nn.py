"""The DEQ module: parameters get gradients, z0 protocol, train/eval solvers, warm start,
mixed precision."""

import pytest
import torch
from torch import nn

import deepeq
from deepeq import DEQ, Anderson, Broyden, Status


class Layer(nn.Module):
    def __init__(self, d=16, scale=0.5):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.inj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        with torch.no_grad():
            self.lin.weight.mul_(scale / torch.linalg.matrix_norm(self.lin.weight, 2))

    def forward(self, z, x):
        return self.norm(torch.tanh(self.lin(z) + self.inj(x)))


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    deq = DEQ(Layer(), solver=Anderson(rtol=1e-5))
    x = torch.randn(4, 16)
    z, sol = deq(x)
    assert z is sol.value and sol.status is Status.CONVERGED
    z.pow(2).sum().backward()
    for name, p in deq.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_matches_unrolled_float64():
    torch.manual_seed(0)
    layer = Layer().double()
    x = torch.randn(3, 16, dtype=torch.float64)
    tight = Broyden(atol=1e-12, rtol=0.0, max_steps=200)
    grads = []
    for backward in (deepeq.ImplicitBackward(solver=tight), deepeq.UnrolledBackward()):
        deq = DEQ(
            layer,
            solver=tight
            if isinstance(backward, deepeq.ImplicitBackward)
            else deepeq.Picard(atol=1e-12, rtol=0.0, max_steps=500),
            backward=backward,
        )
        layer.zero_grad()
        deq(x)[0].sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8)


def test_eval_mode_uses_eval_solver_and_keeps_gradients():
    torch.manual_seed(0)
    deq = DEQ(
        Layer(scale=0.9),
        solver=Anderson(max_steps=2, rtol=1e-6),
        eval_solver=Anderson(max_steps=60, rtol=1e-6),
    )
    x = torch.randn(4, 16)
    _, sol = deq(x)
    assert sol.status is Status.MAX_STEPS and sol.stats.num_steps.max() == 2
    deq.eval()
    z, sol = deq(x)
    assert sol.status is Status.CONVERGED and sol.stats.num_steps.max() > 2
    z.sum().backward()  # eval mode: gradients still flow
    assert deq.f.lin.weight.grad is not None
    with torch.no_grad():
        z, sol = deq(x)
    assert not z.requires_grad and sol.backward is None


def test_initial_state_protocol():
    torch.manual_seed(0)
    calls = []

    class WithInit(Layer):
        def init_state(self, x):
            calls.append(x.shape)
            return torch.zeros_like(x)

    deq = DEQ(WithInit())
    x = torch.randn(2, 16)
    deq(x)
    assert calls == [(2, 16)]
    z0 = torch.randn(2, 16)
    deq(x, z0=z0)  # explicit z0 wins
    assert calls == [(2, 16)]

    class TupleInput(nn.Module):
        def forward(self, z, x):
            return 0.5 * z + x[0] * x[1]

    with pytest.raises(TypeError, match="init_state"):
        DEQ(TupleInput())((torch.ones(2, 3), torch.ones(2, 3)))
    z, _ = DEQ(TupleInput())((torch.ones(2, 3), 2 * torch.ones(2, 3)), z0=torch.zeros(2, 3))
    torch.testing.assert_close(z, torch.full((2, 3), 4.0), rtol=1e-2, atol=0)


def test_warm_start():
    torch.manual_seed(0)
    deq = DEQ(Layer(scale=0.9), solver=Anderson(rtol=1e-4), warm_start=True)
    x = torch.randn(4, 16)
    with torch.no_grad():
        _, cold = deq(x)
        _, warm = deq(x)
        assert warm.stats.nfe < cold.stats.nfe
        _, other = deq(torch.randn(3, 16))  # different shape: not warm-started, no error
        assert other.status is Status.CONVERGED
        deq.reset_warm_start()
        _, again = deq(x)
        assert again.stats.nfe == cold.stats.nfe


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        DEQ(lambda z, x: z)
    with pytest.raises(TypeError, match="solver object"):
        DEQ(Layer(), solver="anderson")
    with pytest.raises(TypeError, match="backward rule"):
        DEQ(Layer(), backward="implicit")


def test_autocast_bfloat16_cpu():
    torch.manual_seed(0)
    layer = Layer()
    x = torch.randn(4, 16)
    c = torch.randn(4, 16)
    deq = DEQ(layer, solver=Anderson(rtol=1e-2))
    z32, _ = deq(x)
    g32 = torch.autograd.grad((z32 * c).sum(), list(layer.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z16, sol = deq(x)
        loss = (z16 * c).sum()
    assert z16.dtype == torch.float32 and sol.fz.dtype == torch.float32  # solver state in fp32
    assert sol.status is Status.CONVERGED
    g16 = torch.autograd.grad(loss, list(layer.parameters()))
    for a, b in zip(g16, g32, strict=True):
        assert torch.isfinite(a).all()
        assert ((a - b).norm() / b.norm()).item() < 0.1
    assert sol.backward.calls == 1 and sol.backward.abs_residual.dtype == torch.float64


class Recording(Layer):
    """Layer that records, per call, whether autocast was on and whether autograd recorded."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z, x):
        self.calls.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))
        return super().forward(z, x)


def test_solve_dtype_casts_only_the_forward_iterations():
    torch.manual_seed(0)
    layer = Recording()
    x, c = torch.randn(4, 16), torch.randn(4, 16)
    deq = DEQ(layer, solver=Anderson(rtol=1e-2), solve_dtype=torch.bfloat16)
    z, sol = deq(x)
    g = torch.autograd.grad((z * c).sum(), list(layer.parameters()))
    iterations, tracked = layer.calls[:-1], layer.calls[-1]
    assert iterations and not any(grad for _, grad in iterations)
    # the solver's iterations in bf16; the stopping rule checks the returned iterate at full
    # precision (a bf16 residual below bf16's round-off means nothing)
    casts = [cast for cast, _ in iterations]
    assert casts[0] and not casts[-1] and sum(casts) >= len(casts) - 2
    assert tracked == (False, True)  # the call gradients flow through: full precision
    assert z.dtype == sol.fz.dtype == torch.float32 and sol.status is Status.CONVERGED
    # the same solve in full precision: equal up to the tolerance and bf16 round-off
    layer.calls.clear()
    z32, _ = DEQ(layer, solver=Anderson(rtol=1e-2))(x)
    assert not any(cast for cast, _ in layer.calls)
    assert ((z - z32).norm() / z32.norm()).item() < 0.05
    g32 = torch.autograd.grad((z32 * c).sum(), list(layer.parameters()))
    for a, b in zip(g, g32, strict=True):
        assert ((a - b).norm() / b.norm()).item() < 0.1
    # eval mode: full precision unless eval_solve_dtype is given
    layer.calls.clear()
    with torch.no_grad():
        deq.eval()(x)
    assert layer.calls and not any(cast for cast, _ in layer.calls)
    layer.calls.clear()
    with torch.no_grad():
        DEQ(layer, eval_solve_dtype="bfloat16").eval()(x)
    assert layer.calls[0][0] and not layer.calls[-1][0]  # bf16 iterations, fp32 check
    with pytest.raises(ValueError, match=r"solve_dtype must be torch\.bfloat16 or torch\.float16"):
        DEQ(layer, solve_dtype="float8")
    with pytest.raises(ValueError, match="solve_dtype must be"):
        deepeq.fixed_point(lambda z: z, torch.zeros(2, 3), solve_dtype=torch.float64)
