"""The backward-rule protocol."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._problem import Problem
    from .._solution import Solution
    from ..solvers import AbstractSolver


class AbstractBackward(abc.ABC):
    """How gradients flow through a fixed-point solve. Concrete rules are frozen dataclasses
    holding options only; ``deepeq.fixed_point`` calls ``apply`` when autograd is
    recording."""

    @abc.abstractmethod
    def apply(self, problem: Problem) -> Solution:
        """Run the forward solve (``problem.solve()``) and return a Solution whose value is wired
        into autograd by this rule. ``problem.call(z)`` evaluates f on the full flat batch."""

    @staticmethod
    def check(value: object, what: str) -> None:
        """The one check that ``value`` is a backward rule (``what``: the argument's name)."""
        if not isinstance(value, AbstractBackward):
            raise TypeError(
                f"{what} must be a deepeq backward rule such as deepeq.ImplicitBackward(); got "
                f"{type(value).__name__}."
            )

    def check_forward_solver(self, solver: AbstractSolver) -> None:  # noqa: B027 (optional hook)
        """Raise if this rule cannot follow a forward solve by ``solver`` (called by
        ``deepeq.DEQ`` at construction and by ``apply``); the default accepts any."""
