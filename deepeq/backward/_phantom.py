"""Phantom gradients: k damped differentiable steps from the equilibrium."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .._solution import Status
from ..solvers._base import _check_int, check_damping
from ._base import AbstractBackward


@dataclass(frozen=True, kw_only=True)
class PhantomBackward(AbstractBackward):
    """Solve without a graph, then take ``steps`` damped steps
    ``z <- (1 - damping) f(z) + damping z`` from ``z*`` with autograd recording, and return the
    last one (so the value is NOT exactly the solver's ``z*``: one more damped application of f
    per step). ``steps=1, damping=0`` is the Jacobian-free / one-step gradient (JFB). Memory is
    that of ``steps`` calls of f. (Geng et al. 2021, "On training implicit models".)

    Args:
        steps: k, number of differentiable steps (>= 1).
        damping: in ``[0, 1)``; same convention as the solvers.

    Examples:
        >>> import torch, deepeq
        >>> x = torch.tensor([[1.0]], requires_grad=True)
        >>> sol = deepeq.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(1, 1), deepeq.Picard(rtol=1e-8, max_steps=100),
        ...                          args=(x,), backward=deepeq.PhantomBackward(steps=1))
        >>> sol.value.backward()
        >>> x.grad.item()  # one step: d f / d x
        1.0
    """

    steps: int = 1
    damping: float = 0.0

    def __post_init__(self) -> None:
        _check_int("PhantomBackward", "steps", self.steps, 1)
        check_damping("PhantomBackward", "damping", self.damping)

    def apply(self, problem):
        with torch.no_grad():
            r = problem.solve()
        z, status, stats = r.z, r.status, r.stats
        bad = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        with torch.enable_grad():
            for i in range(self.steps):
                fz = problem.call(z)
                z = fz if self.damping == 0 else fz.lerp(z, self.damping)
                bad |= ~torch.isfinite(z.detach()).all(1)
                if problem.nonfinite == "raise" and bool(bad.any()):
                    ids = bad.nonzero().flatten().tolist()
                    raise FloatingPointError(
                        f"f produced non-finite values (inf/nan) in phantom step {i + 1} of "
                        f"{self.steps} (from the solver's z*) for sample(s) {ids[:10]}. Check f "
                        f"for overflow, or pass nonfinite='return' to get Status.NONFINITE."
                    )
        if bool(bad.any()):
            stats = dataclasses.replace(stats, nonfinite=stats.nonfinite | bad,
                                        converged=stats.converged & ~bad)  # fmt: skip
            status = Status.NONFINITE
        return problem.finish(z, status, stats, iterates=r.iterates)
