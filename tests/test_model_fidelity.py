"""Model fidelity: every registered model trains every parameter (no dead weights in the
twins that the parameter-matched comparisons count), the equilibrium state stays in float32
under autocast, and DEQ-TrellisNet injects its input through a causal kernel-k convolution (as
TrellisNet and the DEQ paper do)."""

import pytest
import torch

import deepeq
from deepeq.models import create_model, list_models

# Paper-size models at CPU-test sizes: only vocabularies, adaptive cut-offs and image sizes are
# reduced; structure, solver settings and every other default are kept.
REDUCED = {
    "deq_transformer_wt103_small": dict(vocab_size=600, cutoffs=(100, 200, 400)),
    "deq_transformer_wt103_medium": dict(vocab_size=600),
    "deq_transformer_wt103_medium_adaptive": dict(vocab_size=600, cutoffs=(100, 200, 400)),
    "deq_trellisnet_ptb": dict(vocab_size=600),
    "mdeq_imagenet": dict(image_size=32),
}
SEQUENCE_VOCAB = 50  # the sequence models of the *_small / *_tiny sizes


def _build(name: str):
    over = dict(REDUCED.get(name, {}))
    if not name.startswith("mdeq") and "vocab_size" not in over:
        over["vocab_size"] = SEQUENCE_VOCAB
    return create_model(name, **over)


def _batch(model, B: int, T: int, g: torch.Generator):
    """Inputs and targets. Token streams spread evenly over the whole vocabulary (every cluster
    of an adaptive softmax / embedding is hit), shuffled."""
    c = model.config
    if hasattr(c, "image_size"):
        x = torch.randn(B, c.in_channels, c.image_size, c.image_size, generator=g)
        return x, torch.randint(0, c.num_classes, (B,), generator=g)
    n = B * (T + 1)
    spread = (torch.arange(n) * c.vocab_size) // n
    tok = spread[torch.randperm(n, generator=g)].view(B, T + 1)
    return tok[:, :-1].contiguous(), tok[:, 1:].contiguous()


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_trains_every_parameter(name):
    """Three Adam steps at the model's default settings (sizes reduced as above): no parameter
    tensor may have a gradient that is None or exactly zero everywhere at the last step. Bug
    this catches: the first layer of an untied stack starting from z = 0, whose z-path weights
    (e.g. ``blocks.0.attn.qkv``) never receive a gradient yet count in the parameter matching."""
    torch.manual_seed(0)
    model = _build(name)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = _batch(model, 2, 16, g)
        loss = model(x, targets=y)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.any())]
    assert not dead, f"{name}: parameters whose gradient is None or all zero: {dead}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mdeq_keeps_its_equilibrium_in_float32_under_autocast(dtype):
    """Under CPU autocast the stem runs in the low-precision dtype; the solver state, the
    returned equilibrium and the backward solve must stay in float32 (fp16 states made the
    backward solve non-finite and fall back on most samples)."""
    torch.manual_seed(0)
    model = create_model("mdeq_tiny")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    with torch.autocast("cpu", dtype=dtype):
        nll, _, sols = model(x, targets=y)
    nll.mean().backward()
    sol = sols[0]
    assert [v.dtype for v in sol.value] == [torch.float32] * 2
    assert sol.status is not deepeq.Status.NONFINITE
    assert sol.backward.status is not deepeq.Status.NONFINITE, sol.backward.status
    assert not bool(sol.backward.fallback.any()), sol.backward.fallback
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_deq_default_state_is_float32_under_autocast():
    """``DEQ`` builds its default z0 from x; under autocast x is often in the autocast dtype
    (the output of a linear layer): the state must still be float32, as documented."""
    torch.manual_seed(0)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, z, x):
            return torch.tanh(0.5 * self.lin(z) + x)

    proj = torch.nn.Linear(8, 16)
    deq = deepeq.DEQ(Layer(), solver=deepeq.Anderson(rtol=1e-3, max_steps=30))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = proj(torch.randn(4, 8))
        assert x.dtype == torch.bfloat16
        z, sol = deq(x)
    assert z.dtype == torch.float32
    z.float().pow(2).sum().backward()
    assert sol.backward.status is not deepeq.Status.NONFINITE


def _injection(model, e: torch.Tensor) -> torch.Tensor:
    ctx = model.initial_context(e.shape[0], model.size, e.device, e.dtype)
    return model.inject(e, ctx)


@pytest.mark.parametrize("k", [2, 3])
def test_trellisnet_injects_through_a_causal_kernel_k_convolution(k):
    """x̃_t depends on the embeddings of positions t-k+1..t (and of no later or earlier one), at
    the default injection of every TrellisNet model."""
    torch.manual_seed(0)
    model = create_model("deq_trellisnet_tiny", kernel_size=k)
    g = torch.Generator().manual_seed(0)
    T = 9
    e = torch.randn(2, T, model.config.d_embed, generator=g)
    ref = _injection(model, e)
    for s in range(T):
        e2 = e.clone()
        e2[:, s] += torch.randn(2, model.config.d_embed, generator=g)
        changed = (_injection(model, e2) - ref).abs().amax(dim=(0, 2)) > 0
        expect = torch.zeros(T, dtype=torch.bool)
        expect[s : s + k] = True  # positions s .. s+k-1 read embedding s
        assert torch.equal(changed, expect), (s, changed)


@pytest.mark.parametrize(
    "name", ["deq_trellisnet_tiny", "deq_trellisnet_small", "deq_trellisnet_ptb"]
)
def test_trellisnet_default_injection_is_the_convolution(name):
    """The default of every registered DEQ-TrellisNet; pointwise stays available."""
    with torch.device("meta"):
        m = create_model(name)
        pw = create_model(name, injection="pointwise")
    assert m.config.injection == "conv"
    E, D, k = m.config.d_embed, m.config.d_model, m.config.kernel_size
    assert m.inject.conv.weight.shape == (4 * D, E, k)
    assert pw.non_embedding_parameters() < m.non_embedding_parameters()
