"""Universality constructions: Theorem 3 (weight-tied equivalent of any feed-forward network)
and Theorem 2 (two stacked DEQs equal one)."""

import pytest
import torch
from torch import nn

import deepeq
from deepeq.analysis import StackedEquilibrium, weight_tied_equivalent

F64 = torch.float64

ARCHS = [
    [nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)],
    [
        nn.Linear(4, 7),
        nn.Tanh(),
        nn.Linear(7, 3),
        nn.Sigmoid(),
        nn.Linear(3, 6),
        nn.GELU(),
        nn.Linear(6, 1),
    ],
    [nn.Linear(2, 2)],
    [
        nn.Linear(6, 9),
        nn.SiLU(),
        nn.Linear(9, 4, bias=False),
        nn.Linear(4, 8),
        nn.LeakyReLU(0.1),
        nn.Linear(8, 5),
        nn.ELU(),
    ],
]


@pytest.mark.parametrize("arch", range(len(ARCHS)))
def test_theorem3_exact(arch):
    torch.manual_seed(arch)
    net = nn.Sequential(*ARCHS[arch]).double()
    f = weight_tied_equivalent(net)
    x = torch.randn(5, net[0].in_features, dtype=F64)
    z = f.init_state(x)
    for _ in range(f.depth):
        z = f(z, x)
    torch.testing.assert_close(f.output(z), net(x), atol=1e-13, rtol=0)
    # ... and it is the layer's fixed point, which a DEQ finds:
    torch.testing.assert_close(f(z, x), z, atol=1e-13, rtol=0)
    zd, sol = deepeq.DEQ(f, solver=deepeq.Picard(atol=1e-13, rtol=0.0, max_steps=50))(x)
    assert sol.stats.num_steps.max() <= f.depth
    torch.testing.assert_close(f.output(zd), net(x), atol=1e-13, rtol=0)


