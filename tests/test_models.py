"""The model zoo: registry, calling protocol, gradients, causality, memory, subsequence solving,
pretraining mode, twins' parameter matching, paper-size parameter counts (meta device)."""

import pytest
import torch

import deepeq
from deepeq.models import create_model, list_models, register_model

TINY = [n for n in list_models("*tiny") if not n.startswith("mdeq")]  # sequence models
# (image models: tests/test_vision.py)
DEQS = [n for n in TINY if n.startswith("deq_")]


def tokens(B=3, T=12, seed=0, vocab=10):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_registry():
    assert set(TINY) >= {
        "deq_transformer_tiny",
        "transformer_tied_tiny",
        "transformer_xl_tiny",
        "deq_trellisnet_tiny",
        "trellisnet_tied_tiny",
        "trellisnet_untied_tiny",
        "deq_llama_tiny",
        "llama_tied_tiny",
        "llama_untied_tiny",
    }
    with pytest.raises(ValueError, match=r"Unknown model 'deq_lstm'; registered models: \["):
        create_model("deq_lstm")
    with pytest.raises(TypeError, match=r"Unknown config field\(s\) \['d_hidden'\]"):
        create_model("deq_transformer_tiny", d_hidden=3)
    with pytest.raises(ValueError, match="already registered"):
        register_model("deq_transformer_tiny", None, {}, create_model)

    with pytest.raises(
        ValueError, match=r"core: expected one of 'deq', 'tied', 'untied'; got 'lstm'"
    ):
        create_model("deq_transformer_tiny", core="lstm")
    # Override values are checked against the field's type: the string "false" is truthy, so
    # taking it for a bool would switch Pre-LN on; a float cap or a bool rate are refused too.
    for bad, msg in [
        (dict(pre_ln="false"), r"DEQTransformerConfig.pre_ln: expected true or false; got 'false'"),
        (
            dict(solve=dict(f_max_steps=5.0)),
            r"solve.f_max_steps: expected an int; got 5.0 \(float\)",
        ),
        (dict(dropout=True), r"dropout: expected a float; got True"),
        (dict(cutoffs=[5, "a"]), r"cutoffs\[1\]: expected an int; got 'a'"),
        (
            dict(solve=dict(dtype=3)),
            r"solve.dtype: expected one of 'bfloat16', 'float16' or None; got 3",
        ),
        (dict(solve=3), r"solve: expected a table of SolveSpec fields or a SolveSpec; got 3"),
        (
            dict(f_rtol=1e-2),
            r"f_rtol: the solver settings of DEQTransformerConfig live in its solve spec.*write solve.f_rtol",
        ),
    ]:
        with pytest.raises(TypeError, match=msg):
            create_model("deq_transformer_tiny", **bad)
    m = create_model("deq_transformer_tiny", cutoffs=[4, 8], dropout=0, pre_ln=True)
    assert m.config.cutoffs == (4, 8) and m.config.dropout == 0.0 and m.config.pre_ln is True


@pytest.mark.parametrize("name", TINY)
def test_forward_backward_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, dropout=0.1)
    logits, state, sols = model(tokens())
    assert logits.shape == (3, 12, 10) and torch.isfinite(logits).all()
    assert (len(sols) == 1) == name.startswith("deq_")
    for sol in sols:
        assert sol.stats.nfe >= 1 and sol.stats.abs_residual.shape == (3,)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 10), tokens().reshape(-1)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    for sol in sols:
        assert sol.backward.calls == 1 and sol.backward.nfe >= 1
    # The state continues the stream.
    logits2, _, _ = model(tokens(seed=1), state=state)
    assert logits2.shape == (3, 12, 10)


@pytest.mark.parametrize(
    ("name", "pre_ln"), [(n, False) for n in TINY] + [(n, True) for n in TINY if "transformer" in n]
)
def test_causality(name, pre_ln):
    torch.manual_seed(0)
    kw = dict(pre_ln=pre_ln) if "transformer" in name else {}
    if name.startswith("deq_"):
        kw.update(solve=dict(f_rtol=1e-10, f_max_steps=300, eval_max_steps=300))
    model = create_model(name, **kw).double().eval()
    a, b = tokens(B=2, T=10), tokens(B=2, T=10, seed=1)
    t = 6
    b[:, :t] = a[:, :t]  # same prefix, different future
    with torch.no_grad():
        la, _, sa = model(a)
        lb, _, sb = model(b)
    for s in sa + sb:
        assert s.status is deepeq.Status.CONVERGED
    torch.testing.assert_close(la[:, :t], lb[:, :t], atol=1e-7, rtol=0)
    assert (la[:, t:] - lb[:, t:]).abs().max() > 1e-4  # the future does change later outputs


