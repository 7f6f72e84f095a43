"""Causal solving: an equilibrium sequence model never lets a later token change an earlier
output, whatever the tolerance and cap (the per-sample stopping rule, iterate selection and
mixing over the whole sequence leak the future whenever a solve is not exact)."""

import pytest
import torch

import deepeq
from deepeq import Anderson, Broyden, Picard, fixed_point
from deepeq.models import create_model, list_models


def _causal_map(d: int = 6, seed: int = 0):
    """f(z, x)_t = tanh(W z_t + U mean_{s<=t} z_s + x_t): causal along dim 1, mixing positions."""
    g = torch.Generator().manual_seed(seed)
    W = 0.5 * torch.randn(d, d, generator=g) / d**0.5
    U = 0.9 * torch.randn(d, d, generator=g) / d**0.5

    def f(z, x):
        T = z.shape[1]
        mean = z.cumsum(1) / torch.arange(1, T + 1, dtype=z.dtype).view(1, T, 1)
        return torch.tanh(z @ W.T + mean @ U.T + x)

    return f


def _pair(B=3, T=16, d=6, t=9):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(B, T, d, generator=g)
    b = a.clone()
    b[:, t:] = torch.randn(B, T - t, d, generator=g)  # same prefix, another future
    return a, b, t


@pytest.mark.parametrize("solver", [Picard(rtol=1e-2, max_steps=4), Anderson(rtol=1e-2, max_steps=5),
                                    Anderson(rtol=0.3, max_steps=30), Picard(rtol=1e-6, max_steps=200)],
                         ids=repr)  # fmt: skip
def test_causal_solve_is_exactly_causal_at_any_tolerance(solver):
    f = _causal_map()
    a, b, t = _pair()
    za = fixed_point(f, torch.zeros_like(a), solver, args=(a,), causal=True).value
    zb = fixed_point(f, torch.zeros_like(b), solver, args=(b,), causal=True).value
    assert torch.equal(za[:, :t], zb[:, :t])  # bit-identical
    assert (za[:, t:] - zb[:, t:]).abs().max() > 1e-3
    # the whole-sequence solve leaks at the same settings (what the causal mode fixes)
    if isinstance(solver, Anderson):  # (a Picard solve to its cap makes the same steps)
        wa = fixed_point(f, torch.zeros_like(a), solver, args=(a,)).value
        wb = fixed_point(f, torch.zeros_like(b), solver, args=(b,)).value
        assert (wa[:, :t] - wb[:, :t]).abs().max() > 1e-6


def test_causal_solve_reports_the_residual_of_the_returned_state():
    f = _causal_map()
    a, _, _ = _pair()
    for solver in (Anderson(rtol=1e-3, max_steps=8), Anderson(rtol=1e-4, max_steps=60)):
        sol = fixed_point(f, torch.zeros_like(a), solver, args=(a,), causal=True, trace=True)
        z = sol.value
        fz = f(z, a)
        res_rows = (fz - z).norm(dim=2).double()
        rows_ok = res_rows <= 1e-3 * fz.norm(dim=2).double() if solver.rtol == 1e-3 else None
        true_abs = res_rows.amax(1)  # the worst position's residual (the per-position rule)
        torch.testing.assert_close(sol.stats.abs_residual, true_abs, rtol=1e-5, atol=1e-9)
        if rows_ok is not None:  # converged means: every position met the rule
            assert torch.equal(sol.stats.converged, rows_ok.all(1))
        assert sol.stats.trace.shape == (3, int(sol.stats.num_steps.max()) + 1)
        # frozen positions form a prefix, so the last trace entry is the returned residual
        torch.testing.assert_close(sol.stats.trace[:, -1], true_abs, rtol=1e-5, atol=1e-9)
    assert sol.status is deepeq.Status.CONVERGED


def test_causal_solve_gradients_match_the_whole_sequence_solve():
    torch.manual_seed(0)
    f = _causal_map()
    a, _, _ = _pair()
    x = a.double().requires_grad_()
    fd = lambda z, x: f(z.float(), x.float()).double()  # noqa: E731
    grads = []
    for causal in (True, False):
        sol = fixed_point(fd, torch.zeros_like(x), Anderson(rtol=1e-10, max_steps=200), args=(x,),
                          causal=causal, backward=deepeq.ImplicitBackward(solver=Anderson(rtol=1e-10, max_steps=200)))  # fmt: skip
        (g,) = torch.autograd.grad(sol.value.sin().sum(), x)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_causal_solve_errors():
    f = _causal_map()
    a, _, _ = _pair()
    with pytest.raises(ValueError, match="Broyden's inverse-Jacobian estimate does not split"):
        fixed_point(f, torch.zeros_like(a), Broyden(), args=(a,), causal=True)
    with pytest.raises(TypeError, match=r"causal=True needs z0 as one tensor \(B, T, ...\)"):
        fixed_point(lambda z, x: z, (a, a), Anderson(), args=(a,), causal=True)
    with pytest.raises(ValueError, match="independent=False is not supported"):
        fixed_point(f, torch.zeros_like(a), Anderson(), args=(a,), causal=True, independent=False)
    with pytest.raises(ValueError, match="Broyden"):
        create_model("deq_transformer_tiny", solve=dict(solver="broyden"))
    create_model(
        "deq_transformer_tiny", solve=dict(solver="broyden", causal=False)
    )  # whole sequence


