"""``Problem``: one validated fixed-point problem, the value ``deepeq.fixed_point`` hands to a
backward rule. Its own module, so that ``backward/`` depends on it and not on ``_fixed_point``
(which depends on ``backward/``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._driver import DriverOptions, DriverResult, solve
from ._flatten import Layout, check_output, flatten, unflatten
from ._solution import Solution, Stats, Status
from ._types import FixedPointFn


@dataclass(frozen=True, kw_only=True, eq=False)
class Problem:
    """One validated fixed-point problem (``deepeq.fixed_point`` checked its arguments), handed
    to a backward rule's ``apply``: the rule calls ``solve`` (the driver loop on flat states),
    ``call`` (f on flat states) and ``finish`` (the ``Solution``). Build it with ``create``.

    ``z0``: the flat start ``(B, D)``, detached; ``z0_tracked``: the same as given (for
    ``UnrolledBackward``: gradients reach z0). ``iterate_f``: what the forward solver calls (f,
    or f under autocast for ``solve_dtype``); ``positions`` > 0: causal solving over this many
    positions (dim 1 of z0); ``keep``: solver steps whose iterates the solve returns
    (``DriverResult.iterates``) and ``finish`` turns into the solution's fixed-point-correction
    trajectory."""

    f: FixedPointFn
    iterate_f: FixedPointFn
    solver: Any
    layout: Layout
    args: tuple
    z0: Tensor
    z0_tracked: Tensor
    independent: bool = True
    throw: bool = False
    nonfinite: str = "raise"
    trace: bool = False
    positions: int = 0
    keep: tuple[int, ...] = ()
    compaction: str = "auto"

    @classmethod
    def create(
        cls, *, f: FixedPointFn, z0, layout: Layout, iterate_f: FixedPointFn | None = None,
        keep: tuple[int, ...] = (), **fields: Any,
    ) -> Problem:  # fmt: skip
        """The problem of state ``z0`` (any structure ``layout`` describes), flattened once."""
        z0_tracked = flatten(z0, layout)
        return cls(
            f=f, iterate_f=f if iterate_f is None else iterate_f, layout=layout,
            z0=z0_tracked.detach(), z0_tracked=z0_tracked, keep=tuple(keep), **fields,
        )  # fmt: skip

    def solve(
        self,
        *,
        state: bool = False,
        snapshot_every: int = 0,
        min_steps: int = 0,
        track_z0: bool = False,
    ) -> DriverResult:
        """Run the solver (recording autograd only if grad mode is on) -> ``DriverResult`` (flat
        z*, status, stats; ``state``: ``final``, what the solver hands out of its state, the step
        count and the non-finite flag of every row at its last step, rows being samples or
        (sample, position) pairs in causal solving, with snapshots every ``snapshot_every``
        steps; ``iterates``: the ``keep`` steps' iterates).
        ``min_steps``: no sample stops before this step; ``track_z0``: start from z0 as given
        (not detached), so that a recorded graph reaches it."""
        z0 = self.z0_tracked if track_z0 else self.z0
        opts = DriverOptions(
            independent=self.independent, nonfinite=self.nonfinite, trace=self.trace,
            min_steps=min_steps, keep=self.keep, state=state,
            snapshot_every=snapshot_every, compaction=self.compaction,
            verify=None if self.iterate_f is self.f else self.f,
        )  # fmt: skip
        if not self.positions:
            return solve(self.iterate_f, z0, self.solver, self.layout, self.args, opts)
        # Causal solving: the driver sees one row per (sample, position); f runs on the batch.
        B, T, layout, args = self.layout.batch, self.positions, self.layout, self.args
        d = layout.dim // T
        rows = Layout(Tensor, ((d,),), (d,), B * T, layout.dtype, layout.device)

        def by_rows(f: FixedPointFn):
            def f_rows(zr: Tensor) -> Tensor:
                out = f(unflatten(zr.reshape(B, T * d), layout), *args)
                check_output(out, layout, B)
                return out.reshape(B * T, d)

            return f_rows

        opts = dataclasses.replace(
            opts, independent=False, coupled=False, positions=T,
            verify=None if opts.verify is None else by_rows(opts.verify),
        )  # fmt: skip
        r = solve(by_rows(self.iterate_f), z0.reshape(B * T, d), self.solver, rows, (), opts)
        if r.iterates:
            r.iterates = {s: v.reshape(B, T * d) for s, v in r.iterates.items()}
        r.z = r.z.reshape(B, T * d)
        return r

    def call(self, z: Tensor) -> Tensor:
        """``f`` on the full batch of flat ``z`` (B, D) -> flat ``f(z)`` in z0's dtype."""
        out = self.f(unflatten(z, self.layout), *self.args)
        check_output(out, self.layout, self.layout.batch)
        return flatten(out, self.layout).to(self.layout.dtype)

    def finish(
        self, value: Tensor, status: Status, stats: Stats, *,
        iterates: dict[int, Tensor] | None = None, **extra: Any,
    ) -> Solution:  # fmt: skip
        """The ``Solution`` of flat ``value``; with ``keep`` steps, ``iterates`` (the solve's
        ``DriverResult.iterates``) become its trajectory: ``f(z_s)`` for each kept step s, one
        tracked call of f each (a one-step gradient from the detached iterate)."""
        sol = Solution(value=unflatten(value, self.layout), status=status, stats=stats, **extra)
        if self.throw and status is Status.MAX_STEPS:
            sol.raise_for_status()
        if self.keep and iterates:
            with torch.enable_grad():
                traj = tuple(unflatten(self.call(iterates[s]), self.layout) for s in self.keep)
            sol = dataclasses.replace(sol, trajectory=traj, trajectory_steps=self.keep)
        return sol
