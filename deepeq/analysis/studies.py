"""Analysis commands (``deepeq analyze ...``): convergence of weight-tied stacks (Bai et al. 2019,
Fig. 4), metric against NFE (the DEQ slides and Bai et al. 2021) and gradient accuracy against
solver caps. They compute rows; ``analysis.plots`` draws them. Variants of a model's solve are
twins from ``model.with_solve(dataclasses.replace(spec, ...))``: the model itself is never
changed."""

from __future__ import annotations

import dataclasses
import time

import torch

from .._fixed_point import fixed_point
from ..models._protocol import equilibrium_layer, require_equilibrium
from ..solvers import Broyden
from ..train.config import ConfigError


def _flat(z) -> torch.Tensor:
    if isinstance(z, torch.Tensor):
        return z.flatten(1)
    return torch.cat([t.flatten(1) for t in z], dim=1)


@torch.no_grad()
def stack_convergence(
    model, lengths: list[int], layers: int, *, batch: int = 4, seed: int = 0, images=None
) -> list[dict]:
    """Iterate the model's f as an explicit weight-tied stack for ``layers`` layers, recording the
    mean relative residual ``||f(z)-z||/||f(z)||`` after every layer, next to Broyden's residual
    trace on the same input (same NFE axis). Sequence models: random token sequences of each
    length in ``lengths``; image models (MDEQ): ``images`` (or random ones), one "length" = the
    image size."""
    require_equilibrium(model, "the convergence study")
    model.eval()
    g = torch.Generator().manual_seed(seed)
    if not model.variable_length:
        lengths = [model.config.image_size]
    rows = []
    for T in lengths:
        f, args, z0 = model.equilibrium_problem(batch, g, T, images)
        z = z0
        stack = []
        for _ in range(layers):
            fz = f(z, *args)
            a, b = _flat(fz), _flat(z)
            stack.append(((a - b).norm(dim=1) / a.norm(dim=1)).mean().item())
            z = fz
        sol = fixed_point(
            f,
            z0,
            Broyden(atol=0.0, rtol=0.0, max_steps=layers),
            args=args,
            trace=True,
            nonfinite="return",
        )
        broyden = sol.stats.rel_trace.mean(0).tolist()  # index k: after k steps (k+1 NFE)
        for n in range(1, layers + 1):
            rows.append(
                {
                    "length": T,
                    "depth": n,
                    "stack_rel_residual": stack[n - 1],
                    "broyden_rel_residual": broyden[min(n - 1, len(broyden) - 1)],
                }
            )
    return rows


def sweep(model, task, caps: list[int | None], splits: tuple[str, ...] | None = None) -> list[dict]:
    """The task's evaluation metrics at each eval solver cap (None: the configured eval solver),
    with the mean forward NFE per batch (solver steps + the tracked call; a batch runs until its
    slowest sample stops), the mean NFE per sample (each sample stops on its own when it meets
    the tolerance), the mean final relative residual and the wall time. ``splits``: the task's
    final splits by default."""
    from ..train.loop import evaluate

    return [_sweep_row(model, task, cap, splits, evaluate) for cap in caps]


def _mean(v: list[float]) -> float | None:
    return sum(v) / len(v) if v else None


def _sweep_row(model, task, cap, splits, evaluate) -> dict:
    nfe: list[int] = []
    per_sample: list[float] = []
    res: list[float] = []
    hook = None
    if equilibrium_layer(model) is not None:
        if cap is not None:  # the configured eval solve with another cap, all else kept
            model = model.with_solve(dataclasses.replace(model.config.solve, eval_max_steps=cap))

        def record(m, i, o):
            for sol in o[2]:  # the solutions of this call (one per solve)
                st = sol.stats
                nfe.append(st.nfe)
                # sample_evals counts f evaluations of single samples, counted as nfe counts
                # batch evaluations: a sample that never stops early has nfe of them
                per_sample.append(st.sample_evals / st.rel_residual.numel())
                res.append(st.rel_residual.mean().item())

        hook = model.register_forward_hook(record)
    t0 = time.perf_counter()
    try:
        m = {k: v for k, v in evaluate(model, task, splits).items() if k in task.eval_fields}
    finally:
        if hook is not None:
            hook.remove()
    return {
        "max_steps": cap,
        **m,
        "mean_nfe": _mean(nfe),
        "mean_sample_nfe": _mean(per_sample),
        "mean_residual": _mean(res),
        "seconds": time.perf_counter() - t0,
    }


