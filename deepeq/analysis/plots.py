"""Drawing and writing the rows ``analysis.studies`` computes (matplotlib is imported only
here, when a figure is drawn: the ``plot`` extra)."""

from __future__ import annotations

import csv
from pathlib import Path


def plot_gradient_accuracy(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if not str(r["f_cap"]).startswith("ref")]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["fwd_nfe"] + r["bwd_nfe"] for r in rs], [r["rel_error"] for r in rs])
    for r in rs:
        ax.annotate(f"{r['f_cap']}/{r['b_cap']}", (r["fwd_nfe"] + r["bwd_nfe"], r["rel_error"]))
    ax.set_xlabel("forward NFE + backward NFE")
    ax.set_ylabel("||g - g*|| / ||g*||")
    ax.set_title("gradient accuracy vs solver caps (forward/backward)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot_convergence(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, T in enumerate(sorted({r["length"] for r in rows})):
        rs = [r for r in rows if r["length"] == T]
        c = f"C{i}"
        ax.plot(
            [r["depth"] for r in rs],
            [r["stack_rel_residual"] for r in rs],
            color=c,
            label=f"stack, T={T}",
        )
        ax.plot(
            [r["depth"] for r in rs],
            [max(r["broyden_rel_residual"], 1e-12) for r in rs],
            color=c,
            ls="--",
            label=f"Broyden, T={T}",
        )
    ax.set_yscale("log")
    ax.set_xlabel("depth (layers) / solver steps")
    ax.set_ylabel("||f(z) - z|| / ||f(z)||")
    ax.set_title("weight-tied stack vs quasi-Newton solve")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_metric_vs_nfe(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in dict.fromkeys(r["run"] for r in rows):
        rs = [r for r in rows if r["run"] == run]
        label = Path(run).name
        axes[0].plot([r["mean_nfe"] for r in rs], [r["value"] for r in rs], marker="o", label=label)
        axes[1].plot([r["seconds"] for r in rs], [r["value"] for r in rs], marker="o", label=label)
    axes[0].set_xlabel("mean forward NFE")
    axes[1].set_xlabel("evaluation wall time (s)")
    for ax in axes:
        ax.set_ylabel(" / ".join(dict.fromkeys(r["metric"] for r in rows)))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_path_independence(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist([r["aa"] for r in rows], bins=20, range=(-1, 1))
    ax.set_xlabel("asymptotic alignment (mean cosine of fp1 and fp2)")
    ax.set_ylabel("examples")
    ax.set_title("path independence: AA per example")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
