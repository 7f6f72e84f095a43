"""Fixed-point correction (Bai et al. 2022, DEQ-Flow; TorchDEQ's ``fp_correction``): the training
loss is also applied to k solver iterates, each through a one-step (phantom) gradient, weighted
``gamma^(k - i)`` for the i-th of them (i = 0 ... k - 1; the equilibrium itself has weight 1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class FixedPointCorrection:
    """Which solver iterates to supervise, and how to weight their losses.

    ``DEQ(..., correction=FixedPointCorrection(steps=k))`` makes each training forward keep the
    iterates ``z_s`` at k steps ``s`` of the solve (``pick``) and return
    ``solution.trajectory``: the k states ``f(z_s)``, each a one-step phantom-gradient function
    of the parameters (``z_s`` detached); with the loss ``L`` of the model's output,
    ``loss`` forms ``Σ_i gamma^(k - i) L(trajectory[i])``, to be added to ``L(z*)``. The
    supervised iterates cost one tracked call of f each and nothing else.

    Args:
        steps: k, the number of supervised iterates (0: off).
        gamma: the decay γ of the weights (TorchDEQ: 0.8).
        mode: ``"uniform"`` (steps ``round(j M / (k + 1))``, j = 1 ... k, for the solver cap M;
            a solve that stops earlier supplies its final value for the later ones) or
            ``"random"`` (k distinct steps in ``[1, M - 1]`` drawn from torch's generator).
        positions: for sequence states ``(B, T, ...)``, the share of the T positions whose loss
            each supervised iterate pays: a fresh random subset of ``ceil(positions T)`` of them
            per iterate (``sample``), its mean an unbiased estimate of the all-position mean at
            a fraction of the output head's cost (1: every position).
    """

    steps: int = 0
    gamma: float = 0.8
    mode: Literal["uniform", "random"] = "uniform"
    positions: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"FixedPointCorrection.steps must be an int >= 0; got {self.steps!r}.")
        g = self.gamma
        if (
            isinstance(g, bool)
            or not isinstance(g, int | float)
            or not (0 < g <= 1 and math.isfinite(g))
        ):
            raise ValueError(f"FixedPointCorrection.gamma must be in (0, 1]; got {g!r}.")
        p = self.positions
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise ValueError(
                f"FixedPointCorrection.positions must be in (0, 1] (the share of a sequence's "
                f"positions each supervised iterate pays the loss on); got {p!r}."
            )
        if self.mode not in ("uniform", "random"):
            raise ValueError(
                f"FixedPointCorrection.mode must be 'uniform' or 'random'; got {self.mode!r}."
            )

    def pick(self, max_steps: int, generator: torch.Generator | None = None) -> tuple[int, ...]:
        """The supervised steps (sorted, distinct, in ``[1, max_steps]``) for a solver cap."""
        k = self.steps
        if k == 0:
            return ()
        if self.mode == "uniform":
            return tuple(sorted({max(1, round(j * max_steps / (k + 1))) for j in range(1, k + 1)}))
        n = max(1, max_steps - 1)
        chosen = torch.randperm(n, generator=generator)[: min(k, n)] + 1
        return tuple(sorted(int(s) for s in chosen))

    def sample(self, length: int, generator: torch.Generator | None = None) -> Tensor | None:
        """Sorted indices of the ``ceil(positions * length)`` supervised positions of one
        iterate, drawn from torch's generator; None when every position is supervised."""
        n = math.ceil(self.positions * length)
        if n >= length:
            return None
        return torch.randperm(length, generator=generator)[:n].sort().values

    def weights(self, n: int) -> list[float]:
        """Weights of n supervised states, earliest first: ``gamma^n, ..., gamma^1``."""
        return [self.gamma ** (n - i) for i in range(n)]

    def loss(self, losses: Sequence[Tensor]) -> Tensor:
        """``Σ_i gamma^(n - i) losses[i]`` over the supervised states' losses, earliest first."""
        if not losses:
            raise ValueError(
                "FixedPointCorrection.loss needs at least one supervised state's loss."
            )
        return sum(w * l for w, l in zip(self.weights(len(losses)), losses, strict=True))