_SWEEP_KEYS = ("max_steps", "mean_nfe", "mean_sample_nfe", "mean_residual", "seconds")


def format_sweep(rows: list[dict]) -> list[str]:
    """``sweep`` rows as markdown table lines."""
    header = [k for k in rows[0] if k not in _SWEEP_KEYS]
    lines = [
        "| eval max_steps | " + " | ".join(header)
        + " | mean fwd NFE (batch) | mean fwd NFE (sample) | mean rel. residual |",
        "|---" * (len(header) + 4) + "|",
    ]  # fmt: skip
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        cells = " | ".join(f"{r[k]:.4g}" for k in header)
        label = r["max_steps"] if r["max_steps"] is not None else "config"
        lines.append(
            f"| {label} | {cells} | {fmt(r['mean_nfe'], '.2f')} | "
            f"{fmt(r['mean_sample_nfe'], '.2f')} | {fmt(r['mean_residual'], '.3g')} |"
        )
    return lines


def eval_sweep(model, task, caps: list[int | None]) -> list[str]:
    """``sweep`` as markdown table lines."""
    return format_sweep(sweep(model, task, caps))


def metric_vs_nfe(run_dirs: list[str], caps: list[int], checkpoint: str = "best") -> list[dict]:
    """``sweep`` over runs: each run's test loss and task metric against mean forward NFE
    and wall time, one row per (run, cap)."""
    from ..train.checkpoint import load_run

    rows = []
    for run in run_dirs:
        cfg, model, task = load_run(run, checkpoint)
        if equilibrium_layer(model) is None:
            raise ConfigError(f"{run}: metric vs NFE needs a DEQ model; got {cfg.model.name}.")
        for r in sweep(model, task, list(caps), ("test",)):
            rows.append(
                {
                    "run": str(run), "max_steps": r["max_steps"], "mean_nfe": r["mean_nfe"],
                    "mean_sample_nfe": r["mean_sample_nfe"], "seconds": r["seconds"],
                    "metric": task.metric, "value": r[task.metric],
                    "test_loss": r["test_loss"],
                }
            )  # fmt: skip
    return rows


def parse_caps(text: str) -> list[tuple[int, int]]:
    """``"8/4,12/12"`` -> ``[(8, 4), (12, 12)]`` (forward cap / backward cap; a backward cap of 0
    means no backward iterations)."""
    caps = []
    for item in text.split(","):
        parts = item.strip().split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) < 1:
            raise ConfigError(
                f"caps must be FORWARD/BACKWARD pairs of ints (forward >= 1, backward >= 0) "
                f"separated by commas, e.g. 8/4,12/12; got {item!r} in {text!r}."
            )
        caps.append((int(parts[0]), int(parts[1])))
    return caps


