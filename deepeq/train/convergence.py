"""Convergence as a reported property of a run: which share of its training steps' solves met
their tolerance, by epoch, and the residuals of its last epoch (from ``metrics.csv``)."""

from __future__ import annotations

import statistics
from typing import Any

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


def convergence_line(final: dict, cfg: Any = None) -> str | None:
    """One summary line (with a warning when the last epoch's forward solves stopped meeting
    their tolerance, whose advice follows the run's settings ``cfg``, a ``TrainConfig``), or
    None for runs without solves."""
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
            f"equilibrium. {convergence_advice(cfg)}"
        )
    return text


def convergence_advice(cfg: Any = None) -> str:
    """What to change when a run's training solves stop meeting their tolerance, given its
    settings (``cfg``, a ``TrainConfig``; None: the keys without their values)."""
    if cfg is None:
        return (
            "Raise model.overrides.solve.f_max_steps or f_rtol, add or raise Jacobian "
            "regularisation (jac.weight, jac.unconverged_weight) or fixed-point correction "
            "(solve.correction_steps); check the trained model with deepeq eval RUN_DIR "
            "--max-steps 40,80,160 and deepeq plot RUN_DIR."
        )
    from .config import check_model

    spec = getattr(check_model(cfg.model), "solve", None)
    j, tips = cfg.jac, []
    if spec is not None:
        tips.append(
            f"raise the cap (model.overrides.solve.f_max_steps = {spec.f_max_steps}) or loosen "
            f"the tolerance (solve.f_rtol = {spec.f_rtol:g})"
        )
    if j.on:
        now = f"jac.weight = {j.weight:g}"
        now += f" -> jac.final_weight = {j.final_weight:g}" if j.final_weight is not None else ""
        now += f", jac.probability = {j.probability:g}, jac.unconverged_weight = "
        now += f"{j.unconverged_weight:g}"
        more = ["jac.weight" if j.final_weight is None else "jac.final_weight"]
        more += ["jac.probability"] if j.probability < 1 else []
        more += ["jac.unconverged_weight" if j.unconverged_weight else "add jac.unconverged_weight"]
        tips.append(f"strengthen the Jacobian regularisation ({now}): raise {' / '.join(more)}")
    else:
        tips.append(
            "add Jacobian regularisation (jac.weight, e.g. 0.1-0.5 with jac.probability 0.35, "
            "and/or jac.unconverged_weight on the outputs whose solve missed the tolerance; "
            "both are 0 in this run)"
        )
    if spec is not None and not spec.correction_steps:
        tips.append("add fixed-point correction (solve.correction_steps = 2)")
    caps = "40,80,160"
    if spec is not None:
        e = spec.eval_max_steps
        caps = f"{e},{2 * e},{4 * e}"
    return (
        f"To converge: {'; '.join(tips)}. Whether the trained model reaches its equilibrium with "
        f"more steps: deepeq eval {cfg.out_dir} --max-steps {caps}; by epoch: deepeq plot "
        f"{cfg.out_dir}."
    )
