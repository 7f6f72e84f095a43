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
    ):
        self.f, self.layout, self.independent = f, layout, independent
        self.args = args  # sliced to the active rows when independent
        self.full_args = args
        self.active = torch.arange(layout.batch, device=layout.device)  # original sample ids
        self.full_z = z.clone() if not independent else None  # frozen rows keep their value
        self.hold: Tensor | None = None  # rows f must see at their full_z value (causal solving)
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

    def call_with(self, f: FixedPointFn, z: Tensor, rows: Tensor) -> Tensor:
        """Another map (f at full precision) at rows ``rows`` of the active set, counted in nfe."""
        own, self.f = self.f, f
        try:
            return self(z, rows)
        finally:
            self.f = own

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
    ``state``: return what the solver hands out of its state (``AbstractSolver.final_state``)
    for every row at its last step, with the step counts and non-finite flags
    (``DriverResult.final``): the caller takes what it needs (SHINE the inverse estimate, the
    reversible backward the chains); ``snapshot_every`` = C > 0 adds snapshots at the steps
    that are multiples of C.
    ``compaction``: when stopped samples leave the solver's arrays: ``"auto"`` (at once on CPU,
    in batches of at least a quarter of the rows on accelerators), ``"eager"`` (at once) or
    ``"lazy"`` (in batches); the solve is the same to float rounding, only the cost differs.
    ``verify``: f at full precision when the solver's f runs in a lower one (``solve_dtype``):
    every row's norms are recomputed with it at the iterate it returns before the row stops
    (a low-precision residual below the precision's round-off means nothing), and a row that
    then misses the tolerance goes on, the solve continuing with ``verify`` as its map
    (``switch``; not for causal solving, where the switch would depend on later positions,
    nor for solvers that return their last iterate, whose reversal replays one map)."""

    independent: bool = True
    nonfinite: Literal["raise", "return"] = "raise"
    trace: bool = False
    coupled: bool | None = None
    min_steps: int = 0
    positions: int = 0
    keep: tuple[int, ...] = ()
    state: bool = False
    snapshot_every: int = 0
    compaction: Literal["auto", "eager", "lazy"] = "auto"
    verify: Any = None

    def __post_init__(self) -> None:
        if self.compaction not in ("auto", "eager", "lazy"):
            raise ValueError(
                f"compaction must be 'auto', 'eager' or 'lazy'; got {self.compaction!r}."
            )
        if self.nonfinite not in ("raise", "return"):
            raise ValueError(f"nonfinite must be 'raise' or 'return'; got {self.nonfinite!r}.")
        if self.positions and (self.independent or self.coupled):
            raise ValueError(
                "causal solving evaluates f on the full batch: independent=False, coupled=False"
            )


@dataclass
class FinalState:
    """Per row (sample, or (sample, position) in causal solving) at its last step: the solver's
    ``AbstractSolver.final_state`` (a tuple of full-batch tensors, zero-padded where rows
    stopped with fewer entries, or None for solvers that hand out nothing), the step count and
    the non-finite flag, before any per-sample aggregation; and,
    with ``snapshot_every`` = C, ``(k, rows, state)`` for every step k that is a multiple of C
    (the solver state of the rows still moving then)."""

    state: tuple[Tensor, ...] | None
    steps: Tensor
    nonfinite: Tensor
    snapshots: list = field(default_factory=list)


@dataclass
class DriverResult:
    """What ``solve`` returns: the flat ``z*`` (B, D), the status and stats, and what the
    options asked for: ``final`` (``FinalState``: the solver's final state per row),
    ``iterates`` (step -> full-batch iterate ``(B, D)``, detached; samples stopped earlier:
    their returned value)."""

    z: Tensor
    status: Status
    stats: Stats
    final: FinalState | None = None
    iterates: dict[int, Tensor] | None = None


def solve(f, z, solver, layout, args, options: DriverOptions = DriverOptions()) -> DriverResult:
    """The driver loop on flat ``z`` (B, D) under ``options`` (``DriverOptions``).

    Each step the solver moves the active rows; ``_StoppingRule`` decides which rows stop,
    ``_BestIterate`` keeps the iterate each row will return, ``_Outputs`` receives a row's
    results when it stops, ``_Extras`` what the options ask for beyond z*, and ``_drop``
    compacts stopped rows out of the solver's arrays.

    Causal solving (``options.positions``, see ``deepeq.fixed_point``): a row stops only when it
    meets the tolerance and every earlier row of its sample has stopped (the frozen rows form a
    growing prefix, whose values no later step changes), and each row returns its last finite
    iterate. f is evaluated on the full batch (``independent=False``); the returned stats are
    per sample.

    The solver's arithmetic runs outside any autocast region (its state stays in z's dtype); f
    runs inside the caller's."""
    o = options
    coupled = (not o.independent) if o.coupled is None else o.coupled
    autocast = _autocast_state(layout.device.type)
    if autocast is None:
        return _solve(f, z, solver, layout, args, o, coupled, autocast)
    with torch.autocast(layout.device.type, enabled=False):
        return _solve(f, z, solver, layout, args, o, coupled, autocast)


def _prefix(meet: Tensor, sample: Tensor) -> Tensor:
    """``meet`` restricted to each sample's leading run: row i is kept iff it and every earlier
    row of its sample (rows sorted by sample, then position) meet. ``sample`` is sorted."""
    fails = (~meet).to(torch.int64)
    before = fails.cumsum(0) - fails  # failures strictly before each row
    first = torch.ones_like(meet)
    first[1:] = sample[1:] != sample[:-1]
    group = first.cumsum(0) - 1  # 0, 1, ... per sample present
    return meet & (before == before[first][group])


class _StoppingRule:
    """The rule ``res <= atol + rtol ||f(z)||`` as ``key(norms) <= threshold``, with as few
    tensor ops as possible (per-op overhead dominates the loop when f is cheap). The key also
    ranks a row's iterates: the returned one minimises it. Coupled: every row's key is the
    batch's worst. Causal (``positions`` > 0): a row stops only with every earlier row of its
    sample (``restrict``)."""

    def __init__(self, atol: float, rtol: float, coupled: bool, positions: int, dtype):
        self.positions = positions
        if rtol == 0:
            self.threshold = atol

            def key(norms: Tensor) -> Tensor:
                return norms[0]
        elif atol == 0:
            self.threshold = rtol
            tiny = torch.finfo(dtype).tiny

            def key(norms: Tensor) -> Tensor:  # 0/0 (z = f(z) = 0) is converged, not NaN
                return norms[0] / norms[1].clamp_min(tiny)
        else:
            self.threshold = 1.0

            def key(norms: Tensor) -> Tensor:
                return norms[0] / (norms[1] * rtol + atol)

        if coupled:

            def worst(norms: Tensor) -> Tensor:  # the batch is one problem: its worst sample
                k = key(norms)
                return k.amax().expand_as(k)

            self.key = worst
        else:
            self.key = key

    def restrict(self, meet: Tensor, active: Tensor) -> Tensor:
        """``meet`` cut to each sample's leading run of rows (causal solving), else itself."""
        return _prefix(meet, active // self.positions) if self.positions else meet

    def candidates(self, key: Tensor, frozen: Tensor | None, active: Tensor) -> Tensor:
        """Rows that may stop at this step. NaN/inf keys count as stopping (mapped to 0): the
        exact reason is sorted out by the caller, only on the (rare) steps where a row stops,
        so this costs one host synchronisation per step."""
        stop = torch.nan_to_num(key, 0.0, 0.0) <= self.threshold
        if self.positions:  # frozen rows count as met; NaN rows (0 here) are inspected anyway
            met = stop if frozen is None else stop | frozen
            stop = self.restrict(met, active) | torch.isnan(key)
        if frozen is not None:
            stop &= ~frozen
        return stop


class _BestIterate:
    """Per active row, the iterate it would return now, with its norms, key and step: the
    lowest key so far, or with ``last`` the last finite iterate (causal solving: another step's
    iterate of a row saw other values of the rows before it, so its recorded residual would
    not be that of the returned state; solvers whose state must match the returned iterate,
    like Reversible). Compacted together with the solver state."""

    def __init__(self, z: Tensor, norms: Tensor, key: Tensor, min_steps: int, last: bool):
        self.z, self.norms, self.key = z, norms, key
        self.start = norms  # step 0's norms: what ``progress`` compares with
        if min_steps > 0:  # step 0 is never returned: the first step replaces it
            self.key = torch.full_like(key, float("inf"))
        self.step = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        self.last, self.on_cpu = last, z.device.type == "cpu"

    def progress(self, coupled: bool, positions: int) -> Tensor:
        """Per row: may its iterate count as converged? Not when its residual did not fall from
        step 0's while ``||f(z)||`` grew: a relative rule is then met only because the iterate
        runs away (``f(z) = z + c`` has no fixed point, yet ``||c|| / ||f(z_k)||`` -> 0)."""
        return _progress(self.norms, self.start, self.step, self.z.dtype, coupled, positions)

    def update(self, k: int, z: Tensor, norms: Tensor, key: Tensor) -> None:
        better = torch.isfinite(key) if self.last else key < self.key  # NaN never improves
        if self.on_cpu and bool(better.all()):
            # Common case, cheap to detect on CPU (no device to wait for): no masking needed.
            self.z, self.norms, self.key = z, norms, key
            self.step = self.step.fill_(k)
        else:
            self.z = torch.where(better.unsqueeze(1), z, self.z)
            self.norms = torch.where(better, norms, self.norms)
            self.key = torch.where(better, key, self.key)
            self.step = torch.where(better, k, self.step)

    def compact(self, keep: Tensor) -> None:
        self.z, self.norms, self.start = self.z[keep], self.norms[:, keep], self.start[:, keep]
        self.key, self.step = self.key[keep], self.step[keep]


def _progress(norms, start, step, dtype: torch.dtype, coupled: bool, positions: int) -> Tensor:
    """``step == 0``, or ``||f(z)||`` did not grow, or the residual fell below step 0's by more
    than the round-off of ``f(z) - z`` at the iterate's scale (``16 ε ||f(z)||``; far from the
    origin ``z + c`` rounds to ``z`` and the residual to 0). Norms over the problem a row
    belongs to: the batch when coupled, the positions up to the row's in causal solving (a
    position may start at its own fixed point and move with the ones before it)."""
    norms, start = _scope(norms, coupled, positions), _scope(start, coupled, positions)
    slack = 16 * torch.finfo(dtype).eps * norms[1]
    return (step == 0) | (norms[1] <= start[1]) | (norms[0] < start[0] - slack)


def _scope(norms: Tensor, coupled: bool, positions: int) -> Tensor:
    """``(2, rows)`` norms of each row's problem (see ``_progress``)."""
    if coupled:
        return safe_norm(norms, 1).unsqueeze(1).expand_as(norms)
    if positions:
        sq = norms.view(2, -1, positions).square().cumsum(2)
        return sq.sqrt().view_as(norms)
    return norms


class _Outputs:
    """Full-batch results, written when a row leaves the active set, and the residual trace."""

    def __init__(self, z: Tensor, norms: Tensor, max_steps: int, trace: bool):
        B, dev = z.shape[0], z.device
        self.z, self.norms = torch.empty_like(z), torch.empty_like(norms)
        self.start = torch.empty_like(norms)
        self.steps = torch.zeros(B, dtype=torch.long, device=dev)
        self.best = torch.zeros(B, dtype=torch.long, device=dev)
        self.nonfinite = torch.zeros(B, dtype=torch.bool, device=dev)
        self.trace = (
            torch.full((2, B, max_steps + 1), float("nan"), dtype=norms.dtype, device=dev)
            if trace
            else None
        )

    def record(self, idx: Tensor, ids: Tensor, best: _BestIterate, k: int, bad: Tensor) -> None:
        """Active rows ``idx`` (batch rows ``ids``) stop at step ``k``."""
        self.z[ids] = best.z[idx]
        self.norms[:, ids] = best.norms[:, idx].detach()
        self.start[:, ids] = best.start[:, idx].detach()
        self.best[ids] = best.step[idx]
        self.steps[ids] = k
        self.nonfinite[ids] = bad[idx]


class _Extras:
    """What the options ask for beyond z*: the iterates at the ``keep`` steps, the solver's
    final state of each row at its last step, and state snapshots."""

    def __init__(self, o: DriverOptions):
        self.iterates = {s: None for s in o.keep} if o.keep else None
        self.final = [] if o.state else None  # (ids, state) per stopping step
        self.every = o.snapshot_every if o.state else 0
        self.snapshots: list = []
        self.per_step = self.iterates is not None or self.every > 0  # anything for ``step``

    def step(self, k, z, frozen, active, solver, state, out_z) -> None:
        if self.iterates is not None and k in self.iterates:
            moving = active if frozen is None else active[~frozen]
            now = z if frozen is None else z[~frozen]
            self.iterates[k] = out_z.detach().index_copy(0, moving, now.detach())
        if self.every and k > 0 and k % self.every == 0:  # solver-state snapshots (Reversible)
            rows = (
                torch.arange(z.shape[0], device=z.device)
                if frozen is None
                else (~frozen).nonzero()[:, 0]
            )
            parts = solver.final_state(state, rows)
            if parts is not None:
                snap = tuple(t.detach().clone() for t in parts)
                self.snapshots.append((k, active[rows].clone(), snap))

    def stop(self, solver, state, idx: Tensor, ids: Tensor) -> None:
        if self.final is not None:
            parts = solver.final_state(state, idx)
            if parts is not None:
                self.final.append((ids, tuple(t.detach() for t in parts)))

    def results(self, out: _Outputs):
        """``(final, iterates)`` as ``DriverResult`` holds them."""
        B = out.z.shape[0]
        final = None
        if self.final is not None:  # per row, before any per-sample aggregation
            state = None
            if self.final:  # full-batch tensors, each as large as the largest chunk (zero-padded)
                first = self.final[0][1]
                sizes = [
                    [max(ts[i].shape[d] for _, ts in self.final) for d in range(1, t.dim())]
                    for i, t in enumerate(first)
                ]
                state = tuple(t.new_zeros(B, *size) for t, size in zip(first, sizes, strict=True))
                for ids, ts in self.final:
                    for o, t in zip(state, ts, strict=True):
                        o[(ids, *(slice(0, n) for n in t.shape[1:]))] = t
            final = FinalState(state, out.steps.clone(), out.nonfinite.clone(), self.snapshots)
        if self.iterates is not None:
            for s in self.iterates:
                if self.iterates[s] is None:  # the solve stopped before this step
                    self.iterates[s] = out.z.detach()
        return final, self.iterates


def _solve(f, z, solver, layout, args, o: DriverOptions, coupled: bool, autocast) -> DriverResult:
    t0 = time.perf_counter()
    finite0 = torch.isfinite(z).all(1)
    if not bool(finite0.all()):
        bad = (~finite0).nonzero().flatten().tolist()
        raise ValueError(f"z0 contains non-finite values (inf/nan) for samples {bad[:10]}.")
    grad, max_steps, causal = torch.is_grad_enabled(), solver.max_steps, o.positions > 0
    ev = _Evaluator(f, layout, args, o.independent, z, autocast)
    verify, switch = o.verify, not causal and not solver.returns_last
    fz = ev(z)
    norms = _norms(z.detach(), fz.detach())  # (2, b): residual, ||f(z)||
    rule = _StoppingRule(solver.atol, solver.rtol, coupled, o.positions, norms.dtype)
    key = rule.key(norms)
    best = _BestIterate(z, norms, key, o.min_steps, last=causal or solver.returns_last)
    out, extras = _Outputs(z, norms, max_steps, o.trace), _Extras(o)
    state = solver.init(ev, z, fz, positions=o.positions, coupled=coupled)
    buffer_bytes = sum(t.numel() * t.element_size() for t in state if isinstance(t, Tensor))
    lazy = o.independent and (
        layout.device.type != "cpu" if o.compaction == "auto" else o.compaction == "lazy"
    )
    frozen: Tensor | None = None  # stopped rows not yet compacted away (lazy mode, causal)
    k = 0
    while True:
        if out.trace is not None:
            out.trace[:, ev.active, k] = norms
        if extras.per_step:
            extras.step(k, z, frozen, ev.active, solver, state, out.z)
        stop = rule.candidates(key, frozen, ev.active)
        if k >= max_steps or (k >= o.min_steps and bool(stop.any())):
            bad = ~torch.isfinite(norms).all(0)
            done = _done(rule, best, bad, frozen, ev.active, coupled, k >= max_steps)
            if frozen is not None:  # already recorded; they only await compaction
                bad &= ~frozen
                done &= ~frozen
            if verify is not None and bool((done & ~bad).any()):
                # Low-precision iterations: judge the rows about to stop at full precision.
                check = (done & ~bad).nonzero().squeeze(1)
                zc = best.z[check]
                nc = _norms(zc, ev.call_with(verify, zc, check))
                best.norms = best.norms.index_copy(1, check, nc)
                best.key = best.key.index_copy(0, check, rule.key(nc))
                if k < max_steps:
                    was = done
                    done = _done(rule, best, bad, frozen, ev.active, coupled, False)
                    if frozen is not None:
                        done &= ~frozen
                    if switch and bool((was & ~done).any()):
                        # The low precision cannot resolve the tolerance: go on at full
                        # precision, ranking only full-precision iterates from here on.
                        ev.f, verify = verify, None
                        best.key = torch.where(was, best.key, float("inf"))
            if o.nonfinite == "raise" and bool(bad.any()):
                ids = ev.active[bad].tolist()
                raise FloatingPointError(
                    f"f produced non-finite values (inf/nan) at step {k} for sample(s) {ids[:10]}"
                    f" (solver {type(solver).__name__}). Check f for overflow or divergence "
                    f"(e.g. lower the learning rate, add normalisation or damping), or pass "
                    f"nonfinite='return' to get Status.NONFINITE with the last finite iterate."
                )
            idx = done.nonzero().squeeze(1)
            ids = ev.active[idx]
            out.record(idx, ids, best, k, bad)
            extras.stop(solver, state, idx, ids)
            if ev.full_z is not None:
                ev.full_z = ev.full_z.index_copy(0, ids, best.z[idx])
            gone = done if frozen is None else done | frozen
            keep = (~gone).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            z, fz, state, frozen = _drop(keep, gone, z, fz, state, solver, ev, best,
                                         lazy=lazy, causal=causal)  # fmt: skip
        k += 1
        z, fz, state = solver.step(ev, z, fz, state)
        norms = _norms(z.detach(), fz.detach()) if grad else _norms(z, fz)
        key = rule.key(norms)
        best.update(k, z, norms, key)
    final, iterates = extras.results(out)
    status, stats = _summarise(out, ev, solver, coupled, o.positions, t0, buffer_bytes)
    return DriverResult(out.z, status, stats, final=final, iterates=iterates)


def _done(rule, best, bad, frozen, active, coupled: bool, at_cap: bool) -> Tensor:
    """Rows that stop now: non-finite ones, and those whose returned iterate meets the rule
    with progress (``_BestIterate.progress``), cut to a prefix in causal solving; every row at
    the cap. Coupled: all rows or none."""
    if at_cap:
        return torch.ones_like(bad)
    met = (best.key <= rule.threshold) & best.progress(coupled, rule.positions)
    if coupled:
        met = met.all().expand_as(met)
    met = met | bad
    return bad | rule.restrict(met if frozen is None else met | frozen, active)


def _drop(keep, gone, z, fz, state, solver, ev, best, *, lazy: bool, causal: bool):
    """Stopped rows leave the active set: compacted out of every per-row array at once, or
    (on an accelerator, where every gather is a kernel launch and compute does not fall with
    fewer rows until many are gone) only marked frozen, their results already recorded, until
    a quarter of the rows have stopped. Causal solving never compacts: the solver's per-row
    arithmetic then runs on tensors of one shape whatever the other rows do (a row count that
    changes with later positions would change kernels, float rounding, and so the earlier
    outputs). ``keep``: the indices of the rows not ``gone``. Returns
    ``(z, fz, state, frozen)``."""
    if not causal and (not lazy or keep.numel() <= 0.75 * gone.numel()):
        best.compact(keep)
        ev.set_active(keep)
        return z[keep], fz[keep], solver.compact(state, keep), None
    if causal:
        ev.hold = gone
    return z, fz, state, gone


def _relative(norms: Tensor) -> Tensor:
    """``||f(z) - z|| / ||f(z)||`` from ``_norms`` rows (0/0, f(z) = z = 0, is 0)."""
    return torch.where(norms[0] == 0, 0.0, norms[0] / norms[1])


def _summarise(out: _Outputs, ev, solver, coupled: bool, positions: int, t0, buffer_bytes):
    """The status and ``Stats`` of a finished solve, per sample (causal rows aggregated)."""
    atol, rtol = solver.atol, solver.rtol
    norms, steps, best, nonfinite = out.norms, out.steps, out.best, out.nonfinite
    B, dev = out.z.shape[0], out.z.device
    converged = (norms[0] <= atol + rtol * norms[1]) & torch.isfinite(norms).all(0)
    converged &= _progress(norms, out.start, best, out.z.dtype, coupled, positions)
    res, rel = norms[0], _relative(norms)
    if positions:  # per (sample, position) row -> per sample: every position met the rule,
        n = B // positions  # and the residuals reported are the worst position's
        converged = converged.view(n, positions).all(1)
        res, rel = res.view(n, positions).amax(1), rel.view(n, positions).amax(1)
        steps = steps.view(n, positions).amax(1)
        best = best.view(n, positions).amax(1)
        nonfinite = nonfinite.view(n, positions).any(1)
    if bool(nonfinite.any()):
        status = Status.NONFINITE
    elif bool(converged.all()):
        status = Status.CONVERGED
    else:
        status = Status.MAX_STEPS
    trace_abs = trace_rel = None
    if out.trace is not None:
        S = int(steps.max())
        cols = torch.arange(S + 1, device=dev).unsqueeze(0)
        fill = torch.minimum(cols, out.steps.unsqueeze(1))  # repeat the last value after a stop
        filled = out.trace[:, :, : S + 1].gather(2, fill.expand(2, -1, -1))
        trace_abs, trace_rel = filled[0], _relative(filled)
        if positions:
            trace_abs = trace_abs.view(B // positions, positions, S + 1).amax(1)
            trace_rel = trace_rel.view(B // positions, positions, S + 1).amax(1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    stats = Stats(
        abs_residual=res,
        rel_residual=rel,
        num_steps=steps,
        best_step=best,
        converged=converged,
        nonfinite=nonfinite,
        nfe=ev.nfe,
        sample_evals=ev.sample_evals // max(positions, 1),
        wall_time=time.perf_counter() - t0,
        buffer_bytes=buffer_bytes,
        trace=trace_abs,
        rel_trace=trace_rel,
    )
    return status, stats
