"""Fixed-point correction: supervised solver iterates, each with a one-step gradient, against a
hand-written version of the same loss (values and gradients), at no extra call of f."""

import pytest
import torch

import deepeq
from deepeq import Anderson, Broyden, FixedPointCorrection, Picard, fixed_point
from deepeq.models import create_model


class Recording(torch.nn.Module):
    """f(z, x) = tanh(z W^T + x) (or a tuple state's version), recording every input."""

    def __init__(self, d: int = 5, tuple_state: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(
            0.4 * torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
        )
        self.tuple_state = tuple_state
        self.inputs = []

    def forward(self, z, x):
        self.inputs.append(
            tuple(p.detach().clone() for p in z) if self.tuple_state else z.detach().clone()
        )
        if self.tuple_state:
            a, b = z
            return torch.tanh(a @ self.W.T + x), 0.5 * torch.tanh(b + a)
        return torch.tanh(z @ self.W.T + x)


@pytest.mark.parametrize("solver", [Picard(rtol=1e-9, max_steps=12), Anderson(rtol=1e-9, max_steps=12),
                                    Broyden(rtol=1e-9, max_steps=12)], ids=repr)  # fmt: skip
@pytest.mark.parametrize("tuple_state", [False, True])
def test_correction_matches_a_hand_written_loss(solver, tuple_state):
    f = Recording(tuple_state=tuple_state)
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z0 = (torch.zeros_like(x), torch.zeros_like(x)) if tuple_state else torch.zeros_like(x)
    fpc = FixedPointCorrection(steps=3, gamma=0.8)
    steps = fpc.pick(solver.max_steps)
    assert steps == (3, 6, 9)
    y = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def loss_of(z):
        z = z[0] + z[1] if tuple_state else z
        return (z - y).pow(2).mean()

    sol = fixed_point(f, z0, solver, args=(x,), keep_iterates=steps)
    calls = len(f.inputs)
    # solver's calls (initial + one per step) + the implicit gradient's tracked call + k
    assert calls == sol.stats.nfe + 1 + len(steps)
    assert sol.trajectory_steps == steps and len(sol.trajectory) == 3
    iterates = f.inputs[: sol.stats.nfe]  # the solver's inputs: z_0, z_1, ...
    total = loss_of(sol.value) + fpc.loss([loss_of(t) for t in sol.trajectory])
    (g,) = torch.autograd.grad(total, f.W)
    # hand-written: f at the recorded iterates (detached), weights 0.8^3, 0.8^2, 0.8^1
    f.inputs.clear()
    by_hand = [f(iterates[s], x) for s in steps]
    for a, b in zip(sol.trajectory, by_hand, strict=True):
        for pa, pb in zip(a if tuple_state else (a,), b if tuple_state else (b,), strict=True):
            torch.testing.assert_close(pa, pb, rtol=1e-14, atol=1e-15)
    sol2 = fixed_point(f, z0, solver, args=(x,))
    manual = loss_of(sol2.value) + sum(
        w * loss_of(t) for w, t in zip([0.8**3, 0.8**2, 0.8], by_hand, strict=True)
    )
    (g2,) = torch.autograd.grad(manual, f.W)
    torch.testing.assert_close(g, g2, rtol=1e-10, atol=1e-12)
    assert (total - manual).abs().item() < 1e-12


def test_correction_after_an_early_stop_and_without_autograd():
    f = Recording()
    x = torch.randn(2, 5, dtype=torch.float64)
    sol = fixed_point(f, torch.zeros_like(x), Anderson(rtol=1e-3, max_steps=50), args=(x,),
                      keep_iterates=(2, 40))  # fmt: skip
    assert sol.stats.num_steps.max() < 40
    # step 40 was never reached: the returned value supplies it
    torch.testing.assert_close(sol.trajectory[1], f(sol.value.detach(), x))
    with torch.no_grad():
        assert (
            fixed_point(
                f, torch.zeros_like(x), Anderson(), args=(x,), keep_iterates=(2,)
            ).trajectory
            == ()
        )
    with pytest.raises(ValueError, match="keep_iterates must be a tuple of solver steps"):
        fixed_point(f, torch.zeros_like(x), Anderson(), args=(x,), keep_iterates=(1.5,))


def test_pick_and_weights():
    assert FixedPointCorrection(steps=2).pick(12) == (4, 8)
    assert FixedPointCorrection(steps=0).pick(12) == ()
    r = FixedPointCorrection(steps=3, mode="random").pick(10, torch.Generator().manual_seed(0))
    assert len(r) == 3 and all(1 <= s <= 9 for s in r) and list(r) == sorted(set(r))
    assert FixedPointCorrection(steps=2, gamma=0.5).weights(2) == [0.25, 0.5]
    for bad in (dict(steps=-1), dict(gamma=0.0), dict(mode="even")):
        with pytest.raises(ValueError, match="FixedPointCorrection"):
            FixedPointCorrection(**bad)


@pytest.mark.parametrize("name", ["deq_transformer_tiny", "deq_trellisnet_tiny", "mdeq_tiny"])
def test_model_configs_supervise_iterates_in_training_only(name):
    torch.manual_seed(0)
    model = create_model(name, solve=dict(correction_steps=2))
    assert model.equilibrium.correction == FixedPointCorrection(steps=2)
    if name.startswith("mdeq"):
        x, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 4])
    else:
        x = torch.randint(0, 10, (2, 9))
        y = torch.randint(0, 10, (2, 9))
    _, _, sols = model(x)
    assert len(sols[0].trajectory) == 2
    for z in sols[0].trajectory:
        assert model.head_loss(z, y).shape == y.shape
    model.eval()
    assert model(x)[2][0].trajectory == ()


