"""Copy-memory results table from run directories (not a test): the table in
docs/results/copy-memory.md.

    .venv/bin/python bench/copy_memory.py

Reads ``runs/copy_memory_*/metrics.csv`` and ``config.toml`` (runs/ is not committed: train with
``deepeq train configs/copy_memory_*.toml`` first). Train time sums the logged per-step times
(``B * (T + 20) / tokens_per_s``; evaluation excluded).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepeq.models import create_model  # noqa: E402
from deepeq.train import load_run_config  # noqa: E402

RUNS = [
    ("T=100", "runs/copy_memory_t100_deq", "CPU (2 cores)"),
    ("T=100", "runs/copy_memory_t100_lstm", "CPU"),
    ("T=100", "runs/copy_memory_t100_gru", "CPU"),
    ("T=100", "runs/copy_memory_t100_tcn", "CPU"),
    ("T=400", "runs/copy_memory_t400_deq", "H100"),
]


def main() -> None:
    print(
        "| task | model | params | steps run / planned | last test loss (step) | best test loss | "
        "recall accuracy | mean fwd / bwd NFE | train time (steps only) | machine | status |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for task, run, machine in RUNS:
        p = ROOT / run / "metrics.csv"
        if not p.exists():
            continue
        with p.open() as fh:
            rows = list(csv.DictReader(fh))
        cfg = load_run_config(ROOT / run)
        ev = [r for r in rows if r.get("test_loss")]
        last = ev[-1] if ev else None
        best = min(float(r["test_loss"]) for r in ev) if ev else float("nan")
        nfe = [float(r["fwd_nfe"]) for r in rows if r.get("fwd_nfe")]
        bnfe = [float(r["bwd_nfe"]) for r in rows if r.get("bwd_nfe")]
        model = create_model(cfg.model.name, vocab_size=10, **cfg.model.overrides)
        params = sum(q.numel() for q in model.parameters())
        steps = int(rows[-1]["step"])
        status = "complete" if steps >= cfg.steps else "partial (resumable)"
        nf = f"{sum(nfe) / len(nfe):.1f} / {sum(bnfe) / len(bnfe):.1f}" if nfe else "-"
        lt = f"{float(last['test_loss']):.3g} ({last['step']})" if last else "-"
        acc = f"{float(last['test_acc']):.4f}" if last else "-"
        L = cfg.data.seq_len + 20
        secs = sum(
            cfg.batch_size * L / float(r["tokens_per_s"]) for r in rows if r.get("tokens_per_s")
        )
        print(
            f"| copy memory {task} | {cfg.model.name} | {params:,} | {steps} / {cfg.steps} | {lt} | "
            f"{best:.3g} | {acc} | {nf} | {secs / 60:.0f} min | {machine} | {status} |"
        )


if __name__ == "__main__":
    main()
