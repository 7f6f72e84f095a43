"""Result records: Status, Stats and Solution."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from torch import Tensor

from ._types import State


class Status(enum.Enum):
    """Outcome of a fixed-point solve. Each value is the human-readable explanation."""

    CONVERGED = "converged: every sample met ||f(z)-z|| <= atol + rtol*||f(z)||"
    MAX_STEPS = (
        "reached max_steps before ||f(z)-z|| <= atol + rtol*||f(z)|| for every sample; "
        "increase max_steps, loosen atol/rtol, try another solver, or check that f is contractive"
    )
    NONFINITE = (
        "non-finite values (inf/nan) appeared in f(z) for some samples; those samples return "
        "their lowest-residual finite iterate. Check f for overflow or lower the learning rate"
    )


class ConvergenceWarning(UserWarning):
    """A solve ended without meeting its tolerance where nothing else would say so (the
    implicit backward's linear solve stopping at its cap). Python shows it once per place;
    ``warnings.simplefilter("always", deepeq.ConvergenceWarning)`` shows every occurrence,
    ``"error"`` raises it."""


@dataclass(frozen=True)
class Stats:
    """Per-sample statistics of one solve. Every per-sample tensor has shape ``(B,)`` and lives on
    the device of ``z0``.

    Attributes:
        abs_residual: ``||f(z*) - z*||`` of the returned iterate (norm over all non-batch dims),
            float64 whatever the state's dtype (computed so that it neither overflows nor
            underflows: a residual of 1e-25 or 1e20 in a float32 state is reported as it is).
        rel_residual: ``abs_residual / ||f(z*)||`` (0 when both are 0), float64.
        num_steps: solver steps this sample took before it converged or stopped (0 = z0 was
            already converged). Line-search trial evaluations are not steps.
        best_step: the step whose iterate is returned (the sample's lowest-residual iterate).
        converged: bool mask, ``abs_residual <= atol + rtol * ||f(z*)||`` with finite norms,
            reached with progress (the residual fell from its start or the iterate's scale
            did not grow: see ``deepeq.fixed_point``). Causal solves: every position met the
            rule, and ``abs_residual`` / ``rel_residual`` are the worst position's. With
            ``solve_dtype`` every figure comes from one full-precision evaluation of f.
        nonfinite: bool mask of samples stopped because f produced inf/nan.
        nfe: number of calls of ``f`` (each call may cover only the still-active samples).
        sample_evals: per-sample evaluations summed over calls (``nfe * B`` when nothing is
            masked); this is what compute scales with.
        wall_time: seconds spent in the solve (device synchronised at the end).
        buffer_bytes: bytes of solver buffers (histories, Gram matrices) allocated for the solve.
        trace: ``(B, S + 1)`` absolute residual of each sample's current iterate at step 0..S
            (S = the largest ``num_steps``; after a sample stops its last value is repeated), or
            None when ``trace=False``.
        rel_trace: the same for the relative residual.
    """

    abs_residual: Tensor
    rel_residual: Tensor
    num_steps: Tensor
    best_step: Tensor
    converged: Tensor
    nonfinite: Tensor
    nfe: int
    sample_evals: int
    wall_time: float
    buffer_bytes: int
    trace: Tensor | None = None
    rel_trace: Tensor | None = None


@dataclass
class BackwardStats:
    """Filled in by ``deepeq.ImplicitBackward`` (and ``deepeq.ReversibleBackward``:
    steps undone, calls of f, reconstruction error) each time ``.backward()`` runs through the
    equilibrium (a mutable holder: the forward pass creates it empty). Per-sample tensors are
    ``(B,)``; everything is None until the first backward pass.

    Attributes:
        calls: how many backward passes ran through this solution.
        status: ``Status`` of the backward linear solve ``g = J_fᵀ g + dL/dz*``.
        abs_residual: ``||J_fᵀ g + dL/dz* - g||`` per sample at the returned g.
        rel_residual: the same relative to ``||J_fᵀ g + dL/dz*||``.
        num_steps: solver steps per sample.
        converged: bool mask (met the backward solver's tolerance).
        fallback: bool mask of samples whose backward solve diverged (non-finite, or residual
            above the starting residual ``||dL/dz*||``) and got the fallback gradient.
        nfe: vector-Jacobian products used by the backward solve (plus fallback ones).
        wall_time: seconds spent in the backward solve.
        reconstruction_error: ``deepeq.ReversibleBackward`` only (else None): per sample,
            the error of the reconstructed ``z_0`` after undoing the iterations, relative to
            ``||z_N||`` (float round-off of the reversal; 0 in exact arithmetic); NaN where the
            reversal stopped early because the adjoint fell below round-off (``num_steps`` then
            counts the steps undone).

    With ``ImplicitBackward(solver=None)`` (no backward iterations) nothing is measured: status,
    residuals and converged stay None, nfe is 0.
    """

    calls: int = 0
    status: Status | None = None
    abs_residual: Tensor | None = None
    rel_residual: Tensor | None = None
    num_steps: Tensor | None = None
    converged: Tensor | None = None
    fallback: Tensor | None = None
    nfe: int | None = None
    wall_time: float | None = None
    reconstruction_error: Tensor | None = None


@dataclass(frozen=True)
class Solution:
    """What ``deepeq.fixed_point`` (and ``deepeq.DEQ``) return.

    Attributes:
        value: the equilibrium ``z*`` with the structure of ``z0``: for each sample its
            lowest-residual iterate (never one extra application of f). Wired into autograd by
            the backward rule (``PhantomBackward`` returns its last damped step instead).
        status: a ``Status``; ``CONVERGED`` only if every sample converged.
        stats: a ``Stats`` record of the forward solve.
        backward: ``BackwardStats`` filled in during ``.backward()`` (ImplicitBackward
            only; None otherwise or when no graph was built).
        fz: ``(B, D)`` flat ``f(z*)`` from the one tracked call of f (ImplicitBackward with
            autograd recording), else None. With ``z_leaf`` it gives the Jacobian at the
            equilibrium without another call of f (Jacobian regularisation).
        z_leaf: ``(B, D)`` flat leaf tensor (``requires_grad=True``) that ``fz`` was computed
            from, else None.
        trajectory: fixed-point correction (``keep_iterates``): ``f(z_s)`` for each kept step
            s, each with a one-step gradient, in the structure of ``value``; else ``()``.
        trajectory_steps: the steps s of ``trajectory``.
    """

    value: State
    status: Status
    stats: Stats
    backward: BackwardStats | None = field(default=None, repr=False)
    fz: Tensor | None = field(default=None, repr=False)
    z_leaf: Tensor | None = field(default=None, repr=False)
    trajectory: tuple = field(default=(), repr=False)
    trajectory_steps: tuple[int, ...] = ()

    def raise_for_status(self) -> Solution:
        """Raise ``RuntimeError`` with the status explanation unless every sample converged.

        Returns:
            ``self``, so calls can be chained.
        """
        if self.status is not Status.CONVERGED:
            s = self.stats
            bad = (~s.converged).nonzero().flatten().tolist()
            raise RuntimeError(
                f"fixed_point did not converge ({self.status.name}): {self.status.value}. "
                f"{len(bad)} of {s.converged.numel()} samples failed (first: {bad[:8]}); "
                f"max abs residual {s.abs_residual.max().item():.3e}, "
                f"max rel residual {s.rel_residual.max().item():.3e}."
            )
        return self
