"""``Problem``: one validated fixed-point problem, the value ``deepeq.fixed_point`` hands to a
backward rule. Its own module, so that ``backward/`` depends on it and not on ``_fixed_point``
(which depends on ``backward/``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ._driver import DriverOptions, DriverResult, solve
from ._flatten import Layout, check_output, flatten, unflatten
from ._solution import Solution, Stats, Status
from ._types import FixedPointFn


class Problem:
    """One validated fixed-point problem (``deepeq.fixed_point`` checked its arguments), handed
    to a backward rule's ``apply``: the rule calls ``solve`` (the driver loop on flat states),
    ``call`` (f on flat states) and ``finish`` (the ``Solution``).

    ``iterate_f``: what the forward solver calls (default f; f under autocast for
    ``solve_dtype``); ``positions`` > 0: causal solving over this many positions (dim 1 of z0);
    ``keep``: solver steps whose iterates the solve returns (``DriverResult.iterates``) and
    ``finish`` turns into the solution's fixed-point-correction trajectory."""

    def __init__(
        self, *, f: FixedPointFn, z0, solver, layout: Layout, args: tuple, independent: bool,
        throw: bool, nonfinite: str, trace: bool, positions: int = 0,
        iterate_f: FixedPointFn | None = None, keep: tuple[int, ...] = (),
        compaction: str = "auto",
    ):  # fmt: skip
        self.f, self.solver, self.layout, self.args = f, solver, layout, args
        self.independent, self.throw, self.nonfinite, self.trace = (
            independent, throw, nonfinite, trace,
        )  # fmt: skip
        self.z0 = flatten(z0, layout).detach()
        self.z0_tracked = flatten(z0, layout)  # for UnrolledBackward: gradients reach z0
        self.iterate_f = f if iterate_f is None else iterate_f
        self.positions, self.compaction = positions, compaction
        self.keep: tuple[int, ...] = tuple(keep)

    def solve(
        self,
        *,
        inverse: bool = False,
        final: bool = False,
        snapshot_every: int = 0,
        min_steps: int = 0,
        track_z0: bool = False,
    ) -> DriverResult:
        """Run the solver (recording autograd only if grad mode is on) -> ``DriverResult`` (flat
        z*, status, stats; ``inverse``: the solver's inverse-Jacobian estimate, if it keeps one;
        ``final``: the solver state, step count and non-finite flag of every row at its last
        step, rows being samples or (sample, position) pairs in causal solving, with snapshots
        every ``snapshot_every`` steps; ``iterates``: the ``keep`` steps' iterates).
        ``min_steps``: no sample stops before this step; ``track_z0``: start from z0 as given
        (not detached), so that a recorded graph reaches it."""
        z0 = self.z0_tracked if track_z0 else self.z0
        opts = DriverOptions(
            independent=self.independent, nonfinite=self.nonfinite, trace=self.trace,
            min_steps=min_steps, keep=self.keep, inverse=inverse, final=final,
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
