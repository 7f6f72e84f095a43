"""``deepeq plot RUN_DIR``: PNGs of a run's metrics (needs matplotlib: the ``plot`` extra)."""

from __future__ import annotations

import csv
from pathlib import Path

PANELS = [
    ("loss", ["loss", "task_loss", "valid_loss", "test_loss"], True),
    ("metric", ["valid_ppl", "test_ppl", "valid_bpc", "test_bpc", "valid_acc", "test_acc"], False),
    ("nfe", ["fwd_nfe", "bwd_nfe"], False),
    ("residual", ["fwd_res_max", "fwd_res_mean", "bwd_res_max"], True),
    ("jacobian", ["jac_penalty", "jac_unconverged", "jac_fro", "spectral_radius"], False),
]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``plots/<panel>.png`` for loss, evaluation metric (perplexity / accuracy), NFE,
    residual and Jacobian terms over steps, and the per-epoch share of training steps whose
    solves met their tolerance (``convergence.png``).

    Returns:
        The paths written (panels without data are skipped).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    path = run / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"No metrics.csv in {run}; is it a run directory written by deepeq train?"
        )
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    out_dir = run / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, keys, log in PANELS:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        drawn = False
        for k in keys:
            pts = [(int(r["step"]), float(r[k])) for r in rows if r.get(k) not in (None, "")]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    label=k,
                    marker="o" if k.startswith(("test", "valid")) else None,
                    ms=3,
                )
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{run.name}: {name}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f"{name}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        written.append(p)
    p = _plot_convergence(run, rows, out_dir, plt)
    if p is not None:
        written.append(p)
    return written


def _plot_convergence(run: Path, rows: list[dict], out_dir: Path, plt) -> Path | None:
    """``plots/convergence.png``: the share of training steps whose forward / backward solves
    met their tolerance, per epoch (``final.json``'s epoch length; 100 steps without it)."""
    import json

    from .convergence import convergence_summary

    final = run / "final.json"
    per = json.loads(final.read_text()).get("steps_per_epoch", 100) if final.exists() else 100
    summary = convergence_summary(rows, per)
    if not summary:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for d in ("fwd", "bwd"):
        shares = summary.get(f"{d}_converged_steps_by_epoch")
        if shares:
            ax.plot(range(1, len(shares) + 1), [100 * v for v in shares], marker="o", ms=3,
                    label=f"{d}: steps whose solves met the tolerance")  # fmt: skip
    ax.set_ylim(-5, 105)
    ax.set_xlabel(f"epoch ({per} steps)")
    ax.set_ylabel("%")
    ax.set_title(f"{run.name}: convergence")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "convergence.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p