@pytest.mark.parametrize("path", ["fused", "explicit"])
def test_relative_attention_matches_the_formula(path, monkeypatch):
    """score_ij = (q_i + u)·k_j + (q_i + v)·W_r R_(M+i-j) over [ctx; z], causal, softmax, · v_j;
    computed position by position. "fused": the scaled-dot-product kernel (no autograd, as in the
    solver's iterations); "explicit": the path with autograd or attention dropout (p ~ 0 here)."""
    from deepeq.nn.layers import RelativeAttention, sinusoid

    torch.manual_seed(0)
    B, T, M, D, H = 2, 5, 3, 8, 2
    att = RelativeAttention(D, H, dropatt=1e-12 if path == "explicit" else 0.0).double()
    with torch.no_grad():
        att.u.normal_(), att.v.normal_()
    att.train(path == "explicit")
    z, ctx = torch.randn(B, T, D).double(), torch.randn(B, M, D).double()
    inj, ctx_inj = torch.randn(B, T, 3 * D).double(), torch.randn(B, M, 3 * D).double()
    import deepeq.nn.layers as layers

    calls = []
    fused = layers.F.scaled_dot_product_attention
    monkeypatch.setattr(
        layers.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k)
    )
    with torch.set_grad_enabled(path == "explicit"):
        out = att(z, ctx, inj, ctx_inj)
    assert len(calls) == (1 if path == "fused" else 0)  # the path under test was taken
    qkv = att.qkv(torch.cat([ctx, z], 1)) + torch.cat([ctx_inj, inj], 1)
    q, k, v = (t.reshape(B, M + T, H, D // H) for t in qkv.split(D, 2))
    R = att.r_net(sinusoid(torch.arange(M + T), D).double()).reshape(M + T, H, D // H)
    ref = torch.zeros(B, T, H, D // H, dtype=torch.float64)
    for i in range(T):
        keys = range(M + i + 1)  # the whole context and the segment up to i
        s = (
            torch.stack(
                [
                    ((q[:, M + i] + att.u) * k[:, j] + (q[:, M + i] + att.v) * R[M + i - j]).sum(-1)
                    for j in keys
                ],
                dim=-1,
            )
            / (D // H) ** 0.5
        )  # (B, H, keys)
        ref[:, i] = torch.einsum("bhj,bjhd->bhd", s.softmax(-1), v[:, : M + i + 1])
    torch.testing.assert_close(out, att.out(ref.reshape(B, T, D)), atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_two_segments_with_memory_equal_one_pass(name):
    torch.manual_seed(0)
    kw = (
        dict(solve=dict(f_rtol=1e-10, f_max_steps=300, eval_max_steps=300))
        if name.startswith("deq_")
        else {}
    )
    model = create_model(name, mem_len=8, **kw).double().eval()
    x = tokens(B=2, T=16)
    with torch.no_grad():
        full, _, _ = model(x)
        first, state, _ = model(x[:, :8])
        second, _, _ = model(x[:, 8:], state=state)
    torch.testing.assert_close(first, full[:, :8], atol=1e-7, rtol=0)
    torch.testing.assert_close(second, full[:, 8:], atol=1e-7, rtol=0)


@pytest.mark.parametrize("name", DEQS)
def test_subsequence_solving_matches_full_solve(name):
    torch.manual_seed(0)
    kw = dict(solve=dict(f_rtol=1e-10, f_max_steps=300, b_rtol=1e-10, b_max_steps=300))
    full_model = create_model(name, **kw).double()
    chunked = create_model(name, subseq_len=4, **kw).double()
    chunked.load_state_dict(full_model.state_dict())
    x = tokens(B=2, T=12)
    grads, outs = [], []
    for m in (full_model, chunked):
        logits, _, sols = m(x)
        assert len(sols) == (3 if m is chunked else 1)
        logits.pow(2).mean().backward()
        outs.append(logits.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1], outs[0], atol=1e-7, rtol=0)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("name", DEQS)
def test_phantom_backward_is_k_tracked_steps_from_the_equilibrium(name):
    torch.manual_seed(0)
    tight = dict(f_rtol=1e-12, f_max_steps=300, eval_max_steps=300)
    implicit = create_model(name, solve=tight).double().eval()
    phantom = (
        create_model(name, solve={**tight, "backward": "phantom", "phantom_steps": 2})
        .double()
        .eval()
    )
    phantom.load_state_dict(implicit.state_dict())
    x = tokens()
    with torch.no_grad():
        _, _, sols = implicit(x)
    logits, _, _ = phantom(x)
    logits.pow(2).mean().backward()
    # by hand: two recorded applications of f from the (detached) equilibrium
    m = implicit
    emb = m.embed(x)
    ctx = m.initial_context(x.shape[0], m.size, emb.device, emb.dtype)
    inj = m.inject(emb, ctx)
    z = sols[0].value.detach()
    for _ in range(2):
        z = m.f(z, m.layer_input(m.f, inj, ctx))
    ref = m.logits(z)
    ref.pow(2).mean().backward()
    torch.testing.assert_close(logits, ref, atol=1e-9, rtol=0)
    grads = dict(phantom.named_parameters())
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n].grad, p.grad, atol=1e-9, rtol=1e-7, msg=n)
    with pytest.raises(ValueError, match=r"backward: expected one of 'implicit', 'phantom'"):
        create_model(name, solve=dict(backward="unrolled"))


@pytest.mark.parametrize("name", DEQS)
def test_solve_dtype_from_the_config(name):
    torch.manual_seed(0)
    # a cap at which both solves reach the tolerance: capped solves differ by their residuals
    ref = create_model(name, solve=dict(f_rtol=1e-2, f_max_steps=60))
    m = create_model(name, solve=dict(f_rtol=1e-2, f_max_steps=60, dtype="bfloat16"))
    m.load_state_dict(ref.state_dict())
    assert m.equilibrium.solve_dtype == "bfloat16" and m.equilibrium.eval_solve_dtype is None
    x = tokens()
    out, _, _ = m(x)
    out_ref, _, _ = ref(x)
    out.pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    # both solves meet rtol 1e-2; their equilibria differ by about residual / (1 - ρ(J)): a
    # fresh deq_llama_tiny is the worst conditioned (14-37 Anderson steps here): 6.0% measured
    bound = 0.1 if "llama" in name else 0.05
    assert ((out - out_ref).norm() / out_ref.norm()).item() < bound
    with pytest.raises(ValueError, match=r"solve\.dtype: expected one of 'bfloat16', 'float16'"):
        create_model(name, solve=dict(dtype="int8"))


@pytest.mark.parametrize("name", [*DEQS, "mdeq_tiny"])
def test_eval_rtol_sets_only_the_evaluation_solver(name):
    # default: evaluation solves at the training tolerance
    m = create_model(name)
    assert m.equilibrium.eval_solver.rtol == m.equilibrium.solver.rtol
    m = create_model(name, solve=dict(f_rtol=1e-2, f_max_steps=7, eval_max_steps=9))
    assert (m.equilibrium.solver.rtol, m.equilibrium.solver.max_steps) == (1e-2, 7)
    assert (m.equilibrium.eval_solver.rtol, m.equilibrium.eval_solver.max_steps) == (1e-2, 9)
    m = create_model(name, solve=dict(f_rtol=1e-2, eval_rtol=1e-4))
    assert (m.equilibrium.solver.rtol, m.equilibrium.eval_solver.rtol) == (1e-2, 1e-4)
    assert type(m.equilibrium.eval_solver) is type(m.equilibrium.solver)
    with pytest.raises(ValueError, match=r"rtol must be finite and >= 0; got -1"):
        create_model(name, solve=dict(eval_rtol=-1.0))


@pytest.mark.parametrize("name", DEQS)
def test_pretraining_mode_is_a_k_step_unroll(name):
    torch.manual_seed(0)
    model = create_model(name, pretrain_depth=2)
    twin = create_model(
        name.replace("deq_", "")
        .replace("transformer", "transformer_tied")
        .replace("trellisnet", "trellisnet_tied")
        .replace("llama", "llama_tied"),
        depth=2,
    )
    twin.load_state_dict(model.state_dict())
    x = tokens()
    model.set_pretraining(True)
    out, _, sols = model(x)
    assert sols == []
    ref, _, _ = twin(x)
    torch.testing.assert_close(out, ref)
    # ... and by hand: z <- f(z, x) twice from zero.
    e = model.embed(x)
    ctx = model.initial_context(3, model.size, e.device, e.dtype)
    inj = model.inject(e, ctx)
    z = torch.zeros(3, 12, model.state_dim(model.size))
    for _ in range(2):
        z = model.f(z, model.layer_input(model.f, inj, ctx))
    torch.testing.assert_close(out, model.head(model.readout(z)))
    model.set_pretraining(False)
    assert len(model(x)[2]) == 1


@pytest.mark.parametrize(
    ("deq", "untied"),
    [
        ("deq_transformer_tiny", "transformer_xl_tiny"),
        ("deq_trellisnet_tiny", "trellisnet_untied_tiny"),
        ("deq_llama_tiny", "llama_untied_tiny"),
    ],
)
def test_untied_twin_matches_non_embedding_parameters(deq, untied):
    a, b = create_model(deq), create_model(untied)
    assert len(b.blocks) == a.depth == a.config.solve.f_max_steps
    assert (
        abs(b.non_embedding_parameters() - a.non_embedding_parameters())
        <= 0.05 * a.non_embedding_parameters()
    )


def test_paper_size_parameter_counts_on_meta():
    with torch.device("meta"):
        ptb = create_model("deq_trellisnet_ptb")
        wt = create_model("deq_transformer_wt103_medium")
    total = sum(p.numel() for p in ptb.parameters())
    assert 22e6 < total < 26e6  # the paper's PTB DEQ-TrellisNet has 24M
    # non-embedding: injection conv 400*4000*2+4000, conv 1000*4000*2+4000
    # weight norm adds one gain per output channel of the injection and of the conv
    assert ptb.non_embedding_parameters() == (400 * 4000 * 2 + 4000 + 4000) + (
        1000 * 4000 * 2 + 4000 + 4000
    )
    d, ff = 700, 4000
    layer = 3 * d * d + d * d + d * d + 2 * 10 * 70 + (d * ff + ff + ff * d + d) + 4 * d
    gains = 3 * d + d + d + ff + d + 3 * d  # weight norm: qkv, r_net, out, fc1, fc2, injection
    assert wt.non_embedding_parameters() == layer + (700 * 3 * d + 3 * d) + gains


def test_llama_block_rotary_embeddings_and_parameter_count():
    """RoPE: a rotated query-key product depends only on the positions' difference (so a memory
    re-rotated at its window positions keeps its scores); deq_llama_small's parameter count by
    formula (no biases; three RMSNorm gains; SwiGLU's three matrices)."""
    from deepeq.models.deq_llama import rotate

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 5, 2, 8, generator=g, dtype=torch.float64).unbind(0)[0], None
    k = torch.randn(5, 2, 8, generator=g, dtype=torch.float64)
    p = torch.arange(5)

    def scores(shift):
        qr = rotate(q.unsqueeze(0), p + shift, 10000.0)[0]
        kr = rotate(k.unsqueeze(0), p + shift, 10000.0)[0]
        return torch.einsum("ihd,jhd->hij", qr, kr)

    torch.testing.assert_close(scores(0), scores(37), atol=1e-12, rtol=0)
    assert not torch.allclose(scores(0), torch.einsum("ihd,jhd->hij", q, k))
    m = create_model("deq_llama_small")
    d, ff, e = 128, 344, 128
    layer = 3 * d * d + d * d + 3 * d * ff + 3 * d
    assert m.non_embedding_parameters() == layer + e * 3 * d
    with pytest.raises(ValueError, match="even head width"):
        create_model("deq_llama_tiny", n_heads=32)
