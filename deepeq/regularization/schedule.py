"""When and how strongly to apply the Jacobian penalty during training."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class JacobianSchedule:
    """Jacobian-regularisation schedule of Bai et al. 2021 (§A.4, Table 4): the penalty is applied
    on a random fraction ``probability`` (p) of training steps, with weight γ ramped linearly
    from ``weight`` (A) to ``final_weight`` (B) between ``ramp_start`` and ``ramp_end`` steps
    (constant ``weight`` when ``final_weight`` is None).

    The Bernoulli draw of step ``s`` depends only on ``(seed, s)``, so a resumed run makes the
    same decisions as an uninterrupted one.

    Args:
        weight: γ, or A when ramping.
        final_weight: B (None: constant γ).
        ramp_start: first step of the ramp.
        ramp_end: step at which B is reached.
        probability: p, chance that a step is regularised.
        seed: seed of the per-step draws.

    Examples:
        >>> from deepeq import JacobianSchedule
        >>> s = JacobianSchedule(weight=1.0, final_weight=3.0, ramp_end=10, probability=1.0)
        >>> s.weight_at(0), s.weight_at(5), s.weight_at(20), s(5)
        (1.0, 2.0, 3.0, 2.0)
    """

    weight: float = 0.0
    final_weight: float | None = None
    ramp_start: int = 0
    ramp_end: int = 0
    probability: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("weight", "probability"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not math.isfinite(v)
                or v < 0
            ):
                raise ValueError(f"JacobianSchedule.{name} must be a finite float >= 0; got {v!r}.")
        if not self.probability <= 1:
            raise ValueError(
                f"JacobianSchedule.probability must be in [0, 1]; got {self.probability!r}."
            )
        if self.final_weight is not None and (
            not math.isfinite(self.final_weight) or self.final_weight < 0
        ):
            raise ValueError(
                f"JacobianSchedule.final_weight must be >= 0 or None; got {self.final_weight!r}."
            )
        if self.final_weight is not None and self.ramp_end < self.ramp_start:
            raise ValueError(
                f"JacobianSchedule: ramp_end ({self.ramp_end}) must be >= ramp_start ({self.ramp_start})."
            )

    def weight_at(self, step: int) -> float:
        """γ at ``step`` (whether or not the step is regularised)."""
        if self.final_weight is None or step <= self.ramp_start:
            return float(self.weight)
        if step >= self.ramp_end:
            return float(self.final_weight)
        t = (step - self.ramp_start) / (self.ramp_end - self.ramp_start)
        return float(self.weight + t * (self.final_weight - self.weight))

    def applies(self, step: int) -> bool:
        """Whether the penalty is applied at ``step`` (Bernoulli(p), deterministic in (seed, step))."""
        if self.probability >= 1:
            return True
        if self.probability <= 0:
            return False
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2**63 - 1))
        return bool(torch.rand((), generator=g) < self.probability)

    def __call__(self, step: int) -> float:
        """The weight to multiply the penalty by at ``step``: γ if applied, else 0."""
        return self.weight_at(step) if self.applies(step) else 0.0
