"""The driver loop shared by the forward solve and the implicit backward solve."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ._context import _SAMPLE_INDEX
from ._flatten import Layout, check_output, flatten, unflatten
from ._norm import safe_norm
from ._solution import Stats, Status
from ._types import FixedPointFn


def _map_args(args: Any, fn) -> Any:
    if isinstance(args, Tensor):
        return fn(args)
    if isinstance(args, tuple | list):
        return type(args)(_map_args(a, fn) for a in args)
    return args


def check_args(args: Any, layout: Layout, path: str = "args") -> None:
    if isinstance(args, Tensor):
        if args.dim() == 0 or args.shape[0] != layout.batch:
            raise ValueError(
                f"{path} must be batched along dim 0 like z0 (batch size {layout.batch}); got shape "
                f"{tuple(args.shape)}. Tensors shared by all samples (weights, constants) should "
                f"be captured by f instead of passed in args."
            )
        if args.device != layout.device:
            raise ValueError(
                f"{path} is on {args.device} but z0 is on {layout.device}; move them to one device."
            )
    elif isinstance(args, tuple | list):
        for i, a in enumerate(args):
            check_args(a, layout, f"{path}[{i}]")


class _Evaluator:
    """The flat map solvers call. Counts NFE, slices ``args`` to the active samples (or runs f on
    the full batch when samples are not independent) and checks what f returns."""

    def __init__(
        self,
        f: FixedPointFn,
        layout: Layout,
        args: tuple,
        independent: bool,
        z: Tensor,
        autocast: torch.dtype | None = None,
        positions: int = 0,
    ):
        self.f, self.layout, self.independent = f, layout, independent
        self.args = args  # sliced to the active rows when independent
        self.full_args = args
        self.active = torch.arange(layout.batch, device=layout.device)  # original sample ids
        self.full_z = z.clone() if not independent else None  # frozen rows keep their value
        self.hold: Tensor | None = None  # rows f must see at their full_z value (causal solving)
        self.positions = positions  # causal solving: rows per sample (Anderson mixes by prefix)
        self.nfe = 0
        self.sample_evals = 0
        # The solver's own arithmetic runs outside autocast (its state stays in z0's dtype); f
        # runs in the autocast region the solve was called in, if any.
        self.autocast = autocast

    def _f(self, z: Tensor, args) -> Any:
        if self.autocast is None:
            return self.f(z, *args)
        with torch.autocast(self.layout.device.type, dtype=self.autocast):
            return self.f(z, *args)

    def set_active(self, keep: Tensor) -> None:
        self.active = self.active[keep]
        if self.independent:
            self.args = _map_args(self.args, lambda a: a[keep])

    def __call__(self, z: Tensor, rows: Tensor | None = None) -> Tensor:
        self.nfe += 1
        if self.independent:
            args = self.args if rows is None else _map_args(self.args, lambda a: a[rows])
            if z.shape[0] == self.layout.batch:
                out = self._f(unflatten(z, self.layout), args)
            else:
                token = _SAMPLE_INDEX.set(self.active if rows is None else self.active[rows])
                try:
                    out = self._f(unflatten(z, self.layout), args)
                except RuntimeError as e:
                    raise RuntimeError(
                        f"f failed when evaluated on {z.shape[0]} of the {self.layout.batch} "
                        f"samples (deepeq evaluates f only on samples that have not converged "
                        f"yet). If f uses per-sample tensors, pass them through args=(...) so "
                        f"they are sliced alike (or select rows with deepeq.nn.sample_index()), "
                        f"or pass independent=False. Original error: {e}"
                    ) from e
                finally:
                    _SAMPLE_INDEX.reset(token)
            check_output(out, self.layout, z.shape[0], self.autocast is not None)
            self.sample_evals += z.shape[0]
            return flatten(out, self.layout).to(self.layout.dtype)
        ids = self.active if rows is None else self.active[rows]
        full = self.full_z.index_copy(0, ids, z)  # out of place: autograd may record it
        if self.hold is not None:  # frozen but not compacted rows: their frozen values
            full = torch.where(self.hold.unsqueeze(1), self.full_z, full)
        if rows is None:
            self.full_z = full
        out = self._f(unflatten(full, self.layout), self.full_args)
        check_output(out, self.layout, self.layout.batch, self.autocast is not None)
        self.sample_evals += self.layout.batch
        return flatten(out, self.layout).to(self.layout.dtype)[ids]


def _record_inverse(inverse: dict, solver, state, idx: Tensor, ids: Tensor) -> None:
    factors = solver.inverse_factors(state, idx)
    if factors is not None:
        inverse.setdefault("_parts", []).append((ids, *(t.detach() for t in factors)))


def _record_final(final: dict, solver, state, idx: Tensor, ids: Tensor) -> None:
    parts = solver.final_state(state, idx)
    if parts is not None:
        final.setdefault("_parts", []).append((ids, tuple(t.detach() for t in parts)))


def _assemble_final(final: dict, B: int, z: Tensor, steps: Tensor, nonfinite: Tensor) -> None:
    """The recorded per-row solver state at each row's last step as full ``(B, D)`` tensors,
    with the rows' step counts and non-finite flags (before any per-sample aggregation)."""
    parts = final.pop("_parts", None)
    final["steps"], final["nonfinite"] = steps.clone(), nonfinite.clone()
    if parts is None:
        final["state"] = None
        return
    out = tuple(t.new_zeros(B, t.shape[1]) for t in parts[0][1])
    for ids, ts in parts:
        for o, t in zip(out, ts, strict=True):
            o[ids] = t
    final["state"] = out


