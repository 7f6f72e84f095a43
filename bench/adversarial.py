"""Adversarial solves: does the engine ever report a convergence it has not earned? (not a test)

    .venv/bin/python bench/adversarial.py [--seeds 100]

Prints one row per corner with the number of solves/samples tried and the number of dishonest
reports, each checked against an independent evaluation of f at the returned value (float64
where the solve ran in float64, float32 for the low-precision rows):

* ``coupled line search``: ``independent=False`` batches (every sample's f reads the batch
  mean), ``Broyden(line_search=True)``, rtol 1e-6, maps from contractive to strongly
  non-contractive. Dishonest: a reported residual that is not the one of the returned batch
  (relative difference > 1e-6), a sample flagged converged above rtol, a solve reported
  ``CONVERGED`` with a sample above rtol.
* ``bf16 / fp16 iterations``: Picard with ``solve_dtype``, rtol 1e-4, random contractive tanh
  maps (B 64, D 32). Dishonest: a sample flagged converged whose float32 residual is above rtol.
* ``causal, atol > 0``: causal Anderson with atol = rtol = 1e-3. Dishonest: a converged sample
  whose reported ``abs_residual`` exceeds ``atol + rtol * max_t ||f_t||`` (the per-position rule's
  bound), or a flag that disagrees with the per-position rule.
* ``no fixed point``: ``f(z) = z + c`` under every solver (float32 and float64). Dishonest: any
  sample flagged converged.

Run it against another tree with ``PYTHONPATH=/path/to/tree`` to compare.
"""

from __future__ import annotations

import argparse

import torch

import deepeq
from deepeq import Anderson, Broyden, Picard, fixed_point


def coupled(seeds: int) -> tuple[int, int, int, int]:
    rtol, n, mismatched, false_conv, false_status = 1e-6, 0, 0, 0, 0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        scale = (0.6, 1.0, 1.5, 2.5)[seed % 4]
        W = scale * torch.randn(5, 5, generator=g, dtype=torch.float64) / 5**0.5
        x = torch.randn(6, 5, generator=g, dtype=torch.float64)

        def f(z, W=W, x=x):
            return torch.tanh(z @ W.T + x + 0.5 * z.mean(0, keepdim=True))

        sol = fixed_point(f, torch.zeros_like(x), Broyden(rtol=rtol, max_steps=40,
                          line_search=True), independent=False)  # fmt: skip
        fz = f(sol.value)
        res, fn = (fz - sol.value).norm(dim=1), fz.norm(dim=1)
        above = res > rtol * fn * (1 + 1e-9)
        n += len(res)
        mismatched += int((~torch.isclose(sol.stats.abs_residual, res, rtol=1e-6)).sum())
        false_conv += int((sol.stats.converged & above).sum())
        false_status += int(sol.status is deepeq.Status.CONVERGED and bool(above.any()))
    return n, mismatched, false_conv, false_status


def low_precision(dtype: torch.dtype, seeds: int) -> tuple[int, int, int, float]:
    rtol, n, flagged, false_conv, worst = 1e-4, 0, 0, 0, 0.0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(32, 32, generator=g)
        W = (0.5 + 0.4 * torch.rand(1, generator=g)) * W / torch.linalg.matrix_norm(W, 2)
        x = torch.randn(64, 32, generator=g)

        def f(z, x, W=W):
            return torch.tanh(z @ W.T + x)

        sol = fixed_point(f, torch.zeros_like(x), Picard(rtol=rtol, max_steps=200), args=(x,),
                          solve_dtype=dtype)  # fmt: skip
        fz = f(sol.value, x)
        rel = (fz - sol.value).double().norm(dim=1) / fz.double().norm(dim=1)
        conv = sol.stats.converged
        n += len(rel)
        flagged += int(conv.sum())
        false_conv += int((conv & (rel > rtol * 1.0001)).sum())
        if bool(conv.any()):
            worst = max(worst, float(rel[conv].max()) / rtol)
    return n, flagged, false_conv, worst


def causal(seeds: int) -> tuple[int, int, int]:
    atol = rtol = 1e-3
    n, converged, dishonest = 0, 0, 0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        d = 6
        W = 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
        U = 0.9 * torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
        x = torch.randn(4, 24, d, generator=g, dtype=torch.float64)

        def f(z, x, W=W, U=U):
            T = z.shape[1]
            mean = z.cumsum(1) / torch.arange(1, T + 1, dtype=z.dtype).view(1, T, 1)
            return torch.tanh(z @ W.T + mean @ U.T + x)

        sol = fixed_point(f, torch.zeros_like(x), Anderson(atol=atol, rtol=rtol, max_steps=40),
                          args=(x,), causal=True)  # fmt: skip
        fz = f(sol.value, x)
        res_t, f_t = (fz - sol.value).norm(dim=2), fz.norm(dim=2)
        rule = (res_t <= atol + rtol * f_t).all(1)
        conv = sol.stats.converged
        n += len(conv)
        converged += int(conv.sum())
        over = sol.stats.abs_residual > atol + rtol * f_t.amax(1)
        dishonest += int(((conv & over) | (conv != rule)).sum())
    return n, converged, dishonest


def runaway() -> tuple[int, int]:
    n, false_conv = 0, 0
    solvers = [Broyden(), Broyden(line_search=True), Anderson(), Picard(rtol=1e-2, max_steps=200),
               Picard(rtol=1e-3, max_steps=2000, damping=0.5)]  # fmt: skip
    for dtype in (torch.float32, torch.float64):
        for seed in range(5):
            c = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)
            for solver in solvers:
                sol = fixed_point(lambda z, c: z + c, torch.zeros_like(c), solver, args=(c,))
                n += len(c)
                false_conv += int(sol.stats.converged.sum())
    return n, false_conv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=100)
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"# bench/adversarial.py --seeds {a.seeds}  deepeq from {deepeq.__file__}")
    print("| corner | tried | dishonest reports |")
    print("|---|---|---|")
    n, mis, fc, fs = coupled(a.seeds)
    print(f"| coupled line search (Broyden, float64) | {n} samples in {a.seeds} solves | "
          f"{mis} residuals of another batch state; {fc} flagged converged above rtol; {fs} "
          f"solves CONVERGED with a sample above rtol |")  # fmt: skip
    for dtype in (torch.bfloat16, torch.float16):
        n, flagged, fc, worst = low_precision(dtype, max(1, a.seeds // 10))
        name = str(dtype).removeprefix("torch.")
        print(f"| {name} iterations, rtol 1e-4 (Picard) | {n} samples | {fc} of {flagged} flagged "
              f"converged above rtol in float32 (worst {worst:.1f}x rtol) |")  # fmt: skip
    n, conv, bad = causal(max(1, a.seeds // 10))
    print(f"| causal, atol = rtol = 1e-3 (Anderson) | {n} samples ({conv} converged) | {bad} "
          f"converged above the per-position bound or flagged against the rule |")  # fmt: skip
    n, fc = runaway()
    print(f"| f(z) = z + c, no fixed point (5 solvers, float32/64) | {n} samples | {fc} flagged "
          f"converged |")  # fmt: skip


if __name__ == "__main__":
    main()
