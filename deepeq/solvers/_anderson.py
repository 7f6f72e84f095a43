"""Anderson acceleration (type II) with an incrementally updated Gram matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .._types import FlatFn
from ._base import AbstractSolver, _check_float, _check_int, work_dtype


class _AndersonState(NamedTuple):
    F: Tensor  # (B, m, D)  f(z_i) for the last m iterates (ring buffer)
    G: Tensor  # (B, m, D)  residuals g_i = f(z_i) - z_i
    H: Tensor  # (B, m, m)  Gram matrix <g_i, g_j>, updated one row/column per step
    valid: Tensor  # (B, m)  which slots take part in the mixing (per sample: restarts)
    count: int  # iterates written so far; the ring slot is count % m


@dataclass(frozen=True, kw_only=True)
class Anderson(AbstractSolver):
    """Anderson acceleration (type II; Walker & Ni 2011) for ``z = f(z)``.

    With the last ``m = history_length`` iterates ``z_i``, values ``f_i = f(z_i)`` and residuals
    ``g_i = f_i - z_i``, each step solves, per sample,
    ``α = argmin ||Σ α_i g_i||² + λ||α||²`` subject to ``Σ α_i = 1``, i.e. ``α ∝ (H + λI)⁻¹ 1``
    with the Gram matrix ``H_ij = <g_i, g_j>``, and moves to
    ``z <- (1 - damping) Σ α_i f_i + damping Σ α_i z_i``.

    The Gram matrix is updated incrementally (one new row/column per step, O(mD) instead of
    O(m²D)). The ridge is *relative*: ``λ = ridge * mean_i H_ii``, so the regularisation shrinks
    with the residuals and the method does not stall at small residuals (an absolute λ does).
    Safeguard: when the mixing system is singular, produces non-finite weights, or a weight
    exceeds ``max_weight`` in magnitude (an ill-conditioned history), that sample takes a damped
    Picard step instead and its history restarts from the current iterate. Never crashes.

    Args:
        atol: absolute tolerance of the stopping rule ``||f(z)-z|| <= atol + rtol*||f(z)||``.
        rtol: relative tolerance of the same rule.
        max_steps: iteration cap; reaching it gives ``Status.MAX_STEPS``.
        history_length: m, number of past iterates mixed.
        ridge: relative Tikhonov factor (λ / mean diagonal of H).
        damping: β in ``[0, 1)``; 0 takes the pure mixed ``f`` values.
        max_weight: restart threshold on ``max_i |α_i|``.

    Example:
        >>> import torch, deepeq
        >>> A = 0.9 * torch.eye(3, dtype=torch.float64)
        >>> b = torch.ones(2, 3, dtype=torch.float64)
        >>> sol = deepeq.fixed_point(lambda z, b: z @ A.T + b, torch.zeros_like(b), deepeq.Anderson(), args=(b,))
        >>> sol.status.name, torch.allclose(sol.value, 10 * b, rtol=1e-3)
        ('CONVERGED', True)
    """

    atol: float = 0.0
    rtol: float = 1e-3
    max_steps: int = 30
    history_length: int = 5
    ridge: float = 1e-4
    damping: float = 0.0
    max_weight: float = 1e4

    def __post_init__(self) -> None:
        self._validate()
        _check_int("Anderson", "history_length", self.history_length, 1)
        _check_float("Anderson", "ridge", self.ridge, 0.0)
        _check_float("Anderson", "max_weight", self.max_weight, 1.0, strict=True)

    def init(self, f: FlatFn, z: Tensor, fz: Tensor) -> _AndersonState:
        B, D = z.shape
        m = self.history_length
        wd = work_dtype(z.dtype)
        return _AndersonState(
            F=z.new_zeros(B, m, D),
            G=z.new_zeros(B, m, D),
            H=torch.zeros(B, m, m, dtype=wd, device=z.device),
            valid=torch.zeros(B, m, dtype=torch.bool, device=z.device),
            count=0,
        )

    def step(self, f: FlatFn, z: Tensor, fz: Tensor, state: _AndersonState):
        F, G, H, valid, count = state
        m = self.history_length
        s = count % m
        g = fz - z
        F[:, s] = fz
        G[:, s] = g
        h = torch.bmm(G, g.unsqueeze(2)).squeeze(2).to(H.dtype)  # (B, m)
        H[:, s, :] = h
        H[:, :, s] = h
        valid[:, s] = True

        # Solve (H + λI) y = 1 on the valid slots; invalid slots get an identity row and a
        # zero right-hand side, so their weight is exactly 0. Solved in float64: m is tiny.
        vm = valid.to(torch.float64)
        Hd = H.to(torch.float64) * vm.unsqueeze(2) * vm.unsqueeze(1)
        diag = torch.diagonal(Hd, dim1=1, dim2=2)
        tiny = torch.finfo(torch.float64).tiny
        A = Hd + torch.diag_embed(self.ridge * diag + (1.0 - vm) + tiny)
        y, info = torch.linalg.solve_ex(A, vm)
        alpha = y / y.sum(1, keepdim=True)
        bad = (info != 0) | ~torch.isfinite(alpha).all(1) | (alpha.abs().amax(1) > self.max_weight)
        onehot = torch.zeros_like(vm)
        onehot[:, s] = 1.0
        alpha = torch.where(bad.unsqueeze(1), onehot, alpha).to(z.dtype)
        # Restart: a bad sample keeps only its current iterate in the history.
        valid.copy_(torch.where(bad.unsqueeze(1), onehot.bool(), valid))

        a = alpha.unsqueeze(1)  # (B, 1, m)
        z_next = torch.bmm(a, F).squeeze(1)  # Σ α_i f_i
        if self.damping:
            # Σ α_i z_i = Σ α_i (f_i - g_i), so the damped mix is Σ α f - damping Σ α g.
            z_next = z_next - self.damping * torch.bmm(a, G).squeeze(1)
        return z_next, f(z_next), _AndersonState(F, G, H, valid, count + 1)
