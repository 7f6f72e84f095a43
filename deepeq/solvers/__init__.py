"""Fixed-point solvers and the string registry used by configs and the CLI."""

from __future__ import annotations

import dataclasses
from typing import Any

from ._anderson import Anderson as Anderson
from ._base import AbstractSolver as AbstractSolver
from ._broyden import Broyden as Broyden
from ._picard import Picard as Picard
from ._reversible import Reversible as Reversible

SOLVERS: dict[str, type[AbstractSolver]] = {
    "picard": Picard,
    "anderson": Anderson,
    "broyden": Broyden,
    "reversible": Reversible,
}


def make_solver(name: str, **hyperparams: Any) -> AbstractSolver:
    """Build a solver from its registry name (for configs and the CLI; Python code passes objects).

    Args:
        name: one of ``"picard"``, ``"anderson"``, ``"broyden"``, ``"reversible"``.
        **hyperparams: fields of that solver's dataclass.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
        TypeError: unknown hyper-parameter (the message lists the valid ones).

    Examples:
        >>> make_solver("anderson", history_length=6, max_steps=40)
        Anderson(atol=0.0, rtol=0.001, max_steps=40, history_length=6, ridge=0.0001, damping=0.0, max_weight=10000.0)
    """
    try:
        cls = SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown solver {name!r}; expected one of {sorted(SOLVERS)}.") from None
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(hyperparams) - set(valid))
    if unknown:
        raise TypeError(
            f"Unknown hyper-parameter(s) {unknown} for solver {name!r}; valid ones are {valid}."
        )
    return cls(**hyperparams)