def test_theorem3_errors():
    with pytest.raises(TypeError, match="Conv1d"):
        weight_tied_equivalent([nn.Linear(2, 2), nn.Conv1d(1, 1, 1)])
    with pytest.raises(TypeError, match="directly follow"):
        weight_tied_equivalent([nn.ReLU(), nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="do not chain"):
        weight_tied_equivalent([nn.Linear(2, 3), nn.Linear(4, 1)])


class Inj(nn.Module):
    def __init__(self, d, p, scale):
        super().__init__()
        self.A = nn.Linear(d, d, bias=False)
        self.U = nn.Linear(p, d)
        with torch.no_grad():
            self.A.weight.mul_(scale / torch.linalg.matrix_norm(self.A.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.A(z) + self.U(x))


def test_theorem2_values_and_gradients():
    torch.manual_seed(0)
    f1, f2 = Inj(5, 3, 0.6).double(), Inj(4, 5, 0.7).double()
    tight = deepeq.Broyden(atol=1e-13, rtol=0.0, max_steps=200)
    back = deepeq.ImplicitBackward(solver=deepeq.Broyden(atol=1e-13, rtol=0.0, max_steps=200))
    x = torch.randn(6, 3, dtype=F64, requires_grad=True)
    c = torch.randn(6, 4, dtype=F64)
    # two stacked DEQs
    z1, _ = deepeq.DEQ(f1, solver=tight, backward=back)(x, z0=torch.zeros(6, 5, dtype=F64))
    z2, _ = deepeq.DEQ(f2, solver=tight, backward=back)(z1, z0=torch.zeros(6, 4, dtype=F64))
    params = [x, *f1.parameters(), *f2.parameters()]
    g_stack = torch.autograd.grad((z2 * c).sum(), params)
    # one DEQ over the concatenated state
    w, _sol = deepeq.DEQ(StackedEquilibrium(f1, f2), solver=tight, backward=back)(
        x, z0=(torch.zeros(6, 5, dtype=F64), torch.zeros(6, 4, dtype=F64))
    )
    torch.testing.assert_close(w[0], z1, atol=1e-11, rtol=0)
    torch.testing.assert_close(w[1], z2, atol=1e-11, rtol=0)
    g_one = torch.autograd.grad((w[1] * c).sum(), params)
    for a, b in zip(g_one, g_stack, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_convergence_command(tmp_path, capsys):
    import csv

    from deepeq.__main__ import main

    assert (
        main(
            [
                "analyze",
                "convergence",
                "--model",
                "deq_trellisnet_tiny",
                "--lengths",
                "8,16",
                "--layers",
                "12",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((tmp_path / "convergence.csv").read_text().splitlines()))
    assert len(rows) == 24 and (tmp_path / "convergence.png").stat().st_size > 5000
    for T in ("8", "16"):
        r = [float(x["stack_rel_residual"]) for x in rows if x["length"] == T]
        assert r[-1] < 0.1 * r[1]  # the stack's residual decreases for this contractive f
    assert main(["analyze", "convergence", "--model", "lstm_tiny", "--out", str(tmp_path)]) == 2
    assert "not a DEQ sequence or image model" in capsys.readouterr().err


def test_convergence_command_on_an_image_model(tmp_path):
    """MDEQ: the stack and Broyden run on image inputs with the tuple (multiscale) state."""
    import csv

    from deepeq.__main__ import main

    out = tmp_path / "an"
    assert (
        main(
            ["analyze", "convergence", "--model", "mdeq_tiny", "--layers", "12", "--out", str(out)]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "convergence.csv").read_text().splitlines()))
    assert len(rows) == 12 and {r["length"] for r in rows} == {"28"}
    stack = [float(r["stack_rel_residual"]) for r in rows]
    broyden = [float(r["broyden_rel_residual"]) for r in rows]
    assert stack[-1] < 0.1 * stack[0]  # contractive at initialisation (small f weights)
    assert broyden[-1] < stack[-1]


def test_metric_vs_nfe_command(tmp_path, capsys):
    import csv
    from pathlib import Path

    from deepeq.__main__ import main

    cfg = str(Path(__file__).resolve().parents[1] / "configs/copy_memory_tiny.toml")
    small = [
        "--steps=2",
        "--data.seq_len=10",
        "--data.n_train=32",
        "--data.n_test=16",
        "--batch_size=8",
        "--no-progress",
    ]
    for name in ("a", "b"):
        assert main(["train", cfg, *small, f"--out_dir={tmp_path / name}"]) == 0
    assert (
        main(
            [
                "analyze",
                "nfe",
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--max-steps",
                "1,4",
                "--out",
                str(tmp_path / "an"),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((tmp_path / "an/metric_vs_nfe.csv").read_text().splitlines()))
    assert len(rows) == 4 and (tmp_path / "an/metric_vs_nfe.png").exists()
    nfe = {(Path(r["run"]).name, int(r["max_steps"])): float(r["mean_nfe"]) for r in rows}
    assert nfe[("a", 1)] <= 2 < nfe[("a", 4)] <= 5  # the cap bounds the NFE (1 + steps)


def test_gradient_accuracy_command(tmp_path, capsys):
    import csv
    from pathlib import Path

    from deepeq.__main__ import main

    cfg = str(Path(__file__).resolve().parents[1] / "configs/copy_memory_tiny.toml")
    run = tmp_path / "run"
    args = ["--steps=2", "--data.seq_len=10", "--data.n_train=32", "--data.n_test=16"]
    # converges to 1e-7 in float32 when trained 2 steps; whole-sequence solves, so that the
    # SHINE rows below may use Broyden (a causal solve cannot)
    args += ["--model.name=deq_trellisnet_tiny", "--model.overrides.solve.causal=false"]
    assert main(["train", cfg, *args, "--batch_size=8", "--no-progress", f"--out_dir={run}"]) == 0
    out = tmp_path / "an"
    assert (
        main(
            ["analyze", "gradient", str(run), "--caps", "1/1,40/40", "--step=1", "--out", str(out)]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "gradient_accuracy.csv").read_text().splitlines()))
    assert [r["f_cap"] for r in rows] == ["ref 200", "1", "40"]
    ref, crude, tight = rows
    assert float(ref["fwd_rel_residual"]) < 1e-6 and float(ref["bwd_rel_residual"]) < 1e-6
    # converged solves give the reference gradient up to the solver tolerances (1e-3 / 1e-4)...
    assert float(tight["cosine"]) > 0.9999 and float(tight["rel_error"]) < 0.01
    # ... one-step solves do not
    assert float(crude["rel_error"]) > 10 * float(tight["rel_error"])
    assert int(crude["fwd_nfe"]) <= 2 and int(crude["bwd_nfe"]) <= 2
    assert (out / "gradient_accuracy.png").exists() and "| 40/40 |" in capsys.readouterr().out
    assert main(["analyze", "gradient", str(run), "--caps", "8-4"]) == 2  # clear error, exit 2
    # No backward iterations (cap 0) from the Broyden forward solver's inverse estimate (SHINE):
    # no vector-Jacobian product, an approximate gradient; refined by 40 steps it is exact again.
    cmd = ["analyze", "gradient", str(run), "--caps", "40/0,40/40", "--step=1", "--out", str(out)]
    assert main([*cmd, "--b-init", "shine"]) == 2  # the run's Anderson keeps no estimate
    assert main([*cmd, "--b-init", "shine", "--solver", "broyden"]) == 0
    rows = list(csv.DictReader((out / "gradient_accuracy.csv").read_text().splitlines()))
    ref, shine, refined = rows
    assert [r["b_init"] for r in rows] == ["v", "shine", "shine"]
    assert shine["bwd_nfe"] == "0" and shine["bwd_rel_residual"] == "nan"
    assert float(ref["fwd_rel_residual"]) < 1e-6 and float(ref["bwd_rel_residual"]) < 1e-6
    assert float(refined["rel_error"]) < 0.01 < float(shine["rel_error"])
