"""The algebraically reversible damped fixed-point scheme (McCallum et al. 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from .._types import FlatFn
from ._base import AbstractSolver, _check_float


class _ReversibleState(NamedTuple):
    y: Tensor  # the second chain, in the chain dtype
    z: Tensor  # the first chain in the chain dtype (the driver sees it cast to the state's)
    fy: Tensor | None  # f(y) when already known (only at step 0, where y = z)


@dataclass(frozen=True, kw_only=True)
class Reversible(AbstractSolver):
    """Reversible damped fixed-point iteration on two coupled chains, ``y_0 = z_0``:

        z_{k+1} = (1 - β) z_k + β f(y_k)
        y_{k+1} = (1 - β) y_k + β f(z_{k+1})

    Each step can be undone exactly in exact arithmetic,
    ``y_k = (y_{k+1} - β f(z_{k+1})) / (1 - β)``, ``z_k = (z_{k+1} - β f(y_k)) / (1 - β)``, so
    ``deepeq.ReversibleBackward`` reconstructs every iterate from the last one instead of
    storing it and returns the exact gradient of the returned ``z_N`` with the memory of one call
    of f. The stopping rule is the driver's on ``z_k`` (``f(z_k)`` comes with the step); each
    sample returns its LAST iterate (the reversal starts there), not its lowest-residual one.
    A step costs two calls of f (the first one, one: ``f(y_0) = f(z_0)``).

    Undoing a step divides by ``1 - β`` twice, so the round-off of the forward steps grows by
    ``(1 + β||J_f||) / (1 - β)`` or so per undone step (the forward map contracts, its inverse
    expands). The two chains are therefore kept in ``chain_dtype`` (float64 by default) while f
    runs in the state's dtype on the chains cast to it: a float32 model then reverses with
    float64 round-off, and the reconstructed inputs of f mostly cast to the very same float32
    values, so f's own round-off does not drift at all. The backward pass measures what is left
    (``Solution.backward.reconstruction_error``; bench/reversible.py has the table: smaller β,
    a stabler reversal and a slower solve).

    Args:
        atol: absolute tolerance of ``||f(z)-z|| <= atol + rtol*||f(z)||``.
        rtol: relative tolerance of the same rule.
        max_steps: iteration cap (each step: two calls of f).
        beta: β in ``(0, 1)``. Default 0.5: its steps undo exactly in binary floating point
            (halving and doubling), so float64 chains retrace a float32 model's iterates bit for
            bit over ~30 steps; the papers' 0.8 converges a little faster per step but drifts
            after ~12 (bench/reversible.py).
        chain_dtype: dtype of the two chains (``torch.float64``, default), or None for the
            state's dtype (what the papers do: a float32 reversal, much less exact).

    Examples:
        >>> import torch, deepeq
        >>> sol = deepeq.fixed_point(torch.cos, torch.zeros(1, 1, dtype=torch.float64),
        ...                          deepeq.Reversible(rtol=1e-10, max_steps=200, beta=0.5))
        >>> round(sol.value.item(), 6)
        0.739085
    """

    atol: float = 0.0
    rtol: float = 1e-3
    max_steps: int = 50
    beta: float = 0.5
    chain_dtype: torch.dtype | None = torch.float64

    #: the driver returns each sample's last iterate (the reversal must start from it)
    returns_last: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._validate()
        _check_float("Reversible", "beta", self.beta, 0.0, strict=True)
        if self.beta >= 1.0:
            raise ValueError(
                f"Reversible.beta must be in (0, 1): the reversal divides by 1 - beta; got "
                f"{self.beta!r}."
            )
        if self.chain_dtype is not None and (
            not isinstance(self.chain_dtype, torch.dtype) or not self.chain_dtype.is_floating_point
        ):
            raise TypeError(
                f"Reversible.chain_dtype must be a floating torch.dtype (torch.float64) or None; "
                f"got {self.chain_dtype!r}."
            )

    def dtype_for(self, z: Tensor) -> torch.dtype:
        """The chains' dtype for a state like ``z`` (MPS has no float64: the state's there)."""
        if self.chain_dtype is None or z.device.type == "mps":
            return z.dtype
        return torch.promote_types(self.chain_dtype, z.dtype)

    def init(
        self, f: FlatFn, z: Tensor, fz: Tensor, *, positions: int = 0, coupled: bool = False
    ) -> _ReversibleState:
        zc = z.to(self.dtype_for(z))
        return _ReversibleState(y=zc, z=zc, fy=fz)

    def step(self, f: FlatFn, z: Tensor, fz: Tensor, state: _ReversibleState):
        cd = state.z.dtype
        fy = state.fy if state.fy is not None else f(state.y.to(z.dtype))
        zc = state.z.lerp(fy.to(cd), self.beta)
        z_next = zc.to(z.dtype)
        fz_next = f(z_next)
        yc = state.y.lerp(fz_next.to(cd), self.beta)
        return z_next, fz_next, _ReversibleState(y=yc, z=zc, fy=None)

    def final_state(self, state: _ReversibleState, rows: Tensor) -> tuple[Tensor, ...]:
        """Both chains ``(y, z)`` (in the chain dtype) of samples ``rows`` at their last step."""
        return (state.y[rows], state.z[rows])
