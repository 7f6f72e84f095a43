"""Jacobian penalty (Hutchinson) and spectral radius against exact Jacobians; weight/spectral
norm inside DEQ; variational dropout masks; the penalty schedule."""

import pytest
import torch
from torch import nn

import deepeq
from deepeq import DEQ, Anderson, JacobianSchedule, jacobian_penalty, spectral_radius
from deepeq.nn import VariationalDropout

F64 = torch.float64


def _layer(gen, D=5, B=3):
    W = (0.9 * torch.randn(D, D, generator=gen, dtype=F64)).requires_grad_()
    x = torch.randn(B, D, generator=gen, dtype=F64)
    z = torch.randn(B, D, generator=gen, dtype=F64)
    return W, x, z


def _exact_jacobians(W, x, z, create_graph=False):
    """(B, D, D) per-sample Jacobians of f(z) = tanh(z Wᵀ + x)."""
    return torch.stack(
        [
            torch.autograd.functional.jacobian(
                lambda v, i=i: torch.tanh(v @ W.T + x[i]), z[i], create_graph=create_graph
            )
            for i in range(z.shape[0])
        ]
    )


def test_hutchinson_matches_exact_frobenius_norm(gen):
    W, x, z = _layer(gen)
    J = _exact_jacobians(W, x, z).detach()
    D = z.shape[1]
    exact = J.pow(2).sum((1, 2)) / D  # per sample ||J_b||_F^2 / d
    trace_like = torch.diagonal(J, dim1=1, dim2=2).sum(1) / D
    assert (exact - trace_like).abs().min() > 0.05  # the test can tell ||J||_F^2 from tr(J)
    M = 20000
    zl = z.clone().requires_grad_()
    fz = torch.tanh(zl @ W.T + x)
    est = jacobian_penalty(
        fz, zl, num_samples=M, generator=torch.Generator().manual_seed(0), reduction="none"
    )
    # Var ||εᵀJ||² = 2 ||J Jᵀ||_F² for Gaussian ε.
    std = (2 * (J @ J.transpose(1, 2)).pow(2).sum((1, 2)) / M).sqrt() / D
    assert ((est - exact).abs() <= 5 * std).all(), (est, exact, std)
    mean = jacobian_penalty(fz, zl, num_samples=4, generator=torch.Generator().manual_seed(1))
    assert mean.shape == () and mean.requires_grad


def test_hutchinson_gradient_matches_exact_in_expectation(gen):
    W, x, z = _layer(gen)
    J = _exact_jacobians(W, x, z, create_graph=True)
    exact = J.pow(2).sum((1, 2)).mean() / z.shape[1]
    (g_exact,) = torch.autograd.grad(exact, W)
    # Many probes at once: replicate the batch (one probe per replica is M probes per sample).
    M = 4000
    zr = z.repeat(M, 1).requires_grad_()
    fz = torch.tanh(zr @ W.T + x.repeat(M, 1))
    est = jacobian_penalty(fz, zr, generator=torch.Generator().manual_seed(0))
    (g_est,) = torch.autograd.grad(est, W)
    assert ((g_est - g_exact).norm() / g_exact.norm()).item() < 0.05


def test_penalty_through_deq_solution_needs_no_extra_call(gen):
    calls = []

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6).double()

        def forward(self, z, x):
            calls.append(1)
            return torch.tanh(0.5 * self.lin(z) + x)

    deq = DEQ(F(), solver=Anderson(rtol=1e-6))
    x = torch.randn(4, 6, generator=gen, dtype=F64)
    z, sol = deq(x)
    n = len(calls)
    pen = jacobian_penalty(sol.fz, sol.z_leaf, num_samples=2)
    assert len(calls) == n
    (z.sum() + pen).backward()  # implicit backward and the penalty's double backward together
    assert deq.f.lin.weight.grad is not None and torch.isfinite(deq.f.lin.weight.grad).all()