# Every registered sequence DEQ at its own solver settings; only sizes are reduced for the paper
# models (vocabulary, adaptive cut-offs), never tolerances or caps.
SEQUENCE_DEQS = [n for n in list_models("deq_*")]
SMALL_VOCAB = {"vocab_size": 600, "cutoffs": (100, 200, 400)}


def _model(name, **kw):
    over = {}
    if "wt103" in name or name == "deq_trellisnet_ptb":
        over = (
            dict(SMALL_VOCAB)
            if name.endswith(("_adaptive", "_small")) and "wt103" in name
            else dict(vocab_size=600)
        )
    return create_model(name, **over, **kw)


def _outputs(model, tok, seed=5):
    torch.manual_seed(seed)  # the same dropout masks for both inputs
    out, _, sols = model(tok)
    return out.detach(), sols


def _check_causal(model, T=20, t=11):
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, V, (2, T), generator=g)
    b = a.clone()
    b[:, t:] = torch.randint(0, V, (2, T - t), generator=g)
    for training in (True, False):
        model.train(training)
        la, sa = _outputs(model, a)
        lb, _ = _outputs(model, b)
        assert torch.equal(la[:, :t], lb[:, :t]), (training, (la[:, :t] - lb[:, :t]).abs().max())
        assert (la[:, t:] - lb[:, t:]).abs().max() > 1e-6
    return sa


@pytest.mark.parametrize("name", SEQUENCE_DEQS)
def test_every_sequence_deq_is_causal_at_its_default_settings(name):
    torch.manual_seed(0)
    model = _model(name)
    assert model.equilibrium.causal
    _check_causal(model)


@pytest.mark.parametrize("name", ["deq_transformer_tiny", "deq_trellisnet_tiny"])
def test_causal_after_training_and_with_subsequence_solving(name):
    """Trained weights (a few hundred Adam steps on a toy stream) at the default caps, and
    subsequence solving (chunks of 5) at the same settings."""
    torch.manual_seed(0)
    model = create_model(name, vocab_size=10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(3)
    for _ in range(60):
        tok = torch.randint(0, 10, (8, 21), generator=g)
        tok[:, 10:] = tok[:, :11].flip(1)  # something to learn
        nll, _, _ = model(tok[:, :-1], targets=tok[:, 1:])
        opt.zero_grad()
        nll.mean().backward()
        opt.step()
    sols = _check_causal(model)
    assert sols[0].stats.nfe >= 2
    chunked = create_model(name, vocab_size=10, subseq_len=5)
    chunked.load_state_dict(model.state_dict())
    _check_causal(chunked)


def test_causal_anderson_weights_solve_each_prefix():
    """Row t's mixing weights minimise ||Σ α_i g_i||² + ridge terms over positions <= t: the last
    position's system is the whole sequence's, whatever each row's stored scale."""
    from deepeq.solvers._anderson import _weights

    g = torch.Generator().manual_seed(0)
    B, T, m, d = 2, 4, 3, 5
    G = torch.randn(B, T, m, d, generator=g, dtype=torch.float64)  # residual history per row
    scale = torch.rand(B * T, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    Gs = (G.reshape(B * T, m, d) * scale.unsqueeze(2)).float()  # rows store scaled residuals
    H = torch.einsum("rid,rjd->rij", Gs, Gs)
    ridge = 1e-4
    H = H + torch.diag_embed(torch.diagonal(H, dim1=1, dim2=2) * ridge)
    valid = torch.ones(B * T, m)
    y = _weights(H, valid, scale.float(), T).view(B, T, m).double()
    for b in range(B):
        for t in range(T):
            P = G[b, : t + 1]  # (t+1, m, d): the prefix's residuals, unscaled
            Hp = torch.einsum("sid,sjd->ij", P, P)
            Hp = Hp + torch.diag(torch.diagonal(Hp) * ridge)
            ref = torch.linalg.solve(Hp, torch.ones(m, dtype=torch.float64))
            torch.testing.assert_close(
                y[b, t] / y[b, t].sum(), ref / ref.sum(), rtol=1e-4, atol=1e-5
            )


def test_causal_unrolled_oracle_computes_the_same_solve():
    """With autograd recording (UnrolledBackward) the causal solve must make the same iterates as
    without: the safeguard's re-solve (rows with singular histories, forced here by ridge 0 and
    equal components) keeps every other row's prefix weights."""
    f = _causal_map(d=4)
    a, _, _ = _pair(d=4)
    a = a[..., :1].expand_as(a).contiguous()  # equal components: singular histories
    W = torch.ones((), requires_grad=True)
    g = lambda z, x: f(z, W * x)  # noqa: E731
    solver = Anderson(ridge=0.0, rtol=1e-6, max_steps=12)
    with torch.no_grad():
        ref = fixed_point(g, torch.zeros_like(a), solver, args=(a,), causal=True).value
    sol = fixed_point(g, torch.zeros_like(a), solver, args=(a,), causal=True,
                      backward=deepeq.UnrolledBackward())  # fmt: skip
    torch.testing.assert_close(sol.value.detach(), ref, rtol=1e-6, atol=1e-7)
    sol.value.sum().backward()
    assert torch.isfinite(W.grad)
