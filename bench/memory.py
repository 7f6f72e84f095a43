"""Memory benchmark: one training step (forward + backward) through a DEQ layer.

    .venv/bin/python bench/memory.py [--device cpu|cuda] [--layers attention,conv]

Rows: ImplicitBackward, PhantomBackward(k=5), UnrolledBackward (same solver), ReversibleBackward
(with its own solver, deepeq.Reversible(beta=0.5), same cap and tolerance), and explicit
weight-tied stacks of L = (implicit forward NFE) and L = 30 layers. For each: bytes autograd saves
for backward (saved_tensors_hooks, unique storages: deterministic), peak memory of the step
(peak RSS increase on CPU, peak CUDA allocation on GPU), wall time of the step, forward and
backward NFE. Every row runs in its own subprocess so that peak RSS belongs to that row alone.
Then the curve of saved bytes against max_steps (every step forced: tolerance 0).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

import deepeq
from deepeq._demo import make_layer
from deepeq.analysis import saved_bytes


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def run_row(layer_kind: str, mode: str, depth: int, device: str, steps: int, batch: int) -> dict:
    torch.manual_seed(0)
    layer, x = make_layer(layer_kind, batch=batch)
    layer.train().to(device)
    x = x.to(device)
    solver = (
        deepeq.Reversible(max_steps=steps)
        if mode == "reversible"
        else deepeq.Anderson(max_steps=steps)
    )
    backward = {
        "implicit": deepeq.ImplicitBackward(),
        "phantom5": deepeq.PhantomBackward(steps=5),
        "unrolled": deepeq.UnrolledBackward(),
        "reversible": deepeq.ReversibleBackward(),
    }.get(mode)

    def forward():
        if mode == "explicit":
            z = torch.zeros_like(x)
            for _ in range(depth):
                z = layer(z, x)
            return z, None
        sol = deepeq.fixed_point(layer, torch.zeros_like(x), solver, args=(x,), backward=backward)
        return sol.value, sol

    def step():
        layer.zero_grad(set_to_none=True)
        saved, (z, sol) = saved_bytes(forward)
        z.float().pow(2).mean().backward()
        return saved, sol

    if device == "cuda":
        # CUDA: warm up first (cuBLAS/cuSOLVER workspaces are one-time library allocations),
        # then the allocator's peak of a step is exact.
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        # CPU: peak RSS of the FIRST step (a warm-up would already have raised the lifetime
        # peak that getrusage reports).
        rss0 = current_rss_mib()
        step()
        peak = peak_rss_mib() - rss0
    t0 = time.perf_counter()  # the second step is timed
    saved, sol = step()
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    fwd_nfe = (
        depth
        if sol is None
        else sol.stats.nfe + (1 if mode in ("implicit", "phantom5", "reversible") else 0)
    )
    if mode == "phantom5":
        fwd_nfe += 4  # five differentiable steps, one of which is counted above
    bwd = sol.backward.nfe if sol is not None and sol.backward is not None else None
    return dict(
        layer=layer_kind,
        mode=mode,
        depth=depth,
        saved=saved,
        peak=peak,
        wall=wall,
        fwd_nfe=fwd_nfe,
        bwd_nfe=bwd,
    )


def subprocess_row(**kw) -> dict:
    cmd = [sys.executable, __file__, "--row", json.dumps(kw)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def curve(layer_kind: str, device: str, batch: int) -> list[str]:
    torch.manual_seed(0)
    layer, x = make_layer(layer_kind, batch=batch)
    layer.train().to(device)
    x = x.to(device)
    lines = []
    for steps in (10, 20, 50, 100):
        row = [f"| {layer_kind} | {steps} |"]
        for backward in (
            deepeq.ImplicitBackward(),
            deepeq.UnrolledBackward(),
            deepeq.ReversibleBackward(),
            deepeq.ReversibleBackward(checkpoint_every=None),
        ):
            # every step runs
            solver = (
                deepeq.Reversible(rtol=0.0, max_steps=steps, beta=0.5)
                if isinstance(backward, deepeq.ReversibleBackward)
                else deepeq.Picard(atol=0.0, rtol=0.0, max_steps=steps)
            )
            saved, _ = saved_bytes(
                lambda s=solver, b=backward: deepeq.fixed_point(
                    layer, torch.zeros_like(x), s, args=(x,), backward=b, nonfinite="return"
                )
            )
            row.append(f" {saved / 2**20:.2f} |")
        lines.append("".join(row))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", default="attention,conv")
    p.add_argument("--steps", type=int, default=30, help="forward max_steps (Anderson, rtol 1e-3)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--row", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.row:
        print(json.dumps(run_row(**json.loads(args.row))))
        return
    dev = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine()
    )
    unit = "peak CUDA alloc MiB" if args.device == "cuda" else "peak RSS increase MiB"
    print(
        f"# bench/memory.py  torch {torch.__version__}  device {args.device} ({dev})  threads {torch.get_num_threads()}  batch {args.batch}"
    )
    print(
        f"| layer | backward | depth L | saved for backward MiB | vs one layer | vs L=30 stack | {unit} | step ms | fwd NFE | bwd NFE |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.layers.split(","):
        common = dict(layer_kind=kind, device=args.device, steps=args.steps, batch=args.batch)
        one = subprocess_row(mode="explicit", depth=1, **common)
        imp = subprocess_row(mode="implicit", depth=0, **common)
        rows = [
            ("implicit", imp),
            ("phantom (k=5)", subprocess_row(mode="phantom5", depth=0, **common)),
            ("unrolled", subprocess_row(mode="unrolled", depth=0, **common)),
            ("reversible (β 0.5)", subprocess_row(mode="reversible", depth=0, **common)),
            ("explicit stack", one),
            (
                f"explicit stack (L = implicit fwd NFE = {imp['fwd_nfe']})",
                subprocess_row(mode="explicit", depth=imp["fwd_nfe"], **common),
            ),
            ("explicit stack", stack30 := subprocess_row(mode="explicit", depth=30, **common)),
        ]
        for name, r in rows:
            depth = r["depth"] if r["mode"] == "explicit" else "-"
            print(
                f"| {kind} | {name} | {depth} | {r['saved'] / 2**20:.2f} | {r['saved'] / one['saved']:.2f}x | "
                f"{100 * r['saved'] / stack30['saved']:.1f}% | {r['peak']:.1f} | {1e3 * r['wall']:.1f} | {r['fwd_nfe']} | {r['bwd_nfe'] if r['bwd_nfe'] is not None else '-'} |"
            )
        sys.stdout.flush()
    print()
    print(
        "Saved-for-backward MiB against forward depth (every step forced; Picard, reversible: "
        "Reversible(beta=0.5)):"
    )
    print()
    print(
        "| layer | max_steps | implicit | unrolled | reversible (checkpoint every 10) | "
        "reversible (no checkpoints) |"
    )
    print("|---|---|---|---|---|---|")
    for kind in args.layers.split(","):
        print("\n".join(curve(kind, args.device, args.batch)))


if __name__ == "__main__":
    main()
