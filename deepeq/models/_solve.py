"""The equilibrium layer every registered DEQ model builds from its config's solver fields."""

from __future__ import annotations

from typing import Literal

from torch import nn

from .._fixed_point import check_causal_solver
from ..backward import ImplicitBackward, PhantomBackward, ReversibleBackward
from ..nn.deq import DEQ
from ..regularization.correction import FixedPointCorrection
from ..solvers import make_solver

BACKWARDS = ("implicit", "phantom", "reversible")
#: the solver names a model config accepts (deepeq.SOLVERS)
SolverName = Literal["picard", "anderson", "broyden", "reversible"]


def check_solve_fields(c, causal: bool = False) -> None:
    """The checks of a model config's solver fields that involve more than one field (called by
    the configs' ``validate``, so they fail when a training config is loaded)."""
    if c.backward == "reversible" and c.solver != "reversible":
        raise ValueError(
            f"backward = 'reversible' undoes the iterations of solver = 'reversible'; got "
            f"solver = {c.solver!r}. Set solver = 'reversible' (its beta: beta), or another "
            f"backward ({', '.join(repr(b) for b in BACKWARDS[:2])})."
        )
    if not 0.0 < c.beta < 1.0:
        raise ValueError(f"beta must be in (0, 1); got {c.beta!r}.")
    if causal:
        check_causal_solver(make_solver(c.solver))


def config_deq(f: nn.Module, c) -> DEQ:
    """``DEQ(f)`` with the config's forward (train/eval caps) solvers and its backward:
    ``backward="implicit"`` (the implicit-function gradient, solved by ``b_solver`` to ``b_rtol``
    within ``b_max_steps``, started at ``b_init``: ``"v"`` = dL/dz*, or ``"shine"`` = the forward
    Broyden solver's inverse-Jacobian estimate; ``b_max_steps=0``: no backward iterations, the
    start is the gradient — ``"v"`` the Jacobian-free one, ``"shine"`` SHINE) or ``"phantom"``
    (``phantom_steps`` differentiable applications of f from z*, Geng et al. 2021; ``phantom_steps=1`` is the Jacobian-free gradient) or ``"reversible"`` (the exact
    gradient of the iterate ``solver="reversible"`` returns, its β = ``beta``); ``solve_dtype``
    (``"bfloat16"``) runs the training solves' iterations of f under autocast. Non-finite
    solves are returned (the training loop's guard skips them)."""
    if c.backward == "implicit":
        if (
            not isinstance(c.b_max_steps, int)
            or isinstance(c.b_max_steps, bool)
            or c.b_max_steps < 0
        ):
            raise ValueError(
                f"b_max_steps must be an int >= 0 (0: no backward iterations); got {c.b_max_steps!r}."
            )
        b_solver = (
            make_solver(c.b_solver, rtol=c.b_rtol, max_steps=c.b_max_steps)
            if c.b_max_steps > 0
            else None
        )
        backward = ImplicitBackward(solver=b_solver, init=c.b_init)
    elif c.backward == "phantom":
        backward = PhantomBackward(steps=c.phantom_steps)
    elif c.backward == "reversible":
        check_solve_fields(c)
        backward = ReversibleBackward()
    else:
        raise ValueError(f"backward must be one of {list(BACKWARDS)}; got {c.backward!r}.")
    extra = {"beta": c.beta} if c.solver == "reversible" else {}
    return DEQ(
        f,
        solver=make_solver(c.solver, rtol=c.f_rtol, max_steps=c.f_max_steps, **extra),
        eval_solver=make_solver(
            c.solver,
            rtol=c.f_rtol if c.eval_rtol is None else c.eval_rtol,
            max_steps=c.eval_max_steps,
            **extra,
        ),
        backward=backward,
        nonfinite="return",
        solve_dtype=getattr(c, "solve_dtype", None),
        causal=getattr(c, "causal_solve", False),
        correction=FixedPointCorrection(
            steps=c.correction_steps,
            gamma=c.correction_gamma,
            mode=c.correction_mode,
            positions=getattr(c, "correction_positions", 1.0),
        )
        if c.correction_steps
        else None,
    )
