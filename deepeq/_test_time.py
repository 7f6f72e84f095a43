"""Test-time compute over a fixed-point solve: several starts per sample solved in one batched
call (``fixed_point_restarts``: think wider) and the path independence of the equilibria they
reach (``path_independence``: the asymptotic alignment score of Anil et al. 2022)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._driver import _map_args
from ._fixed_point import fixed_point
from ._flatten import flatten, layout_of, unflatten
from ._norm import safe_norm
from ._solution import Solution
from ._types import FixedPointFn, State
from .solvers import AbstractSolver


@dataclass(frozen=True)
class Restarts:
    """What ``fixed_point_restarts`` returns.

    Attributes:
        value: per sample the equilibrium of the chosen start, in the structure of ``z0``
            (gradients flow through the chosen start's solve only).
        index: ``(B,)`` the chosen start of each sample (0 = ``z0``).
        solution: the batched ``Solution`` of all ``K * B`` solves (start-major: row
            ``k * B + b`` is start k of sample b), with its per-row stats.
        values: ``(K, B, D)`` flat equilibria of every start (detached).
        rel_residual: ``(K, B)`` relative residual of every start's returned iterate.
        converged: ``(K, B)`` whether each start met the tolerance.
    """

    value: State
    index: Tensor
    solution: Solution
    values: Tensor
    rel_residual: Tensor
    converged: Tensor


def _starts(z0: State, restarts: int, scale: float, starts, generator) -> Tensor:
    """``(K, B, D)`` flat starts: z0, then ``starts`` (``(K-1, B, ...)`` in z0's structure, or
    flat) or draws of ``N(0, scale²)``."""
    layout = layout_of(z0)
    first = flatten(z0, layout)  # not detached: a tracked z0 keeps its graph (start 0)
    if restarts == 1:
        return first.unsqueeze(0)
    if starts is None:
        noise = torch.randn(
            (restarts - 1, *first.shape), generator=generator, dtype=first.dtype, device="cpu"
        )
        return torch.cat((first.unsqueeze(0), scale * noise.to(first.device)))
    if isinstance(starts, Tensor) and starts.dim() == 3 and starts.shape[1:] == first.shape:
        rest = starts
    else:
        rest = torch.stack([flatten(s, layout) for s in starts])
    if rest.shape != (restarts - 1, *first.shape):
        raise ValueError(
            f"starts must hold restarts - 1 = {restarts - 1} states shaped like z0 (flat "
            f"{tuple(first.shape)}); got flat shape {tuple(rest.shape)}."
        )
    return torch.cat((first.unsqueeze(0), rest.detach().to(first)))


def fixed_point_restarts(
    f: FixedPointFn,
    z0: State,
    solver: AbstractSolver | None = None,
    *,
    args: tuple = (),
    restarts: int = 1,
    scale: float = 1.0,
    starts: Any = None,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Restarts:
    """Solve from ``restarts`` = K starts per sample in one batched ``fixed_point`` call and keep,
    per sample, the start whose returned iterate has the lowest relative residual (ties: the
    earliest start, so ``z0`` wins when it is as good). With K = 1 this is
    ``fixed_point(f, z0, solver, args=args, **options)`` bit for bit.

    Starts: ``z0`` first, then ``starts`` (K - 1 states shaped like ``z0``, e.g. other examples'
    equilibria) or K - 1 draws of ``N(0, scale²)`` from ``generator``. Every tensor in ``args``
    is repeated K times along the batch (start-major). The K solves of a sample are independent
    samples of one call, so per-sample stopping frees each as soon as it converges.

    Args:
        f, z0, solver, args: as in ``deepeq.fixed_point``.
        restarts: K >= 1.
        scale: σ of the random starts.
        starts: optional explicit starts (a sequence of K - 1 states, or a ``(K-1, B, D)``
            flat tensor).
        generator: random generator for the random starts.
        **options: passed to ``deepeq.fixed_point`` (``backward``, ``nonfinite``, ``trace``,
            ``solve_dtype``, ``causal``, ...); ``independent=False`` is refused (the starts of
            a sample would be coupled with each other).

    Returns:
        A ``Restarts`` record.

    Examples:
        >>> import torch, deepeq
        >>> f = lambda z: torch.tanh(3 * z + 0.05)  # two stable fixed points, near -1 and +1
        >>> z0 = torch.zeros(1, 1, dtype=torch.float64)
        >>> r = deepeq.fixed_point_restarts(f, z0, deepeq.Picard(max_steps=3), restarts=2,
        ...                                 starts=[torch.full((1, 1), -1.0, dtype=torch.float64)])
        >>> r.index.tolist()  # from 0 three steps are not enough; the start at -1 converged
        [1]
    """
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1; got {restarts!r}.")
    if options.get("independent", True) is False:
        raise ValueError(
            "fixed_point_restarts solves the starts of a sample as separate samples of one "
            "call; f must treat samples independently (independent=False is not supported)."
        )
    layout = layout_of(z0)
    B, K = layout.batch, restarts
    sol, big = _solve_starts(f, _starts(z0, K, scale, starts, generator), layout, solver, args,
                             options)  # fmt: skip
    rel = sol.stats.rel_residual.view(K, B)
    # lowest relative residual; NaN (non-finite) ranks last; ties keep the earliest start
    index = torch.nan_to_num(rel, nan=float("inf")).argmin(0)
    flat = flatten(sol.value, big)
    chosen = flat[index * B + torch.arange(B, device=index.device)]
    return Restarts(
        value=unflatten(chosen, layout),
        index=index,
        solution=sol,
        values=flat.detach().view(K, B, -1),
        rel_residual=rel,
        converged=sol.stats.converged.view(K, B),
    )


def _solve_starts(f, Z: Tensor, layout, solver, args, options: dict):
    """One ``fixed_point`` call over the ``(K, B, D)`` flat starts ``Z`` (start-major rows, every
    tensor in ``args`` repeated K times): ``(Solution, layout of the K * B batch)``."""
    K = Z.shape[0]
    big = dataclasses.replace(layout, batch=K * layout.batch)
    args = tuple(args) if isinstance(args, tuple | list) else (args,)
    repeated = _map_args(args, lambda a: a.repeat(K, *([1] * (a.dim() - 1))))
    sol = fixed_point(f, unflatten(Z.reshape(K * layout.batch, -1), big), solver,
                      args=repeated, **options)  # fmt: skip
    return sol, big


@dataclass(frozen=True)
class PathIndependence:
    """What ``path_independence`` returns (per sample b, over the S other starts).

    Attributes:
        aa: ``(B,)`` asymptotic alignment: mean cosine similarity of the equilibrium from the
            default start (fp1) and those from the other starts (fp2). 1: every start reached
            fp1's direction.
        cosine: ``(S, B)`` the cosine of each other start.
        different: ``(B,)`` share of the other starts whose equilibrium differs from fp1 by more
            than ``tol`` relative to ``||fp1||``.
        fp1: ``(B, D)`` flat equilibria from the default start.
        converged: ``(S + 1, B)`` convergence of each solve (row 0: fp1).
    """

    aa: Tensor
    cosine: Tensor
    different: Tensor
    fp1: Tensor
    converged: Tensor

    @property
    def score(self) -> float:
        """The overall AA score: the mean of ``aa``."""
        return float(self.aa.mean())


def path_independence(
    f: FixedPointFn,
    z0: State,
    solver: AbstractSolver | None = None,
    *,
    args: tuple = (),
    random_starts: int = 2,
    shuffled_starts: int = 2,
    scale: float = 1.0,
    tol: float = 1e-2,
    generator: torch.Generator | None = None,
    **options: Any,
) -> PathIndependence:
    """The asymptotic alignment (AA) score of Anil et al. 2022: solve each sample from ``z0``
    (fp1), then from ``shuffled_starts`` other samples' fp1 (a derangement of the batch each) and
    from ``random_starts`` draws of ``N(0, scale²)`` (fp2), all in one batched call; AA of a
    sample = the mean cosine similarity of its fp1 and fp2 (flattened states). A
    path-independent model (one equilibrium whatever the start) has AA = 1.

    Args:
        f, z0, solver, args: as in ``deepeq.fixed_point`` (solved without gradients).
        random_starts, shuffled_starts: how many of each kind of other start (shuffled starts
            need a batch of at least 2).
        scale: σ of the random starts.
        tol: an equilibrium counts as different when ``||fp2 - fp1|| > tol ||fp1||``.
        generator: random generator (starts and shuffles).
        **options: passed to ``deepeq.fixed_point``.

    Returns:
        A ``PathIndependence`` record.
    """
    layout = layout_of(z0)
    B = layout.batch
    if shuffled_starts and B < 2:
        raise ValueError(
            f"shuffled starts take other samples' equilibria; a batch of {B} has none. Use "
            f"shuffled_starts=0 or a larger batch."
        )
    if random_starts + shuffled_starts < 1:
        raise ValueError("path_independence needs at least one other start.")
    if not isinstance(args, tuple | list):
        args = (args,)
    with torch.no_grad():  # fp1, then every other start in one call
        first = fixed_point(f, z0, solver, args=args, **options)
        fp1 = flatten(first.value, layout)
        others = []
        for _ in range(shuffled_starts):  # a random cyclic shift: never a sample's own fp1
            shift = int(torch.randint(1, B, (1,), generator=generator))
            others.append(fp1[(torch.arange(B, device=fp1.device) + shift) % B])
        for _ in range(random_starts):
            draw = torch.randn(fp1.shape, generator=generator, dtype=fp1.dtype)
            others.append(scale * draw.to(fp1.device))
        sol, big = _solve_starts(f, torch.stack(others), layout, solver, args, options)
    S = len(others)
    fp2 = flatten(sol.value, big).view(S, B, -1)
    dots = (fp2 * fp1.unsqueeze(0)).sum(2, dtype=torch.float64)
    n1 = safe_norm(fp1, 1)
    n2 = safe_norm(fp2, 2)
    cosine = torch.where((n1 > 0) & (n2 > 0), dots / (n1 * n2).clamp_min(1e-300), 1.0)
    dist = safe_norm(fp2 - fp1.unsqueeze(0), 2)
    different = (dist > tol * n1).double().mean(0)
    converged = torch.cat((first.stats.converged.unsqueeze(0), sol.stats.converged.view(S, B)))
    return PathIndependence(
        aa=cosine.mean(0), cosine=cosine, different=different, fp1=fp1, converged=converged
    )