def gradient_accuracy(
    model,
    task,
    caps: list[tuple[int, int]],
    step: int = 100,
    reference: tuple[int, int] = (200, 200),
    dropout: bool = True,
    b_init: str = "v",
    solver: str | None = None,
) -> list[dict]:
    """How close the training gradient at each (forward cap, backward cap) is to the exact one.

    One training batch of ``task`` (step ``step``; sequence tasks get the memory of the 3
    segments before it), the model in training mode with the same dropout masks for every
    setting. The reference solves both systems with the configured solvers to rtol 1e-7 / 1e-8
    within ``reference`` steps (its residuals are reported: check that they are small). Per
    setting: the loss, forward/backward relative residuals (max over samples), NFE, the cosine
    between its gradient and the reference's and the relative error ``||g - g*|| / ||g*||``
    (all parameters together), and the seconds of forward + backward. ``dropout=False``: the
    model in eval mode (no dropout masks; the training solvers are still the ones set here) —
    f with a dropout mask can be harder to solve than f itself. ``solver`` replaces the model's
    forward solver (by name, e.g. ``"broyden"``) in every setting and the reference; ``b_init``
    is the capped settings' backward start (``"shine"``: the forward Broyden solver's inverse
    estimate; see ``deepeq.ImplicitBackward``), and a backward cap of 0 makes no backward
    iterations (the start is the gradient; its backward residual is then NaN: not measured)."""
    from ..train.metrics import solution_metrics
    from ..train.tasks import LanguageModelTask

    if equilibrium_layer(model) is None:
        raise ConfigError(
            f"gradient accuracy needs a DEQ model (an equilibrium layer); got "
            f"{type(model).__name__}."
        )
    spec = model.config.solve
    f_solver = solver or spec.solver
    if b_init == "shine" and f_solver != "broyden":
        raise ConfigError(
            f"b_init='shine' needs the forward solver 'broyden' (its inverse-Jacobian estimate); "
            f"the model's is {f_solver!r}: pass solver='broyden' (CLI: --solver broyden)."
        )
    was_training = model.training
    model.train(dropout)
    state = None
    torch.manual_seed(0)  # the memory's dropout masks: the same in every call (reproducible)
    if isinstance(task, LanguageModelTask):
        with torch.no_grad():
            for s in range(max(0, step - 3), step):
                x, y, _ = task.train_batch(s, 0, 1)
                _, state, _ = task.loss(model, x, y, state)
    x, y, _ = task.train_batch(step, 0, 1)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(f_cap: int, b_cap: int, f_rtol: float, b_rtol: float, init: str) -> dict:
        # the same forward solve in either mode (training or eval), this backward
        twin = model.with_solve(
            dataclasses.replace(
                spec, solver=f_solver, f_max_steps=f_cap, f_rtol=f_rtol, eval_max_steps=f_cap,
                eval_rtol=f_rtol, backward="implicit", b_max_steps=b_cap, b_rtol=b_rtol,
                b_init=init,
            )
        )  # fmt: skip
        torch.manual_seed(0)  # identical dropout masks in every setting
        t0 = time.perf_counter()
        loss, _, sols = task.loss(twin, x, y, state)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        seconds = time.perf_counter() - t0
        g = torch.cat(
            [
                (torch.zeros_like(p) if q is None else q).flatten()
                for p, q in zip(params, grads, strict=True)
            ]
        )
        m = solution_metrics(sols)  # the training loop's statistics of these solves
        return {
            "f_cap": f_cap,
            "b_cap": b_cap,
            "loss": loss.item(),
            "fwd_rel_residual": m["fwd_res_max"],
            "bwd_rel_residual": m.get("bwd_res_max", float("nan")),  # NaN: no iterations
            "b_init": init,
            "fwd_nfe": m["fwd_nfe"],
            "bwd_nfe": m.get("bwd_nfe", 0),
            "seconds": seconds,
            "_g": g,
        }

    try:
        ref = run(*reference, 1e-7, 1e-8, "v")
        rows = []
        for f_cap, b_cap in caps:
            r = run(f_cap, b_cap, spec.f_rtol, spec.b_rtol, b_init)
            g = r.pop("_g")
            r["cosine"] = torch.nn.functional.cosine_similarity(g, ref["_g"], dim=0).item()
            r["rel_error"] = ((g - ref["_g"]).norm() / ref["_g"].norm()).item()
            rows.append(r)
    finally:
        model.train(was_training)
    ref.pop("_g")
    return [
        {
            **ref,
            "cosine": 1.0,
            "rel_error": 0.0,
            "f_cap": f"ref {reference[0]}",
            "b_cap": f"ref {reference[1]}",
        },
        *rows,
    ]


@torch.no_grad()
def path_independence_rows(
    model,
    *,
    batch: int = 8,
    length: int = 32,
    random_starts: int = 2,
    shuffled_starts: int = 2,
    scale: float = 1.0,
    seed: int = 0,
    inputs=None,
) -> list[dict]:
    """Per example, the asymptotic alignment of the model's equilibrium (``deepeq.
    path_independence``, with the model's evaluation solver and causality): ``inputs`` (e.g. a
    run's own test images) or ``batch`` random token sequences of ``length``."""
    from .._test_time import path_independence

    require_equilibrium(model, "the path-independence study")
    model.eval()
    policy = model.equilibrium
    g = torch.Generator().manual_seed(seed)
    length = length if model.variable_length else model.config.image_size
    f, args, z0 = model.equilibrium_problem(batch, g, length, inputs)
    pi = path_independence(
        f, z0, policy.eval_solver, args=args, random_starts=random_starts,
        shuffled_starts=shuffled_starts, scale=scale, generator=g, causal=policy.causal,
        nonfinite="return",
    )  # fmt: skip
    return [
        {
            "example": i,
            "aa": float(pi.aa[i]),
            "different": float(pi.different[i]),
            "min_cosine": float(pi.cosine[:, i].min()),
            "fp1_converged": bool(pi.converged[0, i]),
            "all_converged": bool(pi.converged[:, i].all()),
        }
        for i in range(pi.aa.numel())
    ]
