"""Broyden's ("good") quasi-Newton method with a bounded low-rank inverse Jacobian."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .._norm import safe_norm
from .._types import FlatFn
from ._base import AbstractSolver, _check_int, bmv, bvm


class _BroydenState(NamedTuple):
    U: Tensor  # (B, m, D)  rank-one factors: J⁻¹ ≈ -I + Σ_i u_i v_iᵀ; only [:, :count] is used
    V: Tensor  # (B, m, D)
    count: int  # slots in use (the same for every active sample)
    coupled: bool = False  # the rows' outputs depend on each other: evaluate whole batches


def _lowrank(x: Tensor, A: Tensor, C: Tensor, beta: float, alpha: float) -> Tensor:
    """``beta * x + alpha * Σ_i a_i (c_i·x)`` for x (B, D) and A, C (B, n, D)."""
    if A.shape[1] == 0:
        return x if beta == 1 else beta * x
    w = bmv(C, x)  # (B, n)
    return torch.add(x if beta == 1 else beta * x, bvm(w, A), alpha=alpha)


@dataclass(frozen=True, kw_only=True)
class Broyden(AbstractSolver):
    """Broyden's good method on ``g(z) = f(z) - z`` (Broyden 1965; the DEQ papers' solver).

    Keeps an approximation of the inverse Jacobian of g, ``J⁻¹ ≈ -I + Σ_i u_i v_iᵀ``, starting from
    ``-I`` (so the first step is a Picard step). Each step moves ``z <- z + a Δz`` with
    ``Δz = -J⁻¹ g`` and updates ``J⁻¹`` by the Sherman–Morrison rank-one "good Broyden" formula
    with ``s = a Δz``, ``y = g_new - g``:
    ``J⁻¹ <- J⁻¹ + (s - J⁻¹y)(sᵀJ⁻¹) / (sᵀJ⁻¹y)``.
    The factors live in one contiguous ``(B, m, D)`` buffer pair allocated once per solve; when all
    ``m = history_length`` slots are used the approximation restarts from ``-I`` (limited memory). An update whose
    denominator is ~0 or non-finite is skipped for that sample (NaN-safe).

    With ``line_search=True`` a sample whose full step does not decrease ``||g||`` backtracks
    (halving ``a``, at most ``backtracks`` times); only the failing samples are re-evaluated
    (the whole batch when the samples are coupled, ``independent=False``, so that every
    residual is that of one batch state), and these trial evaluations count in ``nfe`` but not
    in ``num_steps``.

    Safeguard: a step longer than ``||g|| / sqrt(ε)`` (largest entries) (ε of the state's dtype) means the inverse
    estimate has become numerically singular (on ``f(z) = z + c``, which has no fixed point, it
    jumped to ``|z| ~ 1e16``, where ``z + c`` rounds to ``z``): that sample's estimate restarts
    from ``-I`` and it takes a Picard step instead.

    Args:
        atol: absolute tolerance of the stopping rule ``||f(z)-z|| <= atol + rtol*||f(z)||``.
        rtol: relative tolerance of the same rule.
        max_steps: iteration cap; reaching it gives ``Status.MAX_STEPS``.
        history_length: m, number of rank-one updates kept.
        line_search: per-sample backtracking on ``||g||``.
        backtracks: maximum halvings per step when ``line_search`` is on.

    Examples:
        >>> import torch, deepeq
        >>> sol = deepeq.fixed_point(torch.cos, torch.zeros(4, 1, dtype=torch.float64), deepeq.Broyden(atol=1e-10, rtol=0.0))
        >>> sol.status.name, round(sol.value[0].item(), 8)
        ('CONVERGED', 0.73908513)
    """

    atol: float = 0.0
    rtol: float = 1e-3
    max_steps: int = 30
    history_length: int = 20
    line_search: bool = False
    backtracks: int = 4

    def __post_init__(self) -> None:
        self._validate()
        _check_int("Broyden", "history_length", self.history_length, 1)
        _check_int("Broyden", "backtracks", self.backtracks, 0)
        if not isinstance(self.line_search, bool):
            raise TypeError(f"Broyden.line_search must be a bool; got {self.line_search!r}.")

    def init(
        self, f: FlatFn, z: Tensor, fz: Tensor, *, positions: int = 0, coupled: bool = False
    ) -> _BroydenState:
        B, D = z.shape
        m = self.history_length
        # Uninitialised on purpose: slots are written before they are read (count tracks them).
        return _BroydenState(z.new_empty(B, m, D), z.new_empty(B, m, D), 0, coupled)

    def step(self, f: FlatFn, z: Tensor, fz: Tensor, state: _BroydenState):
        # Written for few tensor ops per step: with cheap f the per-op overhead dominates.
        U, V, n, coupled = state
        Un, Vn = U[:, :n], V[:, :n]  # the used slots only: no work on empty history
        g = fz - z
        dz = _lowrank(g, Un, Vn, beta=1.0, alpha=-1.0)  # -J⁻¹g = g - Σ u_i (v_i·g)
        # largest entries, not norms: no squares to overflow, and fewer ops per step (a NaN
        # step is left to the driver's non-finite check)
        wild = None
        if n:
            wild = dz.abs().amax(1) * torch.finfo(z.dtype).eps ** 0.5 > g.abs().amax(1)
        if wild is not None and bool(wild.any()):  # restart those rows' estimate: a Picard step
            tame = (~wild).to(z.dtype).view(-1, 1, 1)
            Un, Vn = Un * tame, Vn * tame
            dz = torch.where(wild.unsqueeze(1), g, dz)
        else:
            wild = None
        z_new = z + dz
        fz_new = f(z_new)
        if self.line_search:
            z_new, fz_new = self._backtrack(f, z, g, dz, z_new, fz_new, coupled)
        s = z_new - z
        y = fz_new - z_new - g
        if n == self.history_length:
            # History full: restart from J⁻¹ = -I (this update is made relative to -I). Overwriting
            # the oldest factor instead leaves the others describing a matrix that no longer
            # exists, which diverged in tests.
            n, Jy, sJ = 0, -y, -s
        else:
            Jy = _lowrank(y, Un, Vn, beta=-1.0, alpha=1.0)  # J⁻¹y = -y + Σ u_i (v_i·y)
            sJ = _lowrank(s, Vn, Un, beta=-1.0, alpha=1.0)  # sᵀJ⁻¹ = -s + Σ (s·u_i) v_i
        # The rank-one term (s - J⁻¹y)(sᵀJ⁻¹)/(sᵀJ⁻¹y) is stored with a unit-norm v = sᵀJ⁻¹/||sᵀJ⁻¹||
        # and u = (s - J⁻¹y)/(v·y): the same product, with factors whose size does not depend
        # on the problem's scale (for z ~ 1e-25, sᵀJ⁻¹y ~ 1e-50 underflows float32; 1e20 overflows).
        norms = safe_norm(torch.stack((s, Jy, sJ)), 2)  # (3, B) float64
        n_sJ = norms[2]
        unit = sJ / torch.where(n_sJ > 0, n_sJ, 1.0).to(sJ.dtype).unsqueeze(1)
        denom = torch.linalg.vecdot(unit, y)
        # Skip (zero factor) when the denominator is ~0 relative to its factors, or NaN: the
        # test |sᵀJ⁻¹y| > eps ||s|| ||J⁻¹y|| of the unscaled factors, in float64.
        ok = denom.abs() * n_sJ > torch.finfo(z.dtype).eps * norms[0] * norms[1]
        # where(ok, 1/denom, 0) with a safe denominator: under autograd the discarded 1/0 would
        # make the gradient NaN (0 * inf in torch.where's backward).
        inv = torch.where(ok, torch.where(ok, denom, 1.0).reciprocal(), 0.0)
        if torch.is_grad_enabled():  # UnrolledBackward: keep the tensors autograd saved intact
            U, V = U.clone(), V.clone()
        if wild is not None and n:  # restarted rows keep no old factors
            U[:, :n], V[:, :n] = Un, Vn
        U[:, n] = (s - Jy) * inv.unsqueeze(1)
        V[:, n] = unit
        return z_new, fz_new, _BroydenState(U, V, n + 1, coupled)

    def final_state(self, state: _BroydenState, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The used factors ``(U, V)`` ``(len(rows), n, D)`` of rows ``rows``."""
        U, V, n, _ = state
        return U[rows, :n], V[rows, :n]

    def inverse_estimate(self, final: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """``J_g⁻¹ ≈ -I + Σ u_i v_iᵀ`` for ``g = f - z``, so ``(I - J_f)⁻¹ = -J_g⁻¹ ≈ I - Σ u_i v_iᵀ``:
        the exported factors as they are."""
        U, V = final
        return U, V

    def _backtrack(self, f, z, g, dz, z_new, fz_new, whole: bool):
        gnorm = safe_norm(g, 1)
        scale = torch.ones_like(gnorm, dtype=z.dtype)
        # Coupled samples (``whole``): a row's f(z) is only valid for the batch state it was
        # computed at, so every trial evaluates the whole batch (f runs on it anyway).
        for _ in range(self.backtracks):
            gn = safe_norm(fz_new - z_new, 1)
            # Sufficient decrease of ||g|| (Armijo-style, c = 1e-4); NaN counts as failure.
            fail = ~(gn <= (1.0 - 1e-4 * scale) * gnorm)
            if not bool(fail.any()):
                break
            rows = fail.nonzero().squeeze(1)
            scale[rows] *= 0.5
            z_try = z[rows] + scale[rows].unsqueeze(1) * dz[rows]
            z_new = z_new.index_copy(0, rows, z_try)
            fz_new = f(z_new) if whole else fz_new.index_copy(0, rows, f(z_try, rows=rows))
        return z_new, fz_new
