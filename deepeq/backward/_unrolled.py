"""Autograd through every solver iteration: the reference oracle."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._base import AbstractBackward


@dataclass(frozen=True)
class UnrolledBackward(AbstractBackward):
    """Differentiate through every iteration of the forward solver, as autograd would through
    an explicit weight-tied network of that depth. Memory grows linearly with the number of
    steps; the value is exactly the solver's ``z*``. Use it as a test oracle, for small problems,
    or as the papers' "weight-tied deep network" baseline.

    Examples:
        >>> import torch, deepeq
        >>> x = torch.tensor([[1.0]], requires_grad=True)
        >>> sol = deepeq.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(1, 1), deepeq.Picard(rtol=1e-6, max_steps=100),
        ...                          args=(x,), backward=deepeq.UnrolledBackward())
        >>> sol.value.backward()
        >>> round(x.grad.item(), 4)  # dz*/dx = 1 / (1 - 0.5)
        2.0
    """

    def apply(self, problem):
        with torch.enable_grad():
            r = problem.solve(min_steps=1, track_z0=True)
        z, status, stats = r.z, r.status, r.stats
        return problem.finish(z, status, stats, iterates=r.iterates)
