"""The equilibrium layer every registered DEQ model builds from its config's solver fields."""

from __future__ import annotations

from torch import nn

from ..backward import ImplicitBackward
from ..nn.deq import DEQ
from ..solvers import make_solver


def config_deq(f: nn.Module, c) -> DEQ:
    """``DEQ(f)`` with the config's forward (train/eval caps) and implicit-backward solvers;
    non-finite solves are returned (the training loop's guard skips them)."""
    return DEQ(
        f,
        solver=make_solver(c.solver, rtol=c.f_rtol, max_steps=c.f_max_steps),
        eval_solver=make_solver(c.solver, rtol=c.f_rtol, max_steps=c.eval_max_steps),
        backward=ImplicitBackward(
            solver=make_solver(c.b_solver, rtol=c.b_rtol, max_steps=c.b_max_steps)
        ),
        nonfinite="return",
    )
