"""Per-step cost of the solve driver, against an older tree of deepeq, interleaved in one run.

    git worktree add /tmp/deepeq_base <rev>
    .venv/bin/python bench/driver.py --baseline /tmp/deepeq_base [--rounds 30] [--threads 1]

f is cheap here (the driver's own tensor operations and Python dominate), so the table shows
what the loop around f costs per solver step: microseconds per call of f (median over rounds)
for the current tree and the baseline, and the median over rounds of their time ratio. Both trees solve the same problems in
the same process, alternating round by round, so load on the machine hits both alike; the
NFE columns must agree (a refactor that changes them changed the algorithm). Cases:

* ``forced``: linear map with spectral radius 0.99 (B 8, D 256), tolerance 0: every step runs.
* ``stops``: per-sample difficulty (B 32, D 256), rtol 1e-5: samples stop at different steps,
  so compaction and the best-iterate bookkeeping run.
* ``causal``: a causal map over (B 4, T 32, D 32) positions, rtol 1e-5, ``causal=True``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

import deepeq


def load_baseline(root: Path):
    """The ``deepeq`` package under ``root`` imported as ``deepeq_baseline``."""
    pkg = root / "deepeq"
    if not (pkg / "__init__.py").exists():
        raise SystemExit(f"--baseline {root}: no deepeq/__init__.py there (a checkout of deepeq).")
    spec = importlib.util.spec_from_file_location(
        "deepeq_baseline", pkg / "__init__.py", submodule_search_locations=[str(pkg)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["deepeq_baseline"] = mod
    spec.loader.exec_module(mod)
    return mod


def problems():
    g = torch.Generator().manual_seed(0)
    D = 256
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    A = ((q * torch.linspace(-0.99, 0.99, D, dtype=torch.float64)) @ q.T).float()
    x = torch.randn(8, D, generator=g)

    W = torch.randn(D, D, generator=g)
    W = W / torch.linalg.matrix_norm(W, 2)
    u = torch.cat(
        [0.1 * torch.randn(32, D, generator=g), torch.linspace(0.5, 0.98, 32)[:, None]], 1
    )

    T, d = 32, 32
    Wc = torch.randn(d, d, generator=g) / d**0.5 * 0.9
    mask = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1).unsqueeze(1)
    xc = torch.randn(4, T, d, generator=g)

    def causal_f(z, x):
        return torch.tanh(torch.einsum("ts,bsd->btd", mask, z) @ Wc.T + x)

    return {
        # name: (f, x, z0, solver hyper-parameters, fixed_point options)
        "forced": (
            lambda z, x: z @ A.T + x,
            x,
            torch.zeros_like(x),
            dict(rtol=0.0, atol=0.0, max_steps=100),
            {},
        ),
        "stops": (
            lambda z, x: torch.tanh(x[:, -1:] * (z @ W.T) + x[:, :-1]),
            u,
            torch.zeros(32, D),
            dict(rtol=1e-5, max_steps=100),
            {},
        ),
        "causal": (
            causal_f,
            xc,
            torch.zeros_like(xc),
            dict(rtol=1e-5, max_steps=100),
            dict(causal=True),
        ),
    }


def run_once(lib, solver, case):
    f, x, z0, kw, extra = case
    s = lib.make_solver(solver, **kw)
    t0 = time.perf_counter()
    out = lib.fixed_point(f, z0, solver=s, args=(x,), **extra)
    return time.perf_counter() - t0, out.stats.nfe


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--baseline", type=Path, required=True, help="root of an older deepeq tree")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_baseline(args.baseline)
    libs = {"current": deepeq, "baseline": base}
    cases = problems()
    rows = [
        (c, s)
        for c in cases
        for s in (("picard", "anderson", "broyden") if c != "causal" else ("picard", "anderson"))
    ]
    times = {(r, lib): [] for r in rows for lib in libs}
    nfe = {}
    with torch.no_grad():
        for _ in range(2):  # warm-up
            for c, s in rows:
                for lib in libs.values():
                    run_once(lib, s, cases[c])
        for _ in range(args.rounds):
            for c, s in rows:
                for name, lib in libs.items():
                    dt, n = run_once(lib, s, cases[c])
                    times[(c, s), name].append(dt)
                    nfe[(c, s), name] = n
    print(
        f"# bench/driver.py --baseline {args.baseline}  torch {torch.__version__}  "
        f"threads {args.threads}  rounds {args.rounds}"
    )
    print(
        "| case | solver | NFE current / baseline | us per f call: current | baseline | "
        "ratio (median of rounds) |"
    )
    print("|---|---|---|---|---|---|")
    for c, s in rows:
        us = {
            name: 1e6 * statistics.median(times[(c, s), name]) / nfe[(c, s), name] for name in libs
        }
        ratio = statistics.median(
            a / b for a, b in zip(times[(c, s), "current"], times[(c, s), "baseline"], strict=True)
        )
        print(
            f"| {c} | {s} | {nfe[(c, s), 'current']} / {nfe[(c, s), 'baseline']} | "
            f"{us['current']:.0f} | {us['baseline']:.0f} | {ratio:.3f} |"
        )


if __name__ == "__main__":
    main()
