"""``SolveSpec``: how a DEQ model finds and differentiates its equilibrium, as one frozen value
nested in every DEQ model config (``config.solve``). Its fields are the config's words (TOML);
``policy`` is the ``deepeq.nn.SolvePolicy`` they name, built and checked once when the spec is
made, and ``solve(f, x, z0, training=...)`` applies it to a layer.

Variants are derived, never made by mutating a model: ``model.with_solve(dataclasses.replace(
spec, eval_max_steps=60))`` is the same model with another evaluation cap; a model with
another spec is ``create_model(name, solve=dict(f_rtol=1e-2))`` (a dict is merged into the
model's own spec; a ``SolveSpec`` replaces it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from .._solution import Solution
from .._types import State
from ..backward import AbstractBackward, ImplicitBackward, PhantomBackward, ReversibleBackward
from ..nn.deq import DEQ, SolvePolicy
from ..regularization.correction import FixedPointCorrection
from ..solvers import AbstractSolver, make_solver

BACKWARDS = ("implicit", "phantom", "reversible")
#: the solver names a solve spec accepts (deepeq.SOLVERS)
SolverName = Literal["picard", "anderson", "broyden", "reversible"]

#: field names of model configs written before the solve spec (flat in ``model.overrides``)
#: -> their name in ``model.overrides.solve``; used to read older run directories
LEGACY_KEYS = {
    **{
        k: k
        for k in (
            "solver", "f_max_steps", "f_rtol", "eval_max_steps", "eval_rtol", "b_solver",
            "b_max_steps", "b_rtol", "b_init", "backward", "phantom_steps", "beta",
            "correction_steps", "correction_gamma", "correction_mode", "correction_positions",
        )
    },
    "solve_dtype": "dtype",
    "causal_solve": "causal",
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class SolveSpec:
    """The forward solver (training and evaluation), the backward rule and the solves' dtype.

    Args:
        solver: forward solver by name (``deepeq.SOLVERS``), in training and evaluation.
        f_max_steps, f_rtol: the forward solver's cap and relative tolerance in training.
        eval_max_steps, eval_rtol: the same at evaluation (``eval_rtol`` None: ``f_rtol``).
        beta: β of ``solver="reversible"`` (each of its steps costs two calls of f).
        backward: ``"implicit"`` (the implicit-function gradient, solved by ``b_solver`` to
            ``b_rtol`` within ``b_max_steps``, started at ``b_init``: ``"v"`` = dL/dz*, or
            ``"shine"`` = the forward Broyden solver's inverse-Jacobian estimate;
            ``b_max_steps=0``: no backward iterations — ``"v"`` is then the Jacobian-free
            gradient, ``"shine"`` SHINE), ``"phantom"`` (``phantom_steps`` differentiable
            applications of f from z*, Geng et al. 2021) or ``"reversible"`` (the exact gradient
            of the iterate ``solver="reversible"`` returns).
        b_solver, b_max_steps, b_rtol, b_init: the implicit backward's solver (by name), cap,
            relative tolerance and start (see ``backward``).
        phantom_steps: k of ``backward="phantom"``.
        dtype: run f in this autocast dtype during the training solves' iterations (the tracked
            call at z*, the backward and evaluation stay in full precision).
        causal: per-position stopping, freezing and solver mixing (``fixed_point(causal=True)``),
            for sequence models: no output depends on later tokens whatever the tolerance or cap.
        correction_steps, correction_gamma, correction_mode, correction_positions: fixed-point
            correction (``deepeq.FixedPointCorrection``: steps, gamma, mode, positions);
            ``correction_steps=0``: off.

    Raises:
        ValueError: a value out of range or a combination that cannot work (e.g. ``backward=
            "reversible"`` without ``solver="reversible"``), naming the field.
    """

    solver: SolverName = "anderson"
    f_max_steps: int = 30
    f_rtol: float = 1e-3
    eval_max_steps: int = 40
    eval_rtol: float | None = None
    beta: float = 0.5
    backward: Literal["implicit", "phantom", "reversible"] = "implicit"
    b_solver: SolverName = "anderson"
    b_max_steps: int = 30
    b_rtol: float = 1e-4
    b_init: Literal["v", "shine"] = "v"
    phantom_steps: int = 1
    dtype: Literal["bfloat16", "float16"] | None = None
    causal: bool = False
    correction_steps: int = 0
    correction_gamma: float = 0.8
    correction_mode: Literal["uniform", "random"] = "uniform"
    correction_positions: float = 1.0

    def __post_init__(self) -> None:
        b = self.b_max_steps
        if isinstance(b, bool) or not isinstance(b, int) or b < 0:
            raise ValueError(
                f"solve.b_max_steps must be an int >= 0 (0: no backward iterations); got {b!r}."
            )
        p = self.phantom_steps
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"solve.phantom_steps must be an int >= 1; got {p!r}.")
        if (
            isinstance(self.beta, bool)
            or not isinstance(self.beta, int | float)
            or not (0.0 < self.beta < 1.0 and math.isfinite(self.beta))
        ):
            raise ValueError(f"solve.beta must be in (0, 1); got {self.beta!r}.")
        if self.backward == "reversible" and self.solver != "reversible":
            raise ValueError(
                f"solve.backward = 'reversible' undoes the iterations of solve.solver = "
                f"'reversible'; got solve.solver = {self.solver!r}. Set solve.solver = "
                f"'reversible' (its β: solve.beta), or another backward "
                f"({', '.join(repr(b) for b in BACKWARDS[:2])})."
            )
        # the solver, backward and correction objects check their own values; built once here,
        # so that a bad spec fails when it is made, naming its fields, and kept as the policy
        built = {}
        for key, names, build in (
            ("solver", "f_max_steps / f_rtol", self._forward_solver),
            ("eval_solver", "eval_max_steps / eval_rtol", self._eval_solver),
            ("backward", "backward / b_solver / b_max_steps / b_rtol / b_init / phantom_steps",
             self._backward_rule),
            ("correction", "correction_*", self._correction),
        ):  # fmt: skip
            try:
                built[key] = build()
            except ValueError as e:
                raise ValueError(f"solve ({names}): {e}") from None
        # non-finite solves are returned (the training loop's guard skips them); the policy
        # checks the combinations (e.g. SHINE needs Broyden, a causal solve no Broyden)
        policy = SolvePolicy(
            **built, nonfinite="return", solve_dtype=self.dtype, causal=self.causal
        )
        object.__setattr__(self, "_policy", policy)  # not a field: not in eq, repr or TOML

    @property
    def policy(self) -> SolvePolicy:
        """The solve policy this spec names (``deepeq.nn.SolvePolicy``), built once."""
        return self._policy

    def solve(self, f: nn.Module, x: Any, z0: State, **kw: Any) -> tuple[State, Solution]:
        """``z* = f(z*, x)`` from ``z0`` by this spec's policy: ``SolvePolicy.solve`` (keywords
        ``training``, ``cache``, ``cache_keys``)."""
        return self._policy.solve(f, x, z0, **kw)

    # --- the objects the fields name (built once, by __post_init__) -------------------------
    def _forward_solver(self) -> AbstractSolver:
        return make_solver(
            self.solver, rtol=self.f_rtol, max_steps=self.f_max_steps, **self._extra()
        )

    def _eval_solver(self) -> AbstractSolver:
        rtol = self.f_rtol if self.eval_rtol is None else self.eval_rtol
        return make_solver(self.solver, rtol=rtol, max_steps=self.eval_max_steps, **self._extra())

    def _backward_rule(self) -> AbstractBackward:
        if self.backward == "phantom":
            return PhantomBackward(steps=self.phantom_steps)
        if self.backward == "reversible":
            return ReversibleBackward()
        b = (
            make_solver(self.b_solver, rtol=self.b_rtol, max_steps=self.b_max_steps)
            if self.b_max_steps > 0
            else None
        )
        return ImplicitBackward(solver=b, init=self.b_init)

    def _correction(self) -> FixedPointCorrection | None:
        fpc = FixedPointCorrection(
            steps=self.correction_steps,
            gamma=self.correction_gamma,
            mode=self.correction_mode,
            positions=self.correction_positions,
        )
        return fpc if fpc.steps else None

    def build(self, f: nn.Module) -> DEQ:
        """A ``deepeq.DEQ`` layer over ``f`` with this spec's policy (the registered models
        apply ``solve`` to their own f instead)."""
        deq = DEQ(f)
        deq.policy = self._policy
        return deq

    def _extra(self) -> dict:
        return {"beta": self.beta} if self.solver == "reversible" else {}