def _assemble_inverse(inverse: dict, B: int, z: Tensor) -> None:
    """The recorded per-sample factors as full-batch ``(B, n, D)`` tensors, n the most slots any
    sample used (fewer slots are zero: they add nothing to the low-rank sum)."""
    parts = inverse.pop("_parts", None)
    if parts is None:
        return
    n = max(U.shape[1] for _, U, _ in parts)
    U_all = z.new_zeros(B, n, z.shape[1])
    V_all = z.new_zeros(B, n, z.shape[1])
    for ids, U, V in parts:
        U_all[ids, : U.shape[1]] = U
        V_all[ids, : V.shape[1]] = V
    inverse["U"], inverse["V"] = U_all, V_all


def _norms(z: Tensor, fz: Tensor) -> Tensor:
    """``(2, b)``: row 0 ``||f(z) - z||``, row 1 ``||f(z)||``, in float64 (scale-safe)."""
    return safe_norm(torch.stack((fz - z, fz)), 2)


def _autocast_state(device_type: str) -> torch.dtype | None:
    """The dtype of the autocast region the solve was called in (None outside autocast)."""
    if not torch.is_autocast_enabled(device_type):
        return None
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type)
    return (
        torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()
    )


@dataclass(frozen=True)
class DriverOptions:
    """How the driver loop runs one solve (see ``solve``).

    ``independent``: f treats samples independently (stopped samples may be dropped from its
    input). ``coupled`` (default: ``not independent``): the batch is one problem: it stops only
    when every sample meets the tolerance, and one iterate of the whole batch (the one whose
    worst sample is best) is returned. ``nonfinite``: ``"raise"`` or ``"return"``. ``trace``:
    record the residual after every step. ``min_steps``: no sample stops, and no iterate is
    returned, before this step (``UnrolledBackward`` takes at least one tracked step).
    ``positions`` > 0: causal solving, the rows of z being (sample, position) pairs, this many
    per sample. ``keep``: steps whose full-batch iterates are returned (``DriverResult.iterates``).
    ``inverse``: return the solver's inverse-Jacobian estimate (``DriverResult.inverse``).
    ``final``: return the solver state of every row at its last step (``DriverResult.final``);
    ``snapshot_every`` = C > 0 adds snapshots at the steps that are multiples of C.
    ``compaction``: when stopped samples leave the solver's arrays: ``"auto"`` (at once on CPU,
    in batches of at least a quarter of the rows on accelerators), ``"eager"`` (at once) or
    ``"lazy"`` (in batches); the solve is the same to float rounding, only the cost differs."""

    independent: bool = True
    nonfinite: Literal["raise", "return"] = "raise"
    trace: bool = False
    coupled: bool | None = None
    min_steps: int = 0
    positions: int = 0
    keep: tuple[int, ...] = ()
    inverse: bool = False
    final: bool = False
    snapshot_every: int = 0
    compaction: Literal["auto", "eager", "lazy"] = "auto"


@dataclass
class FinalState:
    """Per row (sample, or (sample, position) in causal solving) at its last step: the solver's
    ``AbstractSolver.final_state`` (a tuple of ``(B, D)`` tensors, or None for solvers that keep
    none), the step count and the non-finite flag, before any per-sample aggregation; and,
    with ``snapshot_every`` = C, ``(k, rows, state)`` for every step k that is a multiple of C
    (the solver state of the rows still moving then)."""

    state: tuple[Tensor, ...] | None
    steps: Tensor
    nonfinite: Tensor
    snapshots: list = field(default_factory=list)