@pytest.mark.parametrize("kind", ["real", "complex_pair", "mixed"])
def test_spectral_radius_matches_eigvals(kind, gen):
    B, D = 4, 6
    A = torch.randn(B, D, D, generator=gen, dtype=F64)
    if kind == "complex_pair":  # dominant pair ±0.95i on top of a small random part
        rot = torch.zeros(D, D, dtype=F64)
        rot[0, 1], rot[1, 0] = -0.95, 0.95
        A = rot + 0.05 * A
    elif kind == "mixed":
        A = A / torch.linalg.matrix_norm(A, 2).reshape(B, 1, 1)
    z = torch.randn(B, D, generator=gen, dtype=F64, requires_grad=True)
    fz = torch.bmm(A, z.unsqueeze(2)).squeeze(2)
    rho = spectral_radius(fz, z, generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.eigvals(A).abs().amax(1)
    torch.testing.assert_close(rho, exact, atol=1e-8, rtol=1e-8)


def test_regularizer_input_errors():
    z = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(TypeError, match="takes tensors"):
        jacobian_penalty(None, z)
    with pytest.raises(ValueError, match="same shape"):
        jacobian_penalty(torch.zeros(2, 4), z)
    with pytest.raises(ValueError, match="autograd recording"):
        jacobian_penalty(z.detach() * 2, z.detach())
    with pytest.raises(ValueError, match="num_samples"):
        jacobian_penalty(2 * z, z, num_samples=0)
    fz = torch.tanh(z)
    fz.sum().backward()  # frees the graph
    with pytest.raises(RuntimeError, match="before the backward pass"):
        spectral_radius(fz, z)


class NormLayer(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.lin = norm(nn.Linear(8, 8))
        self.calls = 0
        self.lin.parametrizations.weight.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def forward(self, z, x):
        return torch.tanh(0.5 * self.lin(z) + x)


def test_weight_norm_once_per_forward_and_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    w0 = lin.weight.detach().clone()
    torch.testing.assert_close(deepeq.weight_norm(lin).weight, w0)  # unchanged at init
    layer = NormLayer(lambda m: deepeq.weight_norm(m))
    deq = DEQ(layer, solver=Anderson(rtol=1e-5))
    x = torch.randn(4, 8)
    z, sol = deq(x)
    assert sol.stats.nfe > 3 and layer.calls == 1  # computed once per DEQ forward
    z.sum().backward()
    g, v = layer.lin.parametrizations.weight.original0, layer.lin.parametrizations.weight.original1
    assert g.grad is not None and v.grad is not None and g.grad.abs().sum() > 0
    deq(x)
    assert layer.calls == 2


def test_spectral_norm_converges_and_freezes_in_eval():
    torch.manual_seed(0)
    layer = NormLayer(lambda m: deepeq.spectral_norm(m))
    with torch.no_grad():
        layer.lin.parametrizations.weight.original.mul_(5.0)
    deq = DEQ(layer, solver=Anderson(rtol=1e-4))
    x = torch.randn(4, 8)
    with torch.no_grad():
        for _ in range(30):  # one power iteration per DEQ forward in training mode
            deq(x)
    sigma = torch.linalg.matrix_norm(layer.lin.weight.detach(), 2).item()
    assert abs(sigma - 1.0) < 1e-3
    # Perturb the underlying weight: re-converges.
    with torch.no_grad():
        layer.lin.parametrizations.weight.original.add_(torch.randn(8, 8))
        for _ in range(30):
            deq(x)
    assert abs(torch.linalg.matrix_norm(layer.lin.weight.detach(), 2).item() - 1.0) < 1e-3
    deq.eval()
    u = layer.lin.parametrizations.weight[0]._u.clone()
    with torch.no_grad():
        deq(x)
        deq(x)
    assert torch.equal(u, layer.lin.parametrizations.weight[0]._u)


class DropLayer(nn.Module):
    """f(z, x, s) = s z + drop(1) x: equilibrium z* = mask x / (1 - s), sample by sample."""

    def __init__(self, p=0.5, shared_dims=(1,)):
        super().__init__()
        self.drop = VariationalDropout(p, shared_dims=shared_dims)
        self.calls = 0

    def init_state(self, inp):
        return torch.zeros_like(inp[0])

    def forward(self, z, inp):
        x, s = inp
        self.calls += 1
        return s * z + self.drop(torch.ones_like(x)) * x


def test_variational_dropout_one_mask_per_forward_follows_samples():
    torch.manual_seed(0)
    layer = DropLayer(shared_dims=(2,))
    tight = deepeq.Picard(atol=1e-12, rtol=0.0, max_steps=500)
    deq = DEQ(layer, solver=tight, backward=deepeq.ImplicitBackward(solver=tight))
    B = 6
    x = torch.randn(B, 3, 4, dtype=F64, requires_grad=True)
    s = torch.linspace(0.1, 0.9, B, dtype=F64).reshape(
        B, 1, 1
    )  # samples converge at different steps
    z, sol = deq((x, s))
    assert layer.calls > 10 and layer.drop.draws == 1  # one mask for every iteration
    assert sol.stats.num_steps[0] < sol.stats.num_steps[-1]  # compaction happened
    mask = layer.drop.mask
    assert mask.shape == (B, 3, 1)
    torch.testing.assert_close(z, mask * x / (1 - s), atol=1e-8, rtol=0)
    # The backward solve sees the same mask: dz*/dx = mask / (1 - s).
    z.sum().backward()
    torch.testing.assert_close(x.grad, (mask / (1 - s)).expand_as(x), atol=1e-8, rtol=1e-8)
    deq((x, s))
    assert layer.drop.draws == 2 and not torch.equal(mask, layer.drop.mask)
    deq.eval()
    z, _ = deq((x.detach(), s))
    assert layer.drop.draws == 2
    torch.testing.assert_close(z, x.detach() / (1 - s), atol=1e-8, rtol=0)


def test_variational_dropout_errors_and_standalone_reset():
    with pytest.raises(ValueError, match=r"p must be a float in \[0, 1\)"):
        VariationalDropout(1.0)
    with pytest.raises(ValueError, match="shared_dims"):
        VariationalDropout(0.1, shared_dims=(0,))
    drop = VariationalDropout(0.5, shared_dims=())
    drop(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="reset_deq_state"):
        drop(torch.ones(2, 5))
    deepeq.nn.reset_deq_state(drop)
    assert drop(torch.ones(2, 5)).shape == (2, 5)


def test_schedule():
    s = JacobianSchedule(weight=0.5, probability=0.4, seed=3)
    hits = [s.applies(k) for k in range(5000)]
    assert abs(sum(hits) / 5000 - 0.4) < 0.03
    assert hits == [
        JacobianSchedule(weight=0.5, probability=0.4, seed=3).applies(k) for k in range(5000)
    ]
    assert hits != [
        JacobianSchedule(weight=0.5, probability=0.4, seed=4).applies(k) for k in range(5000)
    ]
    assert {s(k) for k in range(100)} == {0.0, 0.5}
    r = JacobianSchedule(weight=1.0, final_weight=2.0, ramp_start=10, ramp_end=20)
    assert [r.weight_at(k) for k in (0, 10, 15, 20, 99)] == [1.0, 1.0, 1.5, 2.0, 2.0]
    with pytest.raises(ValueError, match="probability"):
        JacobianSchedule(probability=1.5)
    with pytest.raises(ValueError, match="ramp_end"):
        JacobianSchedule(final_weight=1.0, ramp_start=5, ramp_end=1)
    with pytest.raises(ValueError, match="weight"):
        JacobianSchedule(weight=-1.0)


def test_synthetic1d_smoke(tmp_path):
    from deepeq.experiments import synthetic1d

    results = synthetic1d.main(["--smoke", "--out", str(tmp_path)])
    assert [r["gamma"] for r in results] == [0.0, 2.0]
    for r in results:
        assert r["val_mse"] >= 0 and 1 <= r["eval_nfe"] <= 51 and r["skipped_steps"] == 0
        assert abs(r["jac_fro"] - r["spectral_radius"]) < 1e-6  # scalar state
    assert (tmp_path / "synthetic1d.png").stat().st_size > 10_000
    assert "| γ |" in (tmp_path / "table.md").read_text()
    data = synthetic1d.make_data(synthetic1d.Config(n_train=5000, n_val=96))
    x, y = data[0], data[1]
    assert x.min() >= -2 and x.max() <= 2 and (y - synthetic1d.target(x)).std() < 0.06


def test_masked_penalty_estimates_the_selected_rows(gen):
    W, x, z = _layer(gen)
    J = _exact_jacobians(W, x, z).detach()
    rows = J.pow(2).sum(2)  # (B, D): ||J_b[i, :]||²
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, [1, 3]] = True
    mask[2, :] = True  # sample 1: nothing selected
    zl = z.clone().requires_grad_()
    fz = torch.tanh(zl @ W.T + x)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    est = jacobian_penalty(fz, zl, num_samples=20000, generator=g(), mask=mask, reduction="none")
    exact = torch.stack([rows[b][mask[b]].sum() / max(1, int(mask[b].sum())) for b in range(3)])
    assert est[1] == 0 and exact[1] == 0
    torch.testing.assert_close(est, exact, rtol=0.05, atol=0)
    mean = jacobian_penalty(fz, zl, num_samples=20000, generator=g(), mask=mask)
    torch.testing.assert_close(mean, rows[mask].mean(), rtol=0.05, atol=0)
    # every entry selected: the unmasked estimate, probe for probe
    full = torch.ones(3, 1, dtype=torch.bool)  # broadcast over the features
    torch.testing.assert_close(
        jacobian_penalty(fz, zl, num_samples=3, generator=g(), mask=full),
        jacobian_penalty(fz, zl, num_samples=3, generator=g()),
    )
    with pytest.raises(ValueError, match="broadcastable to fz's shape"):
        jacobian_penalty(fz, zl, mask=torch.ones(2, dtype=torch.bool))


class _PerPosition(nn.Module):
    """f(z, x) = a_t z + x per position t (B, T, d): a_t = 0 converges in one step, |a_t| > 1
    never does, and J_f is diagonal, so the rows of J at position t have norm² a_t²."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.as_tensor(a, dtype=F64))

    def forward(self, z, x):
        return self.a.view(1, -1, 1) * z + x


@pytest.mark.parametrize("causal", [True, False])
def test_unconverged_penalty_targets_the_positions_that_missed_the_tolerance(causal, gen):
    from deepeq.train.step import unconverged_penalty

    B, T, d = 4, 6, 8
    f = _PerPosition([0.0, 0.0, 0.0, 1.2, 0.0, 0.0])
    deq = DEQ(f, solver=deepeq.Picard(max_steps=5, rtol=1e-6), causal=causal)
    x = torch.randn(B, T, d, generator=gen, dtype=F64)
    _, sol = deq(x)
    mask = deepeq.unconverged_mask(sol, 1e-6, causal=causal).reshape(B, T, d)
    # causal: exactly position 3 of every sample; otherwise every sample as a whole
    expect = torch.zeros(B, T, d, dtype=torch.bool)
    if causal:
        expect[:, 3] = True
    else:
        expect[:] = True
    assert torch.equal(mask, expect)
    torch.manual_seed(0)
    pen = unconverged_penalty(deq, [sol], num_samples=400)
    # mean over the selected rows of ||J_row||²: 1.2² at position 3, 0 elsewhere
    want = 1.44 if causal else 1.44 / T
    torch.testing.assert_close(pen.detach(), torch.tensor(want, dtype=F64), rtol=0.06, atol=0)
    (grad,) = torch.autograd.grad(pen, f.a)
    if causal:  # only the unconverged position's map is regularised
        assert grad[3] > 0 and (grad[[0, 1, 2, 4, 5]] == 0).all()
    # every position converged: no penalty
    f0 = _PerPosition([0.0] * T)
    deq0 = DEQ(f0, solver=deepeq.Picard(max_steps=5, rtol=1e-6), causal=causal)
    _, sol0 = deq0(x)
    assert deepeq.unconverged_mask(sol0, 1e-6, causal=causal) is None
    assert unconverged_penalty(deq0, [sol0]) is None
