"""Numerics of the reversible DEQ (not a test): how far the reconstructed iterates drift and how
exact the gradient stays, against autograd through the same forward iterations.

    .venv/bin/python bench/reversible.py [--layers attention,conv] [--batch 4]

For each layer (the demo layers of ``deepeq._demo``), state dtype and chain dtype (float32 state
with the default float64 chains, with and without checkpoints every 10 steps, and with float32
chains; float64), beta and number of
steps N (every step forced: tolerance 0), one forward + backward with
``deepeq.ReversibleBackward`` and one with ``deepeq.UnrolledBackward`` on the same iterations.
Columns: the forward relative residual at step N, the reconstruction error of z_0 reported by
the backward pass (relative to ||z_N||; "stopped" when every sample's reversal stopped early
because its adjoint fell below round-off), the steps undone (min over samples), and the relative
error of the parameter and input gradients, max |g - g_unrolled| / max |g_unrolled| over all
gradient tensors.
"""

from __future__ import annotations

import argparse
import platform

import torch

import deepeq
from deepeq._demo import make_layer


def one(kind, dtype, beta, steps, batch, chains, every):
    layer, x = make_layer(kind, batch=batch)
    layer = layer.to(dtype)
    x = x.to(dtype).requires_grad_()
    params = [p for p in layer.parameters() if p.requires_grad]
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = {}
    rule = deepeq.ReversibleBackward(checkpoint_every=every, warn_error=float("inf"))
    for name, bw in (("rev", rule),
                     ("unr", deepeq.UnrolledBackward())):  # fmt: skip
        cd = torch.float64 if chains == "float64" else None
        solver = deepeq.Reversible(rtol=0.0, max_steps=steps, beta=beta, chain_dtype=cd)
        sol = deepeq.fixed_point(layer, torch.zeros_like(x), solver, args=(x,), backward=bw)
        grads = torch.autograd.grad((sol.value * w).sum(), [x, *params])
        out[name] = (sol, grads)
    sol, g = out["rev"]
    _, r = out["unr"]
    err = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
        for a, b in zip(g, r, strict=True)
    )
    rec = sol.backward.reconstruction_error
    return dict(
        res=sol.stats.rel_residual.max().item(),
        rec="stopped" if bool(torch.isnan(rec).all()) else f"{rec.nan_to_num(0).max().item():.1e}",
        undone=int(sol.backward.num_steps.min()),
        grad=err,
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", default="attention,conv")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--betas", default="0.5,0.8")
    p.add_argument("--steps", default="5,10,20,50,100,200")
    args = p.parse_args(argv)
    print(
        f"# bench/reversible.py  torch {torch.__version__}  "
        f"{platform.processor() or platform.machine()}  threads {torch.get_num_threads()}  "
        f"batch {args.batch}"
    )
    print(
        "| layer | dtype | chains | checkpoint every | beta | steps N | fwd rel residual | "
        "z_0 reconstruction error | steps undone (min) | gradient rel error vs unrolled |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.layers.split(","):
        # float32 state with float64 chains (the default) and with float32 chains (the papers'
        # scheme, chain_dtype=None); float64 state
        for dtype, chains, every in ((torch.float32, "float64", 10), (torch.float32, "float64", None),
                                     (torch.float32, "float32", None), (torch.float64, "float64", None)):  # fmt: skip
            for beta in (float(b) for b in args.betas.split(",")):
                for steps in (int(s) for s in args.steps.split(",")):
                    r = one(kind, dtype, beta, steps, args.batch, chains, every)
                    print(
                        f"| {kind} | {str(dtype).removeprefix('torch.')} | {chains} | "
                        f"{every or '-'} | {beta} | "
                        f"{steps} | {r['res']:.1e} | {r['rec']} | {r['undone']} | "
                        f"{r['grad']:.1e} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
