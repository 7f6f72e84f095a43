"""Convergence as a reported property of a run: which share of its training steps' solves met
their tolerance, by epoch, and the residuals of its last epoch (from ``metrics.csv``)."""

from __future__ import annotations

import statistics

#: A run whose last epoch has fewer forward solves meeting the tolerance than this is flagged.
CONVERGED_SHARE_WARNING = 0.5


def _share(rows: list[dict], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return sum(v >= 1.0 for v in vals) / len(vals) if vals else None


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return statistics.fmean(vals) if vals else None


def convergence_summary(rows: list[dict], steps_per_epoch: int) -> dict:
    """From metrics.csv rows: ``fwd_converged_steps`` (share of training steps whose forward
    solves met the tolerance for every sample), ``bwd_converged_steps`` (the same for the
    backward solves), both ``..._by_epoch`` (lists, the last epoch possibly partial), and the
    last epoch's mean ``fwd_res_max`` / ``bwd_res_max``. Empty for runs without solves."""
    rows = [r for r in rows if r.get("fwd_converged") not in (None, "")]
    if not rows:
        return {}
    per = max(1, steps_per_epoch)
    epochs: list[list[dict]] = []
    for r in rows:
        e = (int(r["step"]) - 1) // per
        while len(epochs) <= e:
            epochs.append([])
        epochs[e].append(r)
    epochs = [e for e in epochs if e]
    out: dict = {"steps_per_epoch": per}
    for d in ("fwd", "bwd"):
        share = _share(rows, f"{d}_converged")
        if share is None:
            continue
        out[f"{d}_converged_steps"] = share
        out[f"{d}_converged_steps_by_epoch"] = [_share(e, f"{d}_converged") for e in epochs]
        out[f"{d}_res_max_last_epoch"] = _mean(epochs[-1], f"{d}_res_max")
    return out


def convergence_line(final: dict) -> str | None:
    """One summary line (with a warning when the last epoch's forward solves stopped meeting
    their tolerance), or None for runs without solves."""
    if "fwd_converged_steps" not in final:
        return None
    last = final["fwd_converged_steps_by_epoch"][-1]
    text = (
        f"convergence: forward solves met their tolerance on {100 * final['fwd_converged_steps']:.0f}% "
        f"of training steps ({100 * last:.0f}% in the last epoch"
    )
    res = final.get("fwd_res_max_last_epoch")
    text += f", max residual {res:.3g})" if res is not None else ")"
    if "bwd_converged_steps" in final:
        b_last = final["bwd_converged_steps_by_epoch"][-1]
        text += (
            f"; backward {100 * final['bwd_converged_steps']:.0f}% ({100 * b_last:.0f}% in the "
            f"last epoch)"
        )
    evals = [
        f"{split} {100 * final[f'{split}_fwd_converged']:.1f}% (max residual "
        f"{final[f'{split}_fwd_res_max']:.3g}, {final[f'{split}_fwd_nfe']:.1f} NFE)"
        for split in ("valid", "test")
        if f"{split}_fwd_converged" in final
    ]
    if evals:
        text += "\nevaluation solves that met their tolerance: " + ", ".join(evals)
    if last < CONVERGED_SHARE_WARNING:
        text += (
            f"\nwarning: in the last epoch only {100 * last:.0f}% of the forward solves met their "
            f"tolerance: the model is trained as a capped weight-tied network, not at its "
            f"equilibrium (raise f_max_steps, or add Jacobian regularisation / fixed-point "
            f"correction; see deepeq plot RUN_DIR)."
        )
    return text
