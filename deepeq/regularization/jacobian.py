"""Jacobian regularisation (Bai et al. 2021) and spectral-radius monitoring at an equilibrium."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def _vjp(fz: Tensor, z: Tensor, v: Tensor, name: str, create_graph: bool) -> Tensor:
    try:
        return torch.autograd.grad(fz, z, v, create_graph=create_graph, retain_graph=True)[0]
    except RuntimeError as e:
        if "second time" not in str(e):
            raise
        raise RuntimeError(
            f"{name}: the autograd graph of fz has already been freed, typically by "
            f"loss.backward(). Call {name}(sol.fz, sol.z_leaf) before the backward pass (or "
            f"call backward(retain_graph=True))."
        ) from e


def _check_pair(fz: Tensor, z: Tensor, name: str) -> None:
    if not isinstance(fz, Tensor) or not isinstance(z, Tensor):
        raise TypeError(
            f"{name}(fz, z) takes tensors; got {type(fz).__name__}, {type(z).__name__}."
        )
    if fz.shape != z.shape or fz.dim() < 2:
        raise ValueError(
            f"{name}: fz and z must have the same shape (B, ...); got {tuple(fz.shape)} and "
            f"{tuple(z.shape)}. Pass solution.fz and solution.z_leaf (flat (B, D))."
        )
    if not z.requires_grad or fz.grad_fn is None:
        raise ValueError(
            f"{name}: fz must be computed from z with autograd recording (z.requires_grad=True). "
            f"Use solution.fz and solution.z_leaf from a fixed_point/DEQ call made with grad "
            f"enabled and ImplicitBackward (they are None otherwise)."
        )


def _randn(shape, generator, dtype, device) -> Tensor:
    """Normal samples on ``device``, drawn on the generator's device when one is given."""
    dev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=dtype, device=dev).to(device)


def jacobian_penalty(
    fz: Tensor,
    z: Tensor,
    *,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    reduction: Literal["mean", "none"] = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """Hutchinson estimate of ``||J_f(z)||_F² / d``, ``J_f = ∂f/∂z``, ``d = numel(z) / B``.

    With Gaussian probes ``ε ~ N(0, I_d)``, ``E[||εᵀ J||²] = ||J||_F²`` (Bai et al. 2021, eq. 7);
    each probe costs one vector-Jacobian product through the recorded call ``fz = f(z)``, made
    with ``create_graph=True`` so that the estimate is differentiable with respect to f's
    parameters. This is the squared Frobenius norm, not the trace-like ``εᵀ J ε`` (which can be
    negative). Samples are independent (J is block-diagonal over the batch).

    Args:
        fz: ``f(z)``, shape ``(B, ...)``, recorded by autograd from ``z``
            (``solution.fz`` of an ImplicitBackward solve).
        z: the leaf ``fz`` was computed from (``solution.z_leaf``).
        num_samples: M, number of probes averaged.
        generator: optional generator for the probes (reproducibility).
        reduction: ``"mean"`` over the batch (a scalar) or ``"none"`` (shape ``(B,)``).
        mask: bool, broadcastable to ``fz``: penalise only the selected outputs' rows of J
            (e.g. the positions whose solve did not converge): the probes are zero elsewhere,
            and the estimate is ``Σ_selected rows ||J_row||² / (number selected)`` — over the
            whole batch for ``"mean"`` (the unmasked value when every entry is selected), per
            sample for ``"none"`` (0 for a sample with nothing selected).

    Returns:
        The penalty, differentiable with respect to whatever ``fz`` depends on.

    Examples:
        >>> import torch, deepeq
        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> fz = 2 * z  # J = 2 I, ||J||_F² / d = 4
        >>> round(deepeq.jacobian_penalty(fz, z, num_samples=2000, generator=torch.Generator().manual_seed(0)).item(), 1)
        4.0
    """
    _check_pair(fz, z, "jacobian_penalty")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"jacobian_penalty: num_samples must be an int >= 1; got {num_samples!r}.")
    if reduction not in ("mean", "none"):
        raise ValueError(
            f"jacobian_penalty: reduction must be 'mean' or 'none'; got {reduction!r}."
        )
    B = fz.shape[0]
    if mask is not None:
        try:
            mask = torch.broadcast_to(mask.to(device=fz.device, dtype=torch.bool), fz.shape)
        except (RuntimeError, AttributeError):
            raise ValueError(
                f"jacobian_penalty: mask must be a bool tensor broadcastable to fz's shape "
                f"{tuple(fz.shape)}; got {getattr(mask, 'shape', type(mask).__name__)}."
            ) from None
        count = mask.reshape(B, -1).sum(1).to(fz.dtype)  # selected rows per sample
    else:
        count = fz.new_full((B,), fz[0].numel())
    total = fz.new_zeros(B)
    for _ in range(num_samples):
        eps = _randn(fz.shape, generator, fz.dtype, fz.device)
        if mask is not None:
            eps = eps * mask
        vjp = _vjp(fz, z, eps, "jacobian_penalty", create_graph=True)
        total = total + vjp.reshape(B, -1).pow(2).sum(1)
    if reduction == "mean":
        return total.sum() / (num_samples * count.sum().clamp_min(1))
    return total / (num_samples * count.clamp_min(1))


