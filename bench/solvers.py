"""Solver benchmark: deepeq vs torchdeq 0.1.0 on the same problems, tolerances and caps, in one run.

    .venv/bin/python bench/solvers.py [--repeats 5] [--device cpu|cuda] [--problems linear0.5,attention]

For every problem x solver it prints NFE (calls of f, counted by a wrapper for both libraries),
per-sample evaluations, the final max relative residual ||f(z)-z||/||f(z)|| of the RETURNED value
(recomputed here, identically for both), whether that meets the tolerance, the median wall time,
the solver buffer bytes, and deepeq's time as a fraction of torchdeq's (lower is better).
torchdeq is the optional `bench` extra (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

import deepeq
from deepeq._demo import make_layer

try:
    from torchdeq.solver import get_solver as tdq_get_solver
except ImportError:  # pragma: no cover - optional
    tdq_get_solver = None


def linear(rho, device, B=8, D=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    A = ((q * torch.linspace(-rho, rho, D, dtype=torch.float64)) @ q.T).float().to(device)
    x = torch.randn(B, D, generator=g)
    return (lambda z, x: z @ A.T + x), x, torch.zeros_like(x)


def tanh_mlp(device, B=8, D=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g)
    W = (0.9 * W / torch.linalg.matrix_norm(W, 2)).to(device)
    x = torch.randn(B, D, generator=g)
    return (lambda z, x: torch.tanh(z @ W.T + x)), x, torch.zeros_like(x)


def mixed_mlp(device, B=32, D=1024, seed=0):
    """Per-sample difficulty: f(z, x) = tanh(s_b * W2 relu(W1 z) + u_b), s_b from 0.3 to 3.0
    (stored in x's last column), so easy samples converge long before hard ones."""
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(D, D, generator=g) / D**0.5
    W2 = torch.randn(D, D, generator=g)
    W2 = (W2 / torch.linalg.matrix_norm(W2 @ W1, 2)).to(device)
    W1 = W1.to(device)
    u = torch.randn(B, D, generator=g)
    scale = torch.linspace(0.3, 3.0, B).unsqueeze(1)
    x = torch.cat([u, scale], dim=1)

    def f(z, x):
        return torch.tanh(x[:, -1:] * (torch.relu(z @ W1.T) @ W2.T) + x[:, :-1])

    return f, x, torch.zeros(B, D)


def layer(kind, device):
    mod, x = make_layer(kind, batch=8)
    return mod, x, torch.zeros_like(x)


# name -> (builder, tolerance (relative), max_steps)
PROBLEMS = {
    "linear0.5": (lambda d: linear(0.5, d), 1e-4, 100),
    "linear0.9": (lambda d: linear(0.9, d), 1e-4, 100),
    "linear0.99": (lambda d: linear(0.99, d), 1e-4, 100),
    "tanh_mlp": (tanh_mlp, 1e-4, 100),
    "mixed_mlp": (mixed_mlp, 1e-4, 100),
    "attention": (lambda d: layer("attention", d), 1e-3, 40),
    "conv": (lambda d: layer("conv", d), 1e-3, 40),
}


class Counter:
    def __init__(self, f):
        self.f, self.calls, self.rows = f, 0, 0

    def __call__(self, z, *a):
        self.calls += 1
        self.rows += z.shape[0]
        return self.f(z, *a)


def deepeq_run(name, f, x, z0, tol, steps):
    solver = {
        "picard": deepeq.Picard(rtol=tol, max_steps=steps),
        "anderson": deepeq.Anderson(rtol=tol, max_steps=steps, history_length=5, ridge=1e-4),
        "broyden": deepeq.Broyden(rtol=tol, max_steps=steps, history_length=20),
    }[name]
    c = Counter(f)
    sol = deepeq.fixed_point(c, z0, solver, args=(x,), nonfinite="return")
    return sol.value, c, sol.stats.buffer_bytes


def torchdeq_run(name, f, x, z0, tol, steps):
    key, kw = {
        "picard": ("fixed_point_iter", {"tau": 1.0}),
        "anderson": ("anderson", {"m": 5, "lam": 1e-4, "tau": 1.0}),
        "broyden": ("broyden", {}),
    }[name]
    c = Counter(f)
    z, _, _ = tdq_get_solver(key)(
        lambda z: c(z, x), z0, max_iter=steps, tol=tol, stop_mode="rel", **kw
    )
    B, D = z0.shape[0], z0[0].numel()
    el = z0.element_size()
    buf = {"picard": 0, "anderson": 2 * B * 5 * D * el, "broyden": 2 * B * D * steps * el}[name]
    return z, c, buf


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(run, name, f, x, z0, tol, steps, repeats, device):
    run(name, f, x, z0, tol, steps)  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        z, c, buf = run(name, f, x, z0, tol, steps)
        sync(device)
        times.append(time.perf_counter() - t0)
    fz = f(z, x)
    rel = ((fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)).max().item()
    return dict(ms=1e3 * statistics.median(times), nfe=c.calls, rows=c.rows, rel=rel, buf=buf)


def per_step(device, repeats, steps=100):
    """Microseconds per solver step with every step forced (tolerance 0), f = linear0.99."""
    f, x, z0 = linear(0.99, device)
    x, z0 = x.to(device), z0.to(device)
    print(f"# per-step cost, linear0.99 (B=8, D=256), {steps} forced steps, device {device}")
    print("| solver | deepeq us/step | torchdeq us/step | ratio |")
    print("|---|---|---|---|")
    with torch.no_grad():
        for name in ("picard", "anderson", "broyden"):
            us = {}
            for lib, run in (("deepeq", deepeq_run), ("torchdeq", torchdeq_run)):
                run(name, f, x, z0, 0.0, steps)
                times = []
                for _ in range(repeats):
                    sync(device)
                    t0 = time.perf_counter()
                    run(name, f, x, z0, 0.0, steps)
                    sync(device)
                    times.append(time.perf_counter() - t0)
                us[lib] = 1e6 * statistics.median(times) / steps
            print(
                f"| {name} | {us['deepeq']:.0f} | {us['torchdeq']:.0f} | {us['deepeq'] / us['torchdeq']:.2f} |"
            )


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--problems", default=",".join(PROBLEMS))
    p.add_argument(
        "--per-step",
        action="store_true",
        help="only the per-step cost on linear0.99 (100 forced steps)",
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.per_step:
        return per_step(device, args.repeats)
    libs = [("deepeq", deepeq_run)] + ([("torchdeq", torchdeq_run)] if tdq_get_solver else [])
    dev_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"# bench/solvers.py  torch {torch.__version__}  device {device} ({dev_name})  threads {torch.get_num_threads()}  repeats {args.repeats}"
    )
    if tdq_get_solver is None:
        print("# torchdeq not installed: deepeq rows only (pip install -e .[bench])")
    print(
        "| problem | solver | library | NFE | sample evals | max rel residual | tol met | ms (median) | buffers KiB | time deepeq/torchdeq |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for prob in args.problems.split(","):
            build, tol, steps = PROBLEMS[prob]
            f, x, z0 = build(device)
            if isinstance(f, torch.nn.Module):
                f = f.to(device)
            x, z0 = x.to(device), z0.to(device)
            for name in ("picard", "anderson", "broyden"):
                res = {
                    lib: measure(run, name, f, x, z0, tol, steps, args.repeats, device)
                    for lib, run in libs
                }
                for lib, r in res.items():
                    ratio = (
                        f"{res['deepeq']['ms'] / res['torchdeq']['ms']:.2f}"
                        if lib == "deepeq" and "torchdeq" in res
                        else ""
                    )
                    print(
                        f"| {prob} (tol {tol:g}, cap {steps}) | {name} | {lib} | {r['nfe']} | {r['rows']} | "
                        f"{r['rel']:.2e} | {'yes' if r['rel'] <= tol else 'NO'} | {r['ms']:.2f} | "
                        f"{r['buf'] / 1024:.0f} | {ratio} |"
                    )
                sys.stdout.flush()


if __name__ == "__main__":
    main()
