"""Picard (plain fixed-point) iteration with damping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from .._types import FlatFn
from ._base import AbstractSolver


class _PicardState(NamedTuple):
    pass


@dataclass(frozen=True, kw_only=True)
class Picard(AbstractSolver):
    """Damped fixed-point iteration ``z <- (1 - damping) * f(z) + damping * z``.

    Converges linearly at rate ρ(J_f) when f is a contraction; ``damping > 0`` can tame
    oscillating (negative-eigenvalue) Jacobians at the cost of speed. Uses no memory.

    Args:
        atol: absolute tolerance of the stopping rule ``||f(z)-z|| <= atol + rtol*||f(z)||``.
        rtol: relative tolerance of the same rule.
        max_steps: iteration cap; reaching it gives ``Status.MAX_STEPS`` (not an exception).
        damping: β in ``[0, 1)``; 0 is plain Picard iteration.

    Examples:
        >>> import torch, deepeq
        >>> sol = deepeq.fixed_point(torch.cos, torch.zeros(1, 1), deepeq.Picard(atol=1e-8, rtol=0.0, max_steps=200))
        >>> round(sol.value.item(), 6)
        0.739085
    """

    atol: float = 0.0
    rtol: float = 1e-3
    max_steps: int = 50
    damping: float = 0.0

    def __post_init__(self) -> None:
        self._validate()

    def init(
        self, f: FlatFn, z: Tensor, fz: Tensor, *, positions: int = 0, coupled: bool = False
    ) -> _PicardState:
        return _PicardState()

    def step(self, f: FlatFn, z: Tensor, fz: Tensor, state: _PicardState):
        z_next = fz if self.damping == 0 else fz.lerp(z, self.damping)
        return z_next, f(z_next), state