@dataclass
class DriverResult:
    """What ``solve`` returns: the flat ``z*`` (B, D), the status and stats, and what the
    options asked for: ``inverse`` = ``(U, V)`` ``(B, n, D)`` with ``(I - J_f)⁻¹ ≈ I - Σ_i u_i
    v_iᵀ`` at each sample's last step (unused slots zero; None for solvers that keep no
    estimate), ``final`` (``FinalState``), ``iterates`` (step -> full-batch iterate ``(B, D)``,
    detached; samples stopped earlier: their returned value)."""

    z: Tensor
    status: Status
    stats: Stats
    inverse: tuple[Tensor, Tensor] | None = None
    final: FinalState | None = None
    iterates: dict[int, Tensor] | None = None


def solve(f, z, solver, layout, args, options: DriverOptions = DriverOptions()) -> DriverResult:
    """The driver loop on flat ``z`` (B, D) under ``options`` (``DriverOptions``).

    Causal solving (``options.positions``, see ``deepeq.fixed_point``): a row stops only when it
    meets the tolerance and every earlier row of its sample has stopped (the frozen rows form a
    growing prefix, whose values no later step changes), and each row returns its last finite
    iterate. f is evaluated on the full batch (``independent=False``); the returned stats are
    per sample.

    The solver's arithmetic runs outside any autocast region (its state stays in z's dtype); f
    runs inside the caller's."""
    o = options
    if o.compaction not in ("auto", "eager", "lazy"):
        raise ValueError(f"compaction must be 'auto', 'eager' or 'lazy'; got {o.compaction!r}.")
    coupled = (not o.independent) if o.coupled is None else o.coupled
    if o.positions and (o.independent or coupled):
        raise ValueError(
            "causal solving evaluates f on the full batch: independent=False, coupled=False"
        )
    inverse = {} if o.inverse else None
    final = {"every": o.snapshot_every} if o.final else None
    iterates = {s: None for s in o.keep} if o.keep else None
    autocast = _autocast_state(layout.device.type)
    run = (f, z, solver, layout, args, o.independent, o.nonfinite, o.trace, inverse, coupled,
           o.min_steps, o.positions, iterates, final, autocast, o.compaction)  # fmt: skip
    if autocast is None:
        z, status, stats = _solve(*run)
    else:
        with torch.autocast(layout.device.type, enabled=False):
            z, status, stats = _solve(*run)
    return DriverResult(
        z=z,
        status=status,
        stats=stats,
        inverse=(inverse["U"], inverse["V"]) if inverse else None,
        final=None
        if final is None
        else FinalState(final["state"], final["steps"], final["nonfinite"],
                        final.get("snapshots", [])),
        iterates=iterates,
    )  # fmt: skip


def _prefix(meet: Tensor, sample: Tensor) -> Tensor:
    """``meet`` restricted to each sample's leading run: row i is kept iff it and every earlier
    row of its sample (rows sorted by sample, then position) meet. ``sample`` is sorted."""
    fails = (~meet).to(torch.int64)
    before = fails.cumsum(0) - fails  # failures strictly before each row
    first = torch.ones_like(meet)
    first[1:] = sample[1:] != sample[:-1]
    group = first.cumsum(0) - 1  # 0, 1, ... per sample present
    return meet & (before == before[first][group])


