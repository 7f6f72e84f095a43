"""Anderson acceleration (type II) with an incrementally updated Gram matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .._norm import safe_norm
from .._types import FlatFn
from ._base import AbstractSolver, _check_float, _check_int, bmv, bvm, work_dtype


class _AndersonState(NamedTuple):
    F: Tensor  # (B, m, D)  f(z_i) for the last m iterates (ring buffer)
    G: Tensor  # (B, m, D)  residuals g_i = f(z_i) - z_i
    H: Tensor  # (B, m, m)  <g_i, g_j> (diagonal times 1 + ridge) on valid slots, identity rows
    #                       and columns on invalid (unfilled or restarted) slots; dtype >= fp32
    valid: Tensor  # (B, m)  0/1 in H's dtype: which slots take part in the mixing (per sample)
    eye: Tensor  # (m, m)  identity (constant, used by restarts)
    count: int  # iterates written so far; the ring slot is count % m
    scale: Tensor  # (B, 1)  1 / ||g_0|| per sample: G holds scaled residuals (see init)
    positions: int = 0  # causal solving: rows per sample (weights minimise each prefix's residual)


@dataclass(frozen=True, kw_only=True)
class Anderson(AbstractSolver):
    """Anderson acceleration (type II; Walker & Ni 2011) for ``z = f(z)``.

    With the last ``m = history_length`` iterates ``z_i``, values ``f_i = f(z_i)`` and residuals
    ``g_i = f_i - z_i``, each step solves, per sample,
    ``α = argmin ||Σ α_i g_i||² + ridge Σ_i H_ii α_i²`` subject to ``Σ α_i = 1``, i.e.
    ``α ∝ (H + ridge·diag(H))⁻¹ 1``
    with the Gram matrix ``H_ij = <g_i, g_j>``, and moves to
    ``z <- (1 - damping) Σ α_i f_i + damping Σ α_i z_i``.

    The Gram matrix is updated incrementally (one new row/column per step, O(mD) instead of
    O(m²D)). The ridge is *relative* (scaled per slot by ``H_ii = ||g_i||²``), so the regularisation shrinks
    with the residuals and the method does not stall at small residuals (an absolute λ does).
    Safeguard: when the mixing system is singular, produces non-finite weights, or a weight
    exceeds ``max_weight`` in magnitude (an ill-conditioned history), that sample takes a damped
    Picard step instead and its history is cleared (refilled from the next iterate on).
    Never crashes; never synchronises with the host.

    Args:
        atol: absolute tolerance of the stopping rule ``||f(z)-z|| <= atol + rtol*||f(z)||``.
        rtol: relative tolerance of the same rule.
        max_steps: iteration cap; reaching it gives ``Status.MAX_STEPS``.
        history_length: m, number of past iterates mixed.
        ridge: relative Tikhonov factor (multiplies the diagonal of H).
        damping: β in ``[0, 1)``; 0 takes the pure mixed ``f`` values.
        max_weight: restart threshold on ``max_i |α_i|``.

    Examples:
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

    def init(
        self, f: FlatFn, z: Tensor, fz: Tensor, *, positions: int = 0, coupled: bool = False
    ) -> _AndersonState:
        B, D = z.shape
        m = self.history_length
        wd = work_dtype(z.dtype)  # fp32 for fp32/bf16/fp16 states, fp64 for fp64
        eye = torch.eye(m, dtype=wd, device=z.device)
        # The weights are invariant to a per-sample scale of the residuals, so G stores them
        # divided by the first residual's norm: the Gram entries are then O(1) at the start
        # whatever the scale of the problem (1e-25 squares to 0 in float32, 1e20 to inf).
        n0 = safe_norm(fz - z, 1)
        ok = (n0 > 0) & torch.isfinite(n0)
        limit = torch.finfo(z.dtype)
        scale = torch.where(ok, n0.reciprocal(), 1.0).clamp(limit.tiny, limit.max).to(z.dtype)
        return _AndersonState(
            F=z.new_zeros(B, m, D),  # zeros, not empty: 0 * uninitialised memory may be NaN
            G=z.new_zeros(B, m, D),
            H=eye.expand(B, m, m).clone(),
            valid=torch.zeros(B, m, dtype=wd, device=z.device),
            eye=eye,
            count=0,
            scale=scale.unsqueeze(1),
            positions=positions,
        )

    def compact(self, state: _AndersonState, keep: Tensor) -> _AndersonState:
        F, G, H, valid, eye, count, scale, positions = state
        return _AndersonState(
            F[keep], G[keep], H[keep], valid[keep], eye, count, scale[keep], positions
        )

    def step(self, f: FlatFn, z: Tensor, fz: Tensor, state: _AndersonState):
        # Written for few tensor ops per step: with cheap f the per-op overhead dominates.
        F, G, H, valid, eye, count, scale, positions = state
        grad = torch.is_grad_enabled()
        if grad:  # UnrolledBackward: keep the tensors autograd saved intact
            F, G, H, valid = F.clone(), G.clone(), H.clone(), valid.clone()
        s = count % self.history_length
        g = (fz - z) * scale
        F[:, s] = fz
        G[:, s] = g
        valid[:, s] = 1.0
        # Incremental Gram update: one new row/column, O(mD); invalid slots stay decoupled.
        h = bmv(G, g).to(H.dtype).mul_(valid)  # (B, m)
        H[:, s, :] = h
        H[:, :, s] = h
        H[:, s, s] *= 1.0 + self.ridge
        # Invalid slots are identity rows with a zero right-hand side: their weight is exactly 0.
        alpha = _weights(H, valid, scale, positions)
        # Safeguard: a singular system gives inf/NaN weights, an ill-conditioned one huge
        # weights. Those samples take a Picard step and clear their history (the next step
        # starts a fresh one). On CPU the rare restart is skipped after a cheap check; on an
        # accelerator it is applied with masks so that the loop never waits for the device.
        bad = ~(alpha.abs().amax(1, keepdim=True) <= self.max_weight)  # (B, 1)
        if z.device.type != "cpu" or bool(bad.any()):
            if grad:
                # Under autograd the discarded inf/NaN weights would still poison the gradient
                # (0 * inf = NaN in torch.where's backward): re-solve with those rows' systems
                # replaced by the identity (the other rows' weights are unchanged).
                alpha = _weights(H, valid, scale, positions, replace=bad)
            alpha = torch.where(bad, eye[s], alpha)
            valid = valid.masked_fill(bad, 0.0)
            H = torch.where(bad.unsqueeze(2), eye, H)

        a = alpha.to(z.dtype)  # (B, m)
        z_next = bvm(a, F)  # Σ α_i f_i
        if self.damping:
            # Σ α_i z_i = Σ α_i (f_i - g_i), so the damped mix is Σ α f - damping Σ α g.
            z_next = z_next - self.damping * bvm(a, G) / scale
        return z_next, f(z_next), _AndersonState(F, G, H, valid, eye, count + 1, scale, positions)


