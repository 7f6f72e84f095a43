"""Jacobian regularisation on the 1D synthetic task (Bai et al. 2021, §A.1, Fig. 5, Table 4).

    python -m deepeq.experiments.synthetic1d [--out runs/synthetic1d] [--smoke]

Data: 5,096 pairs ``y = 1.5x³ + x² + 5x + 2 sin(x) - 3 + δ``, ``δ ~ N(0, 0.05²)``, x uniform on
[-2, 2]; 4,096 train / 1,000 validation. Model: scalar state z, ``f(z; x) = W₂ ReLU(W₁ z + U x + b₁)
+ b₂`` (a 2-layer ReLU block of width 50 with input injection), ``z*(x) ≈ y``. Training: Adam
1e-3, cosine schedule, 50 epochs, batch 64, forward Broyden with NFE ≤ 6 and relative ε 1e-3,
implicit backward with NFE ≤ 6 and ε 1e-4, Jacobian penalty ``γ ||J_f||_F² / d`` on a random 40%
of steps, γ ∈ {0, 1, 2, 4}. Evaluation on the validation set with a cap of 50 steps: MSE, mean
NFE to reach a relative residual of 1e-3, mean ``||J_f||_F`` and spectral radius at z*.

Writes ``results.json``, ``table.md`` and ``synthetic1d.png`` (per γ: the learned equilibrium
over the target curve, and the surface ``z_out = f(z; x)`` against the plane ``z_out = z``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

import deepeq


@dataclass(frozen=True, kw_only=True)
class Config:
    n_train: int = 4096
    n_val: int = 1000
    noise_std: float = 0.05  # δ ~ N(0, 0.05²): the paper's N(0, 0.05) read as a std
    x_low: float = -2.0  # range of the paper's Fig. 9
    x_high: float = 2.0
    width: int = 50
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    fwd_max_steps: int = 5  # NFE = 1 + steps = 6 (Table 4: NFE 6)
    bwd_max_steps: int = 5
    fwd_rtol: float = 1e-3
    bwd_rtol: float = 1e-4
    gammas: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    jac_probability: float = 0.4
    eval_rtol: float = 1e-3
    eval_max_steps: int = 50
    seed: int = 0
    # Not in the seed: fit (y - mean) / std instead of y, which makes the task loss ~100x
    # smaller relative to the Jacobian penalty (analysis option; MSE is reported in y units).
    normalize_targets: bool = False


SMOKE = dict(n_train=256, n_val=64, epochs=2, gammas=(0.0, 2.0))


def target(x: Tensor) -> Tensor:
    return 1.5 * x**3 + x**2 + 5 * x + 2 * torch.sin(x) - 3


def make_data(cfg: Config) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n_train + cfg.n_val
    x = cfg.x_low + (cfg.x_high - cfg.x_low) * torch.rand(n, 1, generator=g)
    y = target(x) + cfg.noise_std * torch.randn(n, 1, generator=g)
    return x[: cfg.n_train], y[: cfg.n_train], x[cfg.n_train :], y[cfg.n_train :]


class ReLUBlock(nn.Module):
    """f(z; x) = W₂ ReLU(W₁ z + U x + b₁) + b₂ with scalar z and x."""

    def __init__(self, width: int):
        super().__init__()
        self.inp = nn.Linear(1, width)  # U x + b₁ (input injection)
        self.hid = nn.Linear(1, width, bias=False)  # W₁ z
        self.out = nn.Linear(width, 1)  # W₂ h + b₂

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.hid(z) + self.inp(x)))


def equilibrium_jacobian(f: nn.Module, x: Tensor, z: Tensor) -> Tensor:
    """|∂f/∂z| at (z, x) per sample (z is scalar, so ||J||_F = spectral radius = |J|)."""
    zl = z.detach().requires_grad_()
    with torch.enable_grad():
        fz = f(zl, x)
        (j,) = torch.autograd.grad(fz, zl, torch.ones_like(fz))
    return j.abs().squeeze(1)


def train_one(cfg: Config, gamma: float, data, log_every: int = 0) -> dict:
    x_tr, y_tr, x_va, y_va = data
    mu, sd = (y_tr.mean(), y_tr.std()) if cfg.normalize_targets else (0.0, 1.0)
    y_tr, y_va = (y_tr - mu) / sd, (y_va - mu) / sd
    torch.manual_seed(cfg.seed)
    f = ReLUBlock(cfg.width)
    deq = deepeq.DEQ(
        f,
        solver=deepeq.Broyden(rtol=cfg.fwd_rtol, max_steps=cfg.fwd_max_steps),
        backward=deepeq.ImplicitBackward(
            solver=deepeq.Broyden(rtol=cfg.bwd_rtol, max_steps=cfg.bwd_max_steps)
        ),
        eval_solver=deepeq.Broyden(rtol=cfg.eval_rtol, max_steps=cfg.eval_max_steps),
        nonfinite="return",
    )
    opt = torch.optim.Adam(deq.parameters(), lr=cfg.lr)
    steps_per_epoch = math.ceil(cfg.n_train / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    jac = deepeq.JacobianSchedule(weight=gamma, probability=cfg.jac_probability, seed=cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    step, skipped, fwd_nfe, bwd_nfe, t0 = 0, 0, 0.0, 0.0, time.perf_counter()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(cfg.n_train, generator=g)
        for i in range(0, cfg.n_train, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            z, sol = deq(x_tr[idx])
            loss = nn.functional.mse_loss(z, y_tr[idx])
            w = jac(step)
            if w > 0:
                loss = loss + w * deepeq.jacobian_penalty(sol.fz, sol.z_leaf)
            if not torch.isfinite(loss):
                skipped += 1
                step += 1
                sched.step()
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            fwd_nfe += sol.stats.nfe
            bwd_nfe += sol.backward.nfe or 0
            step += 1
        if log_every and (epoch + 1) % log_every == 0:
            print(
                f"  gamma={gamma:g} epoch {epoch + 1}/{cfg.epochs} loss {loss.item():.4f}",
                flush=True,
            )
    train_time = time.perf_counter() - t0
    deq.eval()
    with torch.no_grad():
        z, sol = deq(x_va)
    jn = equilibrium_jacobian(f, x_va, z)
    return dict(
        gamma=gamma,
        val_mse=(sd**2 * nn.functional.mse_loss(z, y_va)).item(),  # in units of y
        eval_nfe=(sol.stats.num_steps.float() + 1).mean().item(),
        eval_converged=sol.stats.converged.float().mean().item(),
        jac_fro=jn.mean().item(),
        spectral_radius=jn.mean().item(),
        train_fwd_nfe=fwd_nfe / max(1, step - skipped),
        train_bwd_nfe=bwd_nfe / max(1, step - skipped),
        skipped_steps=skipped,
        train_seconds=train_time,
        model=deq,
        target_scale=(float(mu), float(sd)),
    )


def table(results: list[dict]) -> str:
    rows = [
        "| γ | val MSE | eval NFE to rel. residual 1e-3 (cap 50) | converged | mean ‖J_f‖_F at z* | mean spectral radius | train fwd/bwd NFE | skipped steps | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['gamma']:g} | {r['val_mse']:.4f} | {r['eval_nfe']:.2f} | {100 * r['eval_converged']:.1f}% | "
            f"{r['jac_fro']:.3f} | {r['spectral_radius']:.3f} | {r['train_fwd_nfe']:.2f} / {r['train_bwd_nfe']:.2f} | "
            f"{r['skipped_steps']} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(rows)


def plot(results: list[dict], data, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_tr, y_tr, _, _ = data
    n = len(results)
    zlim = (-25, 25) if results[0]["target_scale"] == (0.0, 1.0) else (-3, 3)
    fig = plt.figure(figsize=(4.2 * n, 8.4))
    xs = torch.linspace(-2, 2, 200).unsqueeze(1)
    for c, r in enumerate(results):
        deq = r["model"]
        mu, sd = r["target_scale"]
        with torch.no_grad():
            z, _ = deq(xs)
        ax = fig.add_subplot(2, n, c + 1)
        ax.scatter(x_tr[:400, 0], y_tr[:400, 0], s=2, c="0.7", label="data")
        ax.plot(xs[:, 0], target(xs)[:, 0], c="0.3", lw=2, label="h(x)")
        ax.plot(
            xs[:, 0], mu + sd * z[:, 0], "r--", lw=1.5, label="z*(x)" if sd == 1 else "μ + σ z*(x)"
        )
        ax.set_title(f"γ = {r['gamma']:g}: val MSE {r['val_mse']:.3f}, NFE {r['eval_nfe']:.1f}")
        ax.set_xlabel("x")
        if c == 0:
            ax.set_ylabel("z*")
            ax.legend(loc="upper left", fontsize=8)
        ax3 = fig.add_subplot(2, n, n + c + 1, projection="3d")
        gx, gz = torch.meshgrid(torch.linspace(-2, 2, 40), torch.linspace(*zlim, 40), indexing="ij")
        with torch.no_grad():
            fz = deq.f(gz.reshape(-1, 1), gx.reshape(-1, 1)).reshape(40, 40)
        ax3.plot_surface(gx.numpy(), gz.numpy(), fz.numpy(), cmap="viridis", alpha=0.8, linewidth=0)
        ax3.plot_surface(gx.numpy(), gz.numpy(), gz.numpy(), color="0.6", alpha=0.35, linewidth=0)
        ax3.plot(xs[:, 0].numpy(), z[:, 0].numpy(), z[:, 0].numpy(), "r--", lw=1.5)
        ax3.set_xlabel("x")
        ax3.set_ylabel("z")
        ax3.set_zlabel("f(z; x)")
        ax3.set_title(f"mean |∂f/∂z| at z* = {r['jac_fro']:.2f}", fontsize=9)
    fig.suptitle(
        "1D synthetic task: learned equilibria (top) and f(z; x) against the plane z_out = z (bottom)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/synthetic1d", help="output directory")
    p.add_argument("--smoke", action="store_true", help="tiny configuration (seconds)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--gammas", help="comma-separated, e.g. 0,1,2,4")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--normalize-targets",
        action="store_true",
        help="fit standardised y (analysis, not in the seed)",
    )
    args = p.parse_args(argv)
    cfg = Config(**SMOKE) if args.smoke else Config()
    if args.epochs is not None:
        cfg = replace(cfg, epochs=args.epochs)
    if args.gammas:
        cfg = replace(cfg, gammas=tuple(float(v) for v in args.gammas.split(",")))
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    if args.normalize_targets:
        cfg = replace(cfg, normalize_targets=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = make_data(cfg)
    print(
        f"synthetic1d: {cfg.n_train} train / {cfg.n_val} val, epochs {cfg.epochs}, gammas {cfg.gammas}"
    )
    results = []
    for gamma in cfg.gammas:
        r = train_one(cfg, gamma, data, log_every=max(1, cfg.epochs // 5))
        results.append(r)
        print(
            f"  gamma={gamma:g}: val MSE {r['val_mse']:.4f}, eval NFE {r['eval_nfe']:.2f}, |J| {r['jac_fro']:.3f}",
            flush=True,
        )
    md = table(results)
    print(md)
    (out / "table.md").write_text(md + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "results": [{k: v for k, v in r.items() if k != "model"} for r in results],
            },
            indent=2,
        )
    )
    if not args.no_plot:
        plot(results, data, out / "synthetic1d.png")
        print(f"wrote {out / 'synthetic1d.png'}")
    return results


if __name__ == "__main__":
    main()