def unconverged_mask(sol, rtol: float, atol: float = 0.0, *, causal: bool = False) -> Tensor | None:
    """Which outputs of a training solve missed ``||f(z) - z|| <= atol + rtol ||f(z)||`` at the
    returned iterate: a bool mask over ``sol.fz`` (flat ``(B, D)``), per position (dim 1 of
    the state, as a causal solve checks it) when ``causal``, per sample otherwise; None when
    every output met it. With ``jacobian_penalty(sol.fz, sol.z_leaf, mask=...)`` it regularises
    f where its equilibrium was not reached and nowhere else.

    Args:
        sol: a ``Solution`` from a solve made with grad enabled and ``ImplicitBackward``
            (``sol.fz`` and ``sol.z_leaf`` set); ``causal`` needs a state ``(B, T, ...)``.
        rtol, atol: the tolerance (usually the training solver's ``rtol`` / ``atol``).
        causal: check each position on its own.

    Examples:
        >>> import torch, deepeq
        >>> a = torch.tensor([0.0, 1.5, 0.0]).view(1, 3, 1)  # position 1 never converges
        >>> x = torch.ones(2, 3, 4, requires_grad=True)
        >>> sol = deepeq.fixed_point(lambda z, x: a * z + x, torch.zeros(2, 3, 4),
        ...                          deepeq.Picard(max_steps=4), args=(x,), causal=True)
        >>> deepeq.unconverged_mask(sol, rtol=1e-3, causal=True).view(2, 3, 4)[0, :, 0]
        tensor([False,  True, False])
    """
    if sol.fz is None or sol.z_leaf is None:
        raise ValueError(
            "unconverged_mask: sol.fz is None; solve with grad enabled and ImplicitBackward "
            "(the tracked call at z* is what the mask is computed from)."
        )
    fz, z = sol.fz.detach(), sol.z_leaf.detach()
    B = fz.shape[0]
    if causal:
        value = sol.value
        if not isinstance(value, Tensor) or value.dim() < 2:
            raise ValueError(
                "unconverged_mask: causal=True needs a state (B, T, ...) with the positions "
                f"along dim 1; got {type(value).__name__}."
            )
        T = value.shape[1]
    else:
        T = 1
    shape = (B, T, -1)
    diff = (fz - z).reshape(shape).double().norm(dim=-1)
    bad = diff > atol + rtol * fz.reshape(shape).double().norm(dim=-1)
    if not bool(bad.any()):
        return None
    return bad.unsqueeze(-1).expand(B, T, fz[0].numel() // T).reshape(B, -1)


def spectral_radius(
    fz: Tensor, z: Tensor, *, num_iters: int = 20, generator: torch.Generator | None = None
) -> Tensor:
    """Estimate ``|λ_max(J_f(z))|`` per sample, for monitoring stability.

    Runs ``k = min(num_iters, d)`` steps of Arnoldi iteration on ``J_fᵀ`` (same eigenvalues as
    ``J_f``) with vector-Jacobian products through the recorded call ``fz = f(z)``, and returns the
    largest modulus among the Ritz values (eigenvalues of the small Hessenberg matrix). Unlike the
    power method this is not fooled by a dominant complex-conjugate pair; with ``k = d`` it is
    exact up to rounding. No graph is kept (monitoring only).

    Args:
        fz: ``f(z)``, shape ``(B, ...)``, recorded from ``z``.
        z: the leaf ``fz`` was computed from.
        num_iters: Krylov dimension k (vector-Jacobian products used).
        generator: optional generator for the random start vector.

    Returns:
        Tensor of shape ``(B,)``.

    Examples:
        >>> import torch, deepeq
        >>> R = torch.tensor([[0.0, -0.9], [0.9, 0.0]])  # eigenvalues ±0.9i
        >>> z = torch.randn(2, 2, requires_grad=True)
        >>> [round(r, 4) for r in deepeq.spectral_radius(z @ R.T, z).tolist()]
        [0.9, 0.9]
    """
    _check_pair(fz, z, "spectral_radius")
    B = fz.shape[0]
    d = fz[0].numel()
    k = max(1, min(int(num_iters), d))
    wd = torch.promote_types(fz.dtype, torch.float32)
    q = _randn((B, d), generator, wd, fz.device)
    q = q / q.norm(dim=1, keepdim=True)
    Q = [q]
    H = torch.zeros(B, k + 1, k, dtype=wd, device=fz.device)
    tiny = torch.finfo(wd).eps
    for j in range(k):
        w = _vjp(fz, z, Q[j].reshape(fz.shape).to(fz.dtype), "spectral_radius", create_graph=False)
        w = w.reshape(B, d).to(wd)
        for i in range(j + 1):  # modified Gram-Schmidt
            h = (Q[i] * w).sum(1)
            H[:, i, j] = h
            w = w - h.unsqueeze(1) * Q[i]
        norm = w.norm(dim=1)
        H[:, j + 1, j] = norm
        # Breakdown (invariant subspace found): continue with a zero vector for that sample.
        Q.append(
            torch.where((norm > tiny).unsqueeze(1), w / norm.clamp_min(tiny).unsqueeze(1), 0.0)
        )
    eig = torch.linalg.eigvals(H[:, :k, :k].double())
    return eig.abs().amax(1).to(wd)
