"""The solver protocol shared by Picard, Anderson and Broyden."""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._types import FlatFn


class AbstractSolver(abc.ABC):
    """Finds ``z`` with ``f(z) = z``. Concrete solvers are frozen dataclasses holding
    hyper-parameters only; per-call state lives in the object returned by ``init``.

    The driver (``deepeq.fixed_point``) owns the loop: it evaluates the stopping rule
    ``||f(z) - z|| <= atol + rtol * ||f(z)||`` per sample, keeps each sample's best iterate, and
    drops converged samples from the active set. Solvers therefore only see the still-active rows
    as ``(b, D)`` tensors, and every tensor in their state must be batch-first so that the driver
    can drop rows with ``compact``.
    """

    atol: float
    rtol: float
    max_steps: int

    #: True: the driver returns each sample's last (finite) iterate instead of its lowest-residual
    #: one (solvers whose state must match the returned iterate, e.g. ``Reversible``).
    returns_last: ClassVar[bool] = False

    @abc.abstractmethod
    def init(
        self, f: FlatFn, z: Tensor, fz: Tensor, *, positions: int = 0, coupled: bool = False
    ) -> Any:
        """Build the solver state (e.g. a history buffer) for ``z``, ``fz = f(z)`` of shape (B, D).

        ``positions`` > 0: causal solving, the rows being (sample, position) pairs, this many per
        sample in order; a solver that mixes rows (Anderson) keeps it in its state and mixes per
        prefix. Solvers whose mixing cannot be made causal are refused before the solve
        (``deepeq._fixed_point.check_causal_solver``). ``coupled``: the rows' outputs depend on
        each other (``independent=False``): f's value for some rows (``f(z_rows, rows=...)``)
        is then only valid with the others held, so a solver that re-evaluates some rows
        (Broyden's line search) must evaluate whole batches instead."""

    @abc.abstractmethod
    def step(self, f: FlatFn, z: Tensor, fz: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
        """One iteration: return ``(z_next, f(z_next), new_state)``, evaluating ``f`` itself."""

    def final_state(self, state: Any, rows: Tensor) -> tuple[Tensor, ...] | None:
        """What the solver hands out of its state for rows ``rows`` at their last step: a tuple of
        batch-first tensors ``(len(rows), ...)`` (trailing sizes may differ between calls; the
        driver pads them with zeros into full-batch tensors, ``FinalState.state``), or None (the
        default: nothing). ``Reversible``: both chains; ``Broyden``: its inverse estimate."""
        return None

    def inverse_estimate(self, final: tuple[Tensor, ...]) -> tuple[Tensor, Tensor] | None:
        """From ``final_state``'s full-batch tensors, the solver's estimate of ``(I - J_f)⁻¹`` at
        each sample's last iterate as low-rank factors ``(U, V)`` ``(B, n, D)`` with
        ``(I - J_f)⁻¹ ≈ I - Σ_i u_i v_iᵀ`` (unused slots zero), or None for solvers that keep no
        such estimate (the default). Used by ``ImplicitBackward(init="shine")``."""
        return None

    def compact(self, state: Any, keep: Tensor) -> Any:
        """Keep only rows ``keep`` (int64 indices) of every batch-first tensor in ``state``."""
        return type(state)(
            *(x[keep] if isinstance(x, Tensor) and x.dim() > 0 else x for x in state)
        )

    def _validate(self) -> None:
        name = type(self).__name__
        for field in ("atol", "rtol"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise TypeError(f"{name}.{field} must be a float; got {v!r}.")
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}.{field} must be finite and >= 0; got {v!r}.")
        _check_int(name, "max_steps", self.max_steps, 1)
        check_damping(name, "damping", getattr(self, "damping", 0.0))


def check_solver(value: object, what: str, alternative: str = "") -> None:
    """The one check that ``value`` is a solver object (``what``: the argument's name in the
    message; ``alternative``: what else is accepted, e.g. ", or None (no backward
    iterations)")."""
    if not isinstance(value, AbstractSolver):
        raise TypeError(
            f"{what} must be a deepeq solver object such as deepeq.Anderson(){alternative}; got "
            f"{type(value).__name__}. Use deepeq.make_solver(name, **hyperparams) for strings."
        )


def check_damping(name: str, field: str, d: object) -> None:
    """The one check of a damping factor (solvers, the phantom gradient, the implicit backward's
    fallback): a float in [0, 1), meaning ``z <- (1 - d) f(z) + d z``."""
    if isinstance(d, bool) or not isinstance(d, int | float):
        raise TypeError(f"{name}.{field} must be a float in [0, 1); got {d!r}.")
    if not 0.0 <= d < 1.0:
        raise ValueError(
            f"{name}.{field} must be in [0, 1) (z <- (1-d)*f(z) + d*z, 0 = no damping); got {d!r}."
        )


def _check_int(name: str, field: str, v: object, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}.{field} must be an int >= {minimum}; got {v!r}.")
    if v < minimum:
        raise ValueError(f"{name}.{field} must be >= {minimum}; got {v!r}.")


def _check_float(name: str, field: str, v: object, minimum: float, strict: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise TypeError(f"{name}.{field} must be a finite float; got {v!r}.")
    if v < minimum or (strict and v == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name}.{field} must be {op} {minimum}; got {v!r}.")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for small solver-internal reductions (Gram matrices): at least float32."""
    return torch.promote_types(dtype, torch.float32)


# Batched products with a short "history" axis n (n ≤ a few dozen). On CPU, multiply-and-sum beats
# bmm's matrix-vector path for small tensors (per-op overhead) and loses 2-8x for large ones, where
# it also allocates a (B, n, D) temporary (MDEQ on MNIST: B=64, D=9408). Crossovers measured with
# torch 2.13 on the 2-core development CPU, 1 and 2 threads: ~2^19 elements for A @ x, ~2^15 for
# Σ_i w_i A_i (e.g. (64, 6, 9408): 2.6 vs 1.6 ms and 2.4 vs 0.7 ms; (32, 20, 128): 30 vs 87 µs and
# 27 vs 14 µs).
_SMALL_BMV = 1 << 19
_SMALL_BVM = 1 << 15


def bmv(A: Tensor, x: Tensor) -> Tensor:
    """``A @ x`` per sample: A (B, n, D), x (B, D) -> (B, n)."""
    if A.device.type == "cpu" and A.numel() <= _SMALL_BMV:
        return (A * x.unsqueeze(1)).sum(2)
    return torch.bmm(A, x.unsqueeze(2)).squeeze(2)


def bvm(w: Tensor, A: Tensor) -> Tensor:
    """``Σ_i w_i A_i`` per sample: w (B, n), A (B, n, D) -> (B, D)."""
    if A.device.type == "cpu" and A.numel() <= _SMALL_BVM:
        return (w.unsqueeze(2) * A).sum(1)
    return torch.bmm(w.unsqueeze(1), A).squeeze(1)