def _weights(
    H: Tensor, valid: Tensor, scale: Tensor, positions: int, replace: Tensor | None = None
) -> Tensor:
    """The mixing weights ``α = y / Σy`` with ``M y = valid`` per row; ``replace`` (B, 1): rows
    whose system is replaced by the identity (finite weights for discarded rows).

    ``positions = 0``: ``M = H``, each row's own Gram matrix. Causal solving (``positions`` rows
    per sample, one per position): row t's weights minimise the residual over positions ``<= t``
    of its sample (its prefix), ``M_t = Σ_{s<=t} <g_i,s, g_j,s>`` — causal, and for the last
    position the whole sequence's Anderson system. Each row's Gram is stored scaled by its own
    ``scale²``, so the prefix sums are formed unscaled in float64 (no under/overflow) and
    rescaled by the row's own scale."""
    if positions:
        R, m, _ = H.shape
        vv = valid.unsqueeze(2) * valid.unsqueeze(1)
        s2 = scale.double().pow(2).view(R, 1, 1)
        C = (H * vv).double() / s2  # identity entries of invalid slots removed; ridge kept
        Hc = C.view(R // positions, positions, m, m).cumsum(1).view(R, m, m) * s2
        M = Hc * vv.double() + torch.diag_embed(1.0 - valid.double())
        rhs = valid.double()
    else:
        M, rhs = H, valid
    if replace is not None:
        M = torch.where(
            replace.unsqueeze(2), torch.eye(M.shape[1], dtype=M.dtype, device=M.device), M
        )
    y = torch.linalg.solve_ex(M, rhs)[0].to(H.dtype)
    return y / y.sum(1, keepdim=True)
