"""Model benchmark: DEQ vs its explicit twins, per family, in one run (not a test).

    .venv/bin/python bench/models.py [--device cpu|cuda] [--sizes tiny,ptb]

Sizes (stated, not the papers' GPU sizes unless --sizes paper on a GPU):
* tiny: the registered *_tiny configs (d 32-34, vocab 10), B=8, T=32;
* ptb:  PTB-like widths on a CPU budget: vocab 10,000, embedding 400, d_model 400 (Transformer:
        8 heads, d_ff 1,024; TrellisNet kernel 2), B=8, T=70;
* paper: the registered paper-size configs (GPU only).
Per model: tokens/s of a train step (forward + backward) and of inference (eval, no grad),
forward/backward NFE (DEQ), bytes saved for backward by the core alone (total minus a pass with the
core skipped, so embeddings and softmax are excluded, as the papers measure) and peak memory of the
train step (CPU: peak RSS increase, each row in its own subprocess; GPU: peak CUDA allocation).
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

from deepeq.analysis import saved_bytes
from deepeq.models import create_model

FAMILIES = {
    "transformer": ("deq_transformer_tiny", "transformer_tied_tiny", "transformer_xl_tiny"),
    "trellisnet": ("deq_trellisnet_tiny", "trellisnet_tied_tiny", "trellisnet_untied_tiny"),
}
SIZES = {
    "tiny": dict(overrides={}, B=8, T=32),
    "ptb": dict(
        overrides={
            "transformer": dict(
                vocab_size=10000,
                d_embed=400,
                d_model=400,
                n_heads=8,
                d_ff=1024,
                solve=dict(f_max_steps=30, b_max_steps=30, eval_max_steps=40),
            ),
            "trellisnet": dict(
                vocab_size=10000,
                d_embed=400,
                d_model=400,
                solve=dict(f_max_steps=30, b_max_steps=30, eval_max_steps=40),
            ),
        },
        B=8,
        T=70,
    ),
}


def row(name: str, family: str, size: str, device: str) -> dict:
    spec = SIZES[size]
    over = spec["overrides"].get(family, {}) if spec["overrides"] else {}
    torch.manual_seed(0)
    model = create_model(name, **over).to(device)
    B, T = spec["B"], spec["T"]
    V = model.config.vocab_size
    x = torch.randint(0, V, (B, T), device=device)
    y = torch.randint(0, V, (B, T), device=device)

    def train_step():
        model.zero_grad(set_to_none=True)
        logits, _, sols = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        loss.backward()
        return sols

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    rss0 = None
    if device == "cuda":
        train_step()
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/statm") as fh:
            rss0 = int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    sols = train_step()
    sync()
    peak = (
        (torch.cuda.max_memory_allocated() - base) / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    )
    reps = 3
    t0 = time.perf_counter()
    for _ in range(reps):
        sols = train_step()
    sync()
    train_tps = reps * B * T / (time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        model(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
        sync()
    infer_tps = reps * B * T / (time.perf_counter() - t0)
    model.train()
    total, _ = saved_bytes(lambda: model(x)[0])
    # The same pass without the core: embedding -> (zero state) -> head.
    emb_head, _ = saved_bytes(
        lambda: model.logits(
            torch.zeros(B, T, model.state_dim(model.size), device=device) + 0 * model.embed(x).sum()
        )
    )
    return dict(
        name=name,
        params=sum(p.numel() for p in model.parameters()),
        non_embedding=model.non_embedding_parameters(),
        train_tps=train_tps,
        infer_tps=infer_tps,
        fwd_nfe=sum(s.stats.nfe for s in sols) if sols else None,
        bwd_nfe=sum(s.backward.nfe for s in sols) if sols else None,
        core_saved=(total - emb_head) / 2**20,
        peak=peak,
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="tiny,ptb")
    p.add_argument("--row", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.row:
        print(json.dumps(row(**json.loads(args.row))))
        return
    dev = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine()
    )
    peak = "peak CUDA MiB" if args.device == "cuda" else "peak RSS +MiB"
    print(
        f"# bench/models.py  torch {torch.__version__}  device {args.device} ({dev})  threads {torch.get_num_threads()}"
    )
    print(
        f"| size | model | params | non-emb. params | train tok/s | infer tok/s | fwd NFE | bwd NFE | core saved MiB | {peak} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        for family, names in FAMILIES.items():
            for name in names:
                kw = dict(name=name, family=family, size=size, device=args.device)
                out = subprocess.run(
                    [sys.executable, __file__, "--row", json.dumps(kw)],
                    capture_output=True,
                    text=True,
                )
                if out.returncode:
                    print(
                        f"| {size} | {name} | failed: {out.stderr.strip().splitlines()[-1][:120]} |"
                    )
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                nfe = lambda v: "-" if v is None else str(v)  # noqa: E731
                print(
                    f"| {size} | {name} | {r['params']:,} | {r['non_embedding']:,} | {r['train_tps']:,.0f} | {r['infer_tps']:,.0f} | "
                    f"{nfe(r['fwd_nfe'])} | {nfe(r['bwd_nfe'])} | {r['core_saved']:.2f} | {r['peak']:.1f} |"
                )
                sys.stdout.flush()


if __name__ == "__main__":
    main()