def test_training_with_correction_logs_its_loss(tmp_path):
    import csv
    from pathlib import Path

    from deepeq.train import load_config, train

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/copy_memory_tiny.toml",
                      ["--steps=2", "--model.overrides.solve.correction_steps=2", f"--out_dir={tmp_path}"])  # fmt: skip
    train(cfg, progress=False)
    with (tmp_path / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert all(float(r["fpc_loss"]) > 0 for r in rows)
    assert all(float(r["loss"]) > float(r["task_loss"]) for r in rows)
    assert deepeq.FixedPointCorrection is FixedPointCorrection  # exported at the top level


def test_position_sampling_supervises_a_fresh_subset_per_iterate():
    """correction_positions < 1: each iterate's loss is the mean NLL over ceil(p T) positions,
    drawn afresh per iterate, and the output head sees only those positions."""
    from deepeq.train.step import correction_loss

    torch.manual_seed(0)
    model = create_model(
        "deq_transformer_tiny", solve=dict(correction_steps=2, correction_positions=0.25)
    )
    assert model.equilibrium.correction.positions == 0.25
    x, y = torch.randint(0, 10, (2, 9)), torch.randint(0, 10, (2, 9))
    _, _, sols = model(x)
    seen = []
    hook = model.head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    torch.manual_seed(5)
    got = correction_loss(model, sols, y)
    hook.remove()
    assert seen == [3, 3]  # ceil(0.25 * 9) positions per iterate, not 9
    torch.manual_seed(5)
    fpc = model.equilibrium.correction
    parts = []
    for z in sols[0].trajectory:
        idx = torch.randperm(9)[:3].sort().values
        parts.append(model.head_loss(z, y)[:, idx].mean())
    want = fpc.gamma**2 * parts[0] + fpc.gamma * parts[1]
    torch.testing.assert_close(got, want)
    # all positions: the plain mean, and the sampler says so
    assert FixedPointCorrection(steps=1).sample(9) is None
    with pytest.raises(ValueError, match="positions"):
        FixedPointCorrection(steps=1, positions=0.0)