def _solve(
    f, z, solver, layout, args, independent, nonfinite, trace, inverse, coupled, min_steps,
    positions, iterates, final, autocast, compaction,
):  # fmt: skip
    t0 = time.perf_counter()
    B, dev = layout.batch, layout.device
    grad = torch.is_grad_enabled()
    finite0 = torch.isfinite(z).all(1)
    if not bool(finite0.all()):
        bad = (~finite0).nonzero().flatten().tolist()
        raise ValueError(f"z0 contains non-finite values (inf/nan) for samples {bad[:10]}.")
    ev = _Evaluator(f, layout, args, independent, z, autocast, positions)
    fz = ev(z)
    norms = _norms(z.detach(), fz.detach())  # (2, b): residual, ||f(z)||
    atol, rtol, max_steps = solver.atol, solver.rtol, solver.max_steps

    # The stopping rule res <= atol + rtol*||f(z)|| as "key <= threshold", with as few tensor
    # ops as possible (per-op overhead dominates the loop when f is cheap). The key also ranks a
    # sample's iterates: the returned one minimises it.
    if rtol == 0:
        threshold = atol

        def sample_key(norms: Tensor) -> Tensor:
            return norms[0]
    elif atol == 0:
        threshold = rtol

        tiny = torch.finfo(norms.dtype).tiny

        def sample_key(norms: Tensor) -> Tensor:  # 0/0 (z = f(z) = 0) is converged, not NaN
            return norms[0] / norms[1].clamp_min(tiny)
    else:
        threshold = 1.0

        def sample_key(norms: Tensor) -> Tensor:
            return norms[0] / (norms[1] * rtol + atol)

    if coupled:

        def key_of(norms: Tensor) -> Tensor:  # the batch is one problem: its worst sample
            key = sample_key(norms)
            return key.amax().expand_as(key)
    else:
        key_of = sample_key

    causal = positions > 0
    last = causal or solver.returns_last  # return each row's last finite iterate

    def stop_rule(meet: Tensor) -> Tensor:
        return _prefix(meet, ev.active // positions) if causal else meet

    # Full-batch outputs, written when a sample leaves the active set.
    out_z = torch.empty_like(z)
    out_norms = torch.empty_like(norms)
    out_steps = torch.zeros(B, dtype=torch.long, device=dev)
    out_best = torch.zeros(B, dtype=torch.long, device=dev)
    out_nonfinite = torch.zeros(B, dtype=torch.bool, device=dev)
    if trace:
        tr = torch.full((2, B, max_steps + 1), float("nan"), dtype=norms.dtype, device=dev)

    # Best-so-far of the active rows (compacted together with the solver state).
    key = key_of(norms)
    best_z, best_norms, best_key = z, norms, key
    if min_steps > 0:  # step 0 is never returned: the first step replaces it
        best_key = torch.full_like(key, float("inf"))
    best_step = torch.zeros(B, dtype=torch.long, device=dev)
    state = solver.init(ev, z, fz)
    buffer_bytes = sum(t.numel() * t.element_size() for t in state if isinstance(t, Tensor))

    on_cpu = dev.type == "cpu"
    lazy = independent and (not on_cpu if compaction == "auto" else compaction == "lazy")
    # Causal solving never compacts: the solver's per-row arithmetic then runs on tensors of
    # one shape whatever the other rows do (a row count that changes with later positions
    # would change kernels, float rounding, and so the earlier outputs).
    frozen: Tensor | None = None  # stopped rows not yet compacted away (lazy mode)
    every = final.get("every", 0) if final is not None else 0
    k = 0
    while True:
        if trace:
            tr[:, ev.active, k] = norms
        if iterates is not None and k in iterates:
            moving = ev.active if frozen is None else ev.active[~frozen]
            now = z if frozen is None else z[~frozen]
            iterates[k] = out_z.detach().index_copy(0, moving, now.detach())
        if every and k > 0 and k % every == 0:  # snapshots of the solver state (Reversible)
            rows = (
                torch.arange(z.shape[0], device=dev)
                if frozen is None
                else (~frozen).nonzero()[:, 0]
            )
            parts = solver.final_state(state, rows)
            if parts is not None:
                snap = tuple(t.detach().clone() for t in parts)
                final.setdefault("snapshots", []).append((k, ev.active[rows].clone(), snap))
        # NaN/inf keys map to 0, i.e. "done": the exact reason is sorted out below, only on the
        # (rare) steps where some sample stops. One host synchronisation per step.
        stop = torch.nan_to_num(key, 0.0, 0.0) <= threshold
        if causal:  # frozen rows count as met; NaN rows (0 here) are inspected below anyway
            met = stop if frozen is None else stop | frozen
            stop = stop_rule(met) | torch.isnan(key)
        if frozen is not None:
            stop &= ~frozen
        if k >= max_steps or (k >= min_steps and bool(stop.any())):
            bad = ~torch.isfinite(norms).all(0)
            met = (best_key <= threshold) | bad
            done = bad | stop_rule(met if frozen is None else met | frozen)
            if k >= max_steps:
                done = torch.ones_like(done)
            if frozen is not None:  # already recorded; they only await compaction
                bad &= ~frozen
                done &= ~frozen
            if nonfinite == "raise" and bool(bad.any()):
                ids = ev.active[bad].tolist()
                raise FloatingPointError(
                    f"f produced non-finite values (inf/nan) at step {k} for sample(s) {ids[:10]}"
                    f" (solver {type(solver).__name__}). Check f for overflow or divergence "
                    f"(e.g. lower the learning rate, add normalisation or damping), or pass "
                    f"nonfinite='return' to get Status.NONFINITE with the last finite iterate."
                )
            idx = done.nonzero().squeeze(1)
            ids = ev.active[idx]
            out_z[ids] = best_z[idx]
            out_norms[:, ids] = best_norms[:, idx].detach()
            out_best[ids] = best_step[idx]
            out_steps[ids] = k
            out_nonfinite[ids] = bad[idx]
            if inverse is not None:
                _record_inverse(inverse, solver, state, idx, ids)
            if final is not None:
                _record_final(final, solver, state, idx, ids)
            if ev.full_z is not None:
                ev.full_z = ev.full_z.index_copy(0, ids, best_z[idx])
            gone = done if frozen is None else done | frozen
            keep = (~gone).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            # Drop stopped samples from the active set. On an accelerator, where every gather is
            # a kernel launch and compute does not fall with fewer rows until many are gone,
            # stopped rows are only marked (their results are already recorded above) until a
            # quarter of the rows have stopped.
            if not causal and (not lazy or keep.numel() <= 0.75 * gone.numel()):
                z, fz = z[keep], fz[keep]
                best_z, best_norms = best_z[keep], best_norms[:, keep]
                best_key, best_step = best_key[keep], best_step[keep]
                state = solver.compact(state, keep)
                ev.set_active(keep)
                frozen = None
            else:
                frozen = gone
                if causal:
                    ev.hold = gone
        k += 1
        z, fz, state = solver.step(ev, z, fz, state)
        norms = _norms(z.detach(), fz.detach()) if grad else _norms(z, fz)
        key = key_of(norms)
        # NaN never improves, so the best iterate stays finite. Causal solving returns each row's
        # last finite iterate: another step's iterate of a row saw other values of the rows
        # before it, so its recorded residual would not be that of the returned state.
        # The same for solvers whose state must match the returned iterate (Reversible).
        better = torch.isfinite(key) if last else key < best_key
        if on_cpu and bool(better.all()):
            # Common case, cheap to detect on CPU (no device to wait for): no masking needed.
            best_z, best_norms, best_key = z, norms, key
            best_step = best_step.fill_(k)
        else:
            best_z = torch.where(better.unsqueeze(1), z, best_z)
            best_norms = torch.where(better, norms, best_norms)
            best_key = torch.where(better, key, best_key)
            best_step = torch.where(better, k, best_step)

    if inverse is not None:
        _assemble_inverse(inverse, B, z)
    if final is not None:
        _assemble_final(final, B, z, out_steps, out_nonfinite)
    if iterates is not None:
        for s in iterates:
            if iterates[s] is None:  # the solve stopped before this step
                iterates[s] = out_z.detach()
    rows_converged, row_steps = None, out_steps
    if causal:  # per (sample, position) rows -> per sample
        rows_converged = (out_norms[0] <= atol + rtol * out_norms[1]) & torch.isfinite(
            out_norms
        ).all(0)
        n = B // positions
        out_norms = safe_norm(out_norms.view(2, n, positions), 2)
        out_steps = out_steps.view(n, positions).amax(1)
        out_best = out_best.view(n, positions).amax(1)
        out_nonfinite = out_nonfinite.view(n, positions).any(1)
        rows_converged = rows_converged.view(n, positions)
    out_res, out_fnorm = out_norms[0], out_norms[1]
    converged = (out_res <= atol + rtol * out_fnorm) & torch.isfinite(out_norms).all(0)
    if rows_converged is not None:  # every position met the rule (rows, not their sum)
        converged = rows_converged.all(1)
    if bool(out_nonfinite.any()):
        status = Status.NONFINITE
    elif bool(converged.all()):
        status = Status.CONVERGED
    else:
        status = Status.MAX_STEPS
    trace_abs = trace_rel = None
    if trace:
        S = int(out_steps.max())
        cols = torch.arange(S + 1, device=dev).unsqueeze(0)
        fill = torch.minimum(cols, row_steps.unsqueeze(1))  # repeat the last value after a stop
        filled = tr[:, :, : S + 1].gather(2, fill.expand(2, -1, -1))
        if causal:
            filled = safe_norm(filled.view(2, B // positions, positions, S + 1), 2)
        trace_abs = filled[0]
        trace_rel = torch.where(filled[0] == 0, 0.0, filled[0] / filled[1])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    stats = Stats(
        abs_residual=out_res,
        rel_residual=torch.where(out_res == 0, 0.0, out_res / out_fnorm),  # 0/0: f(z) = z = 0
        num_steps=out_steps,
        best_step=out_best,
        converged=converged,
        nonfinite=out_nonfinite,
        nfe=ev.nfe,
        sample_evals=ev.sample_evals // max(positions, 1),
        wall_time=time.perf_counter() - t0,
        buffer_bytes=buffer_bytes,
        trace=trace_abs,
        rel_trace=trace_rel,
    )
    return out_z, status, stats
